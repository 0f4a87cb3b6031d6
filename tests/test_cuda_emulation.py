"""The `cuda` backend on CPU, through the real mamba-ssm and causal-conv1d Python packages.

`make setup` installs both with their compiled extensions skipped; tests/kernel_stub stands in for
those extensions (same argument checks, the libraries' own reference maths). Here the `cuda` backend
is allowed on CPU tensors; everything else (selective_scan_fn, mamba_inner_fn, causal_conv1d_fn and
their autograd Functions) is the libraries' code.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import rmeeto
import rmeeto.reduction
from rmeeto.ops import cuda, dispatch, use_backend

STUB = Path(__file__).parent / "kernel_stub"
TINY = dict(img_size=32, patch_size=8, embed_dim=16, depth=4, num_classes=5)


@pytest.fixture(scope="module")
def emulated_cuda():
    """Put the stand-in extensions first on sys.path and let the `cuda` backend take CPU tensors."""
    missing = [m for m in ("mamba_ssm", "causal_conv1d") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.fail(f"{missing} not installed: run `make setup` (it installs them without their CUDA builds)")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(STUB))
        cuda._scan_module.cache_clear()
        cuda._conv_fn.cache_clear()
        assert cuda.import_error() is None, cuda.import_error()
        assert Path(sys.modules["selective_scan_cuda"].__file__).parent == STUB
        mp.setattr(cuda, "available", lambda: True)
        mp.setattr(dispatch, "_DEVICE", {"cpu": "cpu"})
        yield sys.modules["mamba_ssm.ops.selective_scan_interface"]
    cuda._scan_module.cache_clear()
    cuda._conv_fn.cache_clear()


def _model(method: str | None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = rmeeto.create_model("vim_demo", **TINY)
    if method == "rmeeto":
        rmeeto.reduction.apply(model, "rmeeto", r=4)
    elif method == "mtr":
        rmeeto.reduction.apply(model, "mtr", r=0.1)
    return model


def _run(model, backend: str, x: torch.Tensor, y: torch.Tensor, autocast: bool = False):
    """Logits and parameter grads of one training step's forward/backward on ``backend``."""
    model.zero_grad()
    with use_backend(backend), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
    loss.backward()
    return logits.detach().float(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * b.abs().max().item())


class _Spy:
    """Counts calls of a module attribute while forwarding them."""

    def __init__(self, mp, owner, name):
        self.calls, fn = 0, getattr(owner, name)

        def spy(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)

        mp.setattr(owner, name, spy)


@pytest.mark.parametrize("method", [None, "rmeeto", "mtr"])
def test_vim_fp32_matches_ref(emulated_cuda, method, monkeypatch):
    """Unreduced, R-MeeTo and MTR: logits and every gradient to 1e-5 relative. Blocks take
    mamba_inner_fn (fused), except where MTR records Δ, B, C: there selective_scan_fn."""
    model = _model(method).train()
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 3])
    want_logits, want_grads = _run(model, "ref", x, y)
    inner = _Spy(monkeypatch, emulated_cuda, "mamba_inner_fn")
    scan = _Spy(monkeypatch, emulated_cuda, "selective_scan_fn")
    logits, grads = _run(model, "cuda", x, y)
    blocks = 2 * TINY["depth"]
    assert inner.calls + scan.calls == blocks
    assert (scan.calls > 0) == (method == "mtr")
    _close(logits, want_logits, 1e-5)
    assert grads.keys() == want_grads.keys() and len(grads) == len(list(model.parameters()))
    for name in grads:
        _close(grads[name], want_grads[name], 1e-5)


@pytest.fixture
def cuda_autocast(monkeypatch):
    """mamba_inner_fn reads the *CUDA* autocast state to cast its weights; on this CPU run the CPU
    autocast state is the one that holds, so the library is shown that one."""
    is_enabled = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: is_enabled(*a) if a else is_enabled("cpu"))
    monkeypatch.setattr(torch, "get_autocast_gpu_dtype", lambda: torch.get_autocast_dtype("cpu"))


@pytest.mark.parametrize("method", [None, "rmeeto", "mtr"])
def test_vim_bf16_autocast_close_to_ref(emulated_cuda, cuda_autocast, method):
    """bf16 autocast: logits within bf16 rounding of the ref backend's, same predictions, and
    gradients close (the two backends round at different places)."""
    model = _model(method).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 3, 0, 2])
    want_logits, want_grads = _run(model, "ref", x, y, autocast=True)
    logits, grads = _run(model, "cuda", x, y, autocast=True)
    _close(logits, want_logits, 3e-2)
    assert torch.equal(logits.argmax(-1), want_logits.argmax(-1))
    cos = torch.stack([torch.nn.functional.cosine_similarity(grads[n].flatten(), want_grads[n].flatten(), 0)
                       for n in want_grads if want_grads[n].abs().max() > 0])  # fmt: skip
    assert cos.min() > 0.98, cos.min()


def test_stub_enforces_the_kernels_checks(emulated_cuda):
    """What the C++ side rejects, the stand-in rejects: conv widths outside 2-4, channel-last with
    channels not a multiple of 8, B in another dtype than u, z not contiguous in L."""
    import causal_conv1d_cuda
    import selective_scan_cuda

    x = torch.randn(1, 8, 6)
    with pytest.raises(RuntimeError, match="width between 2 and 4"):
        causal_conv1d_cuda.causal_conv1d_fwd(x, torch.randn(8, 5), None, None, None, torch.empty_like(x), None, True)
    x_last = torch.randn(1, 6, 12).transpose(1, 2)  # channel-last, 12 channels
    with pytest.raises(RuntimeError, match="divisible by 8"):
        causal_conv1d_cuda.causal_conv1d_fwd(x_last, torch.randn(12, 4), None, None, None, torch.empty_like(x_last),
                                             None, True)  # fmt: skip
    u, A = torch.randn(1, 8, 6), -torch.rand(8, 4)
    B = torch.randn(1, 1, 4, 6)
    with pytest.raises(RuntimeError, match="B dtype"):
        selective_scan_cuda.fwd(u, u, A, B.double(), B, None, None, None, True)
    with pytest.raises(RuntimeError, match="z must have contiguous last dimension"):
        selective_scan_cuda.fwd(u, u, A, B, B, None, torch.randn(1, 6, 8).transpose(1, 2), None, True)
