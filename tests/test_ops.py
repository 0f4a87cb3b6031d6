"""rmeeto.ops: every scan backend against the `ref` oracle, gradients, conv, backend selection."""

import os
import subprocess
import sys
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rmeeto.ops import (
    available_backends,
    causal_conv1d,
    dispatch,
    get_backend,
    packed,
    scan_cpu,
    scan_torch,
    selective_scan,
    set_backend,
    use_backend,
)
from rmeeto.ops.dispatch import resolve_backend
from rmeeto.ops.scan_ref import selective_scan_ref

FAST = [b for b in ("torch", "cpu") if b in available_backends()]


def _avx512() -> bool:
    """The cpu kernels are compiled for AVX-512 here."""
    if "cpu" not in FAST:
        return False
    from rmeeto.ops import cpu_kernels

    return cpu_kernels._VECTOR_BITS == 512


AVX512 = _avx512()
IMPLS = ["torch", "torch-tiny-chunks", *FAST[1:]]  # FAST[1:]: the cpu backend when numba imports
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
SHAPES = [(1, 1, 1, 1), (2, 5, 1, 3), (2, 37, 17, 16), (3, 70, 64, 4), (1, 3, 300, 8)]
OPTIONS = [  # (D, z, delta_bias, delta_softplus)
    (True, True, True, True),
    (False, False, False, False),
    (True, False, False, True),
    (False, True, True, False),
]


def make_inputs(b, d, L, n, options=OPTIONS[0], dtype=torch.float32, seed=0, a_shift=0.0):
    """Realistic ranges: A = −exp(randn + a_shift), delta ~ randn − 2 before softplus, else positive."""
    g = torch.Generator().manual_seed(seed)
    use_D, use_z, use_bias, softplus = options

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    def uniform(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    # without softplus, delta (+ bias) is used as is, so keep it positive
    delta = rand(b, d, L) - 2 if softplus else 0.5 * uniform(b, d, L)
    bias = 0.5 * rand(d) if softplus else 0.1 * uniform(d)
    x = {
        "u": rand(b, d, L),
        "delta": delta,
        "A": -torch.exp(rand(d, n) + a_shift),
        "B": rand(b, n, L),
        "C": rand(b, n, L),
        "D": rand(d) if use_D else None,
        "z": rand(b, d, L) if use_z else None,
        "delta_bias": bias if use_bias else None,
    }
    x = {k: None if v is None else v.to(dtype) for k, v in x.items()}
    return x, softplus


def assert_close_scaled(actual, expected, rtol, atol_scale):
    """|a − e| ≤ atol_scale·max|e| + rtol·|e|, elementwise."""
    atol = atol_scale * max(expected.abs().max().item(), 1e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    set_backend(None)
    yield
    set_backend(None)


def _use(impl: str, monkeypatch) -> str:
    """Backend name for impl; "torch-tiny-chunks" runs the torch backend with 3-step chunks."""
    if impl == "torch-tiny-chunks":
        monkeypatch.setattr(scan_torch, "_chunk_len", lambda x, L, state: 3)
        return "torch"
    return impl


@pytest.fixture(params=IMPLS)
def backend(request, monkeypatch):
    """Each fast backend; the torch one also with many chunk boundaries."""
    return _use(request.param, monkeypatch)


# --- forward ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "".join("DZbs"[i] for i in range(4) if o[i]) or "-")
def test_forward_matches_ref_fp32(backend, shape, options):
    x, softplus = make_inputs(*shape, options)
    y = selective_scan(**x, delta_softplus=softplus, backend=backend)
    ref = selective_scan_ref(**x, delta_softplus=softplus)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert_close_scaled(y, ref, rtol=1e-5, atol_scale=1e-6)


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_forward_half_inputs(backend, dtype, rtol):
    x, softplus = make_inputs(2, 37, 33, 16, dtype=dtype)
    y = selective_scan(**x, delta_softplus=softplus, backend=backend)
    ref = selective_scan_ref(**x, delta_softplus=softplus)
    assert y.dtype == dtype
    assert_close_scaled(y.float(), ref.float(), rtol=rtol, atol_scale=rtol)


def test_long_sequence_strong_decay_is_stable(backend):
    x, softplus = make_inputs(1, 6, 2048, 8, a_shift=3.0)
    x["delta"] = x["delta"] + 4  # delta·A down to about −1e3 per step
    y = selective_scan(**x, delta_softplus=softplus, backend=backend)
    ref = selective_scan_ref(**x, delta_softplus=softplus)
    assert torch.isfinite(y).all()
    assert_close_scaled(y, ref, rtol=1e-5, atol_scale=1e-6)


def test_softplus_extremes(backend):
    """delta + bias far below 0 (softplus ≈ exp) and above 20 (softplus = identity)."""
    x, softplus = make_inputs(2, 9, 40, 4)
    x["delta"] = torch.linspace(-40, 40, x["delta"].numel()).reshape(x["delta"].shape)
    y = selective_scan(**x, delta_softplus=softplus, backend=backend)
    assert_close_scaled(y, selective_scan_ref(**x, delta_softplus=softplus), rtol=1e-5, atol_scale=1e-6)
    got, want = _grads(x, softplus, backend), _grads(x, softplus, "ref")
    for name in want:
        assert_close_scaled(got[name], want[name], rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("shape", [(2, 9, 12, 4), (2, 70, 19, 5)], ids=str)
def test_non_contiguous_inputs(backend, shape):
    """Channels-contiguous (transposed) inputs, as Vim passes delta and z; gradients flow back too."""
    x, softplus = make_inputs(*shape)
    x = {k: v.transpose(-1, -2).contiguous().transpose(-1, -2) if v.dim() == 3 else v for k, v in x.items()}
    assert not x["u"].is_contiguous()
    y = selective_scan(**x, delta_softplus=softplus, backend=backend)
    assert_close_scaled(y, selective_scan_ref(**x, delta_softplus=softplus), rtol=1e-5, atol_scale=1e-6)
    got, want = _grads(x, softplus, backend), _grads(x, softplus, "ref")
    for name in want:
        assert_close_scaled(got[name], want[name], rtol=1e-4, atol_scale=1e-5)


def test_ref_single_step_closed_form():
    x, _ = make_inputs(2, 4, 1, 3, options=(True, True, True, False))
    dt = x["delta"] + x["delta_bias"][:, None]
    h = (dt * x["u"])[..., None] * x["B"].transpose(1, 2)[:, None]  # B×D×1×N
    y = (h * x["C"].transpose(1, 2)[:, None]).sum(-1) + x["D"][:, None] * x["u"]
    expected = y * F.silu(x["z"])
    torch.testing.assert_close(selective_scan_ref(**x), expected)


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 3),
    d=st.integers(1, 80),
    L=st.integers(1, 40),
    n=st.integers(1, 17),
    seed=st.integers(0, 2**16),
)
def test_forward_matches_ref_property(b, d, L, n, seed):
    x, softplus = make_inputs(b, d, L, n, seed=seed)
    ref = selective_scan_ref(**x, delta_softplus=softplus)
    for backend in FAST:
        y = selective_scan(**x, delta_softplus=softplus, backend=backend)
        assert_close_scaled(y, ref, rtol=1e-5, atol_scale=1e-6)


# --- backward --------------------------------------------------------------------------------------


def token_major(x):
    """The same B×D×L values as a view of B×L×D memory (what a Vim mixer passes)."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize("layout", ["contiguous", "token-major"])
@pytest.mark.parametrize("shape", [(2, 9, 12, 4), (2, 70, 19, 5), (1, 3, 1, 2)], ids=str)
def test_reverse_scan_is_the_scan_of_the_flipped_sequence(backend, layout, shape):
    """reverse=True equals flipping u, delta, B, C, z along L, scanning, and flipping y back; gradients too.
    The cpu backend keeps token-major inputs token-major in its output."""
    x, softplus = make_inputs(*shape)
    if layout == "token-major":
        x = {k: token_major(v) if k in ("u", "delta", "z") else v for k, v in x.items()}
    flipped = {k: v.flip(-1) if k in ("u", "delta", "B", "C", "z") else v for k, v in x.items()}
    y = selective_scan(**x, delta_softplus=softplus, backend=backend, reverse=True)
    assert_close_scaled(y, selective_scan_ref(**flipped, delta_softplus=softplus).flip(-1), rtol=1e-5, atol_scale=1e-6)
    if backend == "cpu" and shape[2] > 1:
        assert scan_cpu.token_major(y)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    got = torch.autograd.grad(selective_scan(**leaves, delta_softplus=softplus, backend=backend, reverse=True),
                              list(leaves.values()), gy)
    want = torch.autograd.grad(selective_scan(**leaves, delta_softplus=softplus, backend="ref", reverse=True),
                               list(leaves.values()), gy)
    for a, b in zip(got, want, strict=True):
        assert_close_scaled(a, b, rtol=1e-4, atol_scale=1e-5)


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("nd", [64, 70, 130])
def test_cpu_scan_reads_token_major_blocks_in_place_with_the_gathered_numbers(nd, options):
    """The cpu scan's forward and backward kernels read (and the forward writes) the full 64-channel blocks of
    token-major inputs where they lie, and gather the rest (a ragged block, B×D×L inputs) into rows first:
    the same outputs and gradients to the bit either way, in both directions."""
    x, softplus = make_inputs(2, nd, 23, 8, options, dtype=torch.float32)
    seq = ("u", "delta", "B", "C", "z")
    tm = {k: token_major(v) if k in ("u", "delta", "z") and v is not None else v for k, v in x.items()}
    flipped = {k: v.flip(-1) if k in seq and v is not None else v for k, v in x.items()}
    gy = torch.randn(2, nd, 23, generator=torch.Generator().manual_seed(1))

    def run(inputs, reverse=False, flip=False):  # flip: y and the sequences' gradients back to tm's order
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items() if v is not None}
        y = selective_scan(**leaves, delta_softplus=softplus, backend="cpu", reverse=reverse)
        grads = torch.autograd.grad(y, list(leaves.values()), gy.flip(-1) if flip else gy)
        named = zip(("y", *leaves), (y, *grads), strict=True)
        return [t.flip(-1) if flip and k in ("y", *seq) else t for k, t in named]

    for got, want in ((run(tm), run(x)), (run(tm, reverse=True), run(flipped, flip=True))):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def _grads(x, softplus, backend):
    leaves = {k: v.clone().requires_grad_() for k, v in x.items() if v is not None}
    y = selective_scan(**leaves, delta_softplus=softplus, backend=backend)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    return dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), gy), strict=True))


@pytest.mark.parametrize("shape", [(2, 5, 1, 3), (2, 37, 17, 16), (1, 70, 50, 4)], ids=str)
@pytest.mark.parametrize("options", OPTIONS[:2], ids=["all", "none"])
def test_gradients_match_ref(backend, shape, options):
    x, softplus = make_inputs(*shape, options)
    got, want = _grads(x, softplus, backend), _grads(x, softplus, "ref")
    assert got.keys() == want.keys()
    for name in want:
        assert_close_scaled(got[name], want[name], rtol=1e-4, atol_scale=1e-5)


@pytest.mark.parametrize("impl", ["ref", "torch", "torch-tiny-chunks"])
def test_gradcheck_float64(impl, monkeypatch):
    backend = _use(impl, monkeypatch)
    x, softplus = make_inputs(2, 3, 7, 2, dtype=torch.float64)
    leaves = [x[k].requires_grad_() for k in NAMES]

    def fn(*args):
        return selective_scan(*args, delta_softplus=softplus, backend=backend)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_cpu_backend_float64_inputs_compute_in_fp32():
    x, softplus = make_inputs(2, 5, 9, 3, dtype=torch.float64)
    y = selective_scan(**x, delta_softplus=softplus, backend="cpu")
    assert y.dtype == torch.float64
    assert_close_scaled(y, selective_scan_ref(**x, delta_softplus=softplus), rtol=1e-5, atol_scale=1e-6)


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_cpu_ops_without_gradients_skip_the_graph_and_give_the_same_values(monkeypatch):
    """With nothing to differentiate (no_grad, or no input that requires grad) the cpu scan and conv run
    their kernels without their autograd functions, and give the values of the recorded path."""
    x, softplus = make_inputs(2, 70, 19, 5)
    w, bias, u_tm = torch.randn(70, 4), torch.randn(70), torch.randn(2, 19, 70).transpose(1, 2)  # conv: token-major
    leaves = {k: v if v is None else v.clone().requires_grad_() for k, v in x.items()}
    recorded = [selective_scan(**leaves, delta_softplus=softplus, backend="cpu", reverse=rev) for rev in (False, True)]
    recorded.append(causal_conv1d(u_tm.clone().requires_grad_(), w, bias, backend="cpu"))
    assert all(y.grad_fn is not None for y in recorded)

    def unexpected(*args):
        raise AssertionError("autograd function called with nothing to differentiate")

    monkeypatch.setattr(scan_cpu._CpuScan, "apply", unexpected)
    monkeypatch.setattr(scan_cpu._CpuConv, "apply", unexpected)
    with torch.no_grad():
        plain = [selective_scan(**leaves, delta_softplus=softplus, backend="cpu")]
    plain.append(selective_scan(**x, delta_softplus=softplus, backend="cpu", reverse=True))
    plain.append(causal_conv1d(u_tm, w, bias, backend="cpu"))
    for y, y_rec in zip(plain, recorded, strict=True):
        torch.testing.assert_close(y, y_rec.detach(), rtol=0, atol=0)


def _vector_of(ir_fn, x):
    """A vector function of the kernels (builder, 16-float vector → vector, e.g. cpu_kernels._vec_exp2) applied
    to x, 16 floats at a time (len(x) % 16 == 0)."""
    import numba
    import numpy as np
    from numba.extending import intrinsic

    from rmeeto.ops import cpu_kernels as k

    @intrinsic
    def apply16(typingctx, src, dst, i):
        def codegen(context, builder, signature, args):
            at = [k._vec_at(context, builder, signature.args[j], args[j], args[2], 16) for j in (0, 1)]
            builder.store(ir_fn(builder, builder.load(at[0], align=4)), at[1], align=4)
            return context.get_dummy_value()

        return numba.types.void(src, dst, i), codegen

    @numba.njit(cache=False)
    def apply(src):
        out = np.empty_like(src)
        for i in range(0, len(src), 16):
            apply16(src, out, i)
        return out

    assert len(x) % 16 == 0
    return apply(x)


def _scalar_of(fn, x):
    """A scalar numba function of the kernels (e.g. cpu_kernels._exp) applied to each float of x."""
    import numba
    import numpy as np

    @numba.njit(cache=False)
    def apply(fn, x):
        return np.array([fn(v) for v in x], dtype=np.float32)

    return apply(fn, x)


def _vec_exp2_of(x, scalef=None):
    """The kernels' vector 2^x (cpu_kernels._vec_exp2, in the form ``scalef`` picks) applied to x."""
    from rmeeto.ops import cpu_kernels as k

    return _vector_of(lambda builder, v: k._vec_exp2(builder, v, scalef), x)


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_cpu_kernel_exp_exp2_and_softplus_accuracy():
    import numpy as np

    from rmeeto.ops import cpu_kernels as k

    x = np.linspace(-87, 88, 200_001, dtype=np.float32)
    want = np.exp(x.astype(np.float64))
    assert (np.abs(_scalar_of(k._exp, x) - want) / want).max() < 2.5e-7
    x = np.concatenate([np.linspace(-125, 126, 199_996, dtype=np.float32), np.float32([-0.5, 0.5, 1e-9, 0])])
    want = np.exp2(x.astype(np.float64))  # the decays' 2^x, as the kernels' explicit vectors compute it
    assert (np.abs(_vec_exp2_of(x) - want) / want).max() < 2e-7
    x = np.linspace(-40, 40, 200_001, dtype=np.float32)
    want = np.logaddexp(0, x.astype(np.float64))
    assert (np.abs(_scalar_of(k._softplus, x) - want) / want).max() < 5e-7


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_vec_exp_gives_the_scalar_exps_bits():
    """The gate's exp inside the recurrence (_vec_exp, vector IR) is _exp operation for operation: the same
    bits over and past its clamp, so the gate computed there equals the scalar loop it replaced."""
    import numpy as np

    from rmeeto.ops import cpu_kernels as k

    x = np.concatenate([np.linspace(-100, 100, 199_984, dtype=np.float32),
                        np.float32([-1e30, -87, -86.99, 0, -0.0, 1e-9, 87.99, 88, 1e30, 0.5, -0.5, 1, -1, 20, -20,
                                    3.4e38])])  # fmt: skip
    assert np.array_equal(_vector_of(k._vec_exp, x), _scalar_of(k._exp, x))


@pytest.mark.skipif(not AVX512, reason="vscalefps needs numba and a CPU with AVX-512")
def test_vec_exp2_by_vscalefps_gives_the_clamped_forms_bits_and_is_exact_past_its_range():
    """The AVX-512 form of the decays' 2^x (vreduceps, vscalefps) gives the same bits as the portable
    form (clamp, rounding by 1.5·2²³, exponent bits added) over the portable form's range, and past it
    2^x's own limits (0, inf) where the portable form stops at 2^±125."""
    import numpy as np

    x = np.concatenate([np.linspace(-125, 126, 199_996, dtype=np.float32), np.float32([-0.5, 0.5, 1e-9, 0])])
    assert np.array_equal(_vec_exp2_of(x, scalef=True), _vec_exp2_of(x, scalef=False))
    far = np.float32([-1e30, -1e4, -200, 1e4] + [0] * 12)
    got = _vec_exp2_of(far, scalef=True)
    assert got[:3].tolist() == [0, 0, 0] and got[3] == np.inf
    assert (_vec_exp2_of(far, scalef=False)[:3] > 0).all()  # the clamped form's floor


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_cpu_kernels_ask_for_full_width_vectors_where_the_cpu_has_avx512(monkeypatch):
    """_full_width marks the function compiled around it (each kernel's parallel body) with LLVM's
    prefer-vector-width=512 when the CPU numba compiles for has AVX-512 (F and DQ), and with nothing otherwise."""
    import numba

    from rmeeto.ops import cpu_kernels as k

    @numba.njit(cache=False)
    def body(x):
        k._full_width()
        return x + 1.0

    assert body(1.0) == 2.0
    assert ('"prefer-vector-width"="512"' in body.inspect_llvm(body.signatures[0])) == (k._VECTOR_BITS == 512)
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert k._vector_bits() is None
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f,+avx512bw")
    assert k._vector_bits() is None  # no vreduceps (DQ) for _vec_exp2
    monkeypatch.setattr(numba.config, "CPU_FEATURES", "+avx2,+avx512f,+avx512dq,+avx512bw")
    assert k._vector_bits() == 512


_AVX2_PROBE = """
import torch
from rmeeto.ops import cpu_kernels, selective_scan
from rmeeto.ops.scan_ref import selective_scan_ref
torch.manual_seed(0)
b, d, n, L = 2, 80, 16, 9  # 80 channels: one full block of lanes and a ragged one
x = {"u": torch.randn(b, L, d).transpose(1, 2), "delta": 0.5 * torch.randn(b, L, d).transpose(1, 2),
     "A": -torch.rand(d, n) - 0.5, "B": torch.randn(b, n, L), "C": torch.randn(b, n, L), "D": torch.randn(d),
     "z": torch.randn(b, L, d).transpose(1, 2), "delta_bias": torch.randn(d)}
gy = torch.randn(b, d, L)
for reverse in (False, True):
    outs = []
    for backend in ("cpu", "ref"):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        y = selective_scan(**leaves, delta_softplus=True, reverse=reverse, backend=backend)
        outs.append([y, *torch.autograd.grad(y, list(leaves.values()), gy)])
    for got, want in zip(*outs):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (reverse, (got - want).abs().max())
asm = "".join(f.inspect_asm(sig) for f in (cpu_kernels.scan_forward, cpu_kernels.scan_backward) for sig in f.signatures)
assert "ymm" in asm and "zmm" not in asm
print("ok")
"""


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_cpu_kernels_compiled_for_a_cpu_without_avx512_match_ref(tmp_path):
    """The kernels' explicit 16-float vectors (_advance, _retreat) are split by LLVM into the registers the
    CPU has: compiled for Haswell (AVX2 + FMA) in a fresh process and cache, the scan's values and
    gradients still match ref, and the code uses no 512-bit registers."""
    features = "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse,+sse2,+sse3,+sse4.1"
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": features + ",+sse4.2,+ssse3",
           "NUMBA_CACHE_DIR": str(tmp_path)}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", _AVX2_PROBE], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


_THREADS_PROBE = """
import os, numba, torch
from rmeeto.ops.scan_cpu import selective_scan_cpu
x = torch.randn(1, 4, 5)
selective_scan_cpu(x, x, -torch.rand(4, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5), None, None, None, False)
print(numba.threading_layer(), os.environ.get("OMP_WAIT_POLICY"))
"""


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
@pytest.mark.parametrize(
    ("env", "layers"), [({}, ("omp", "workqueue")), ({"NUMBA_THREADING_LAYER": "workqueue"}, ("workqueue",))]
)
def test_cpu_backend_threading_layer(env, layers):
    """In a fresh process: numba's OpenMP layer where it loads (else workqueue), the user's choice when
    set, and no wait policy put in the environment (torch's runtime, which numba's layer runs on, keeps its own)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "NUMBA_THREADING_LAYER")}
    out = subprocess.run([sys.executable, "-c", _THREADS_PROBE], env={**clean, **env}, capture_output=True,
                         text=True, check=True).stdout.split()  # fmt: skip
    assert out[0] in layers and out[1] == "None"


_TORCH_THREADS_PROBE = """
import torch
from rmeeto.ops.scan_cpu import selective_scan_cpu
torch.set_num_threads(1)
x = torch.randn(1, 4, 5) + 0  # a torch op first, as in a model
selective_scan_cpu(x, x, -torch.rand(4, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5), None, None, None, False)
print(torch.get_num_threads())
"""


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_cpu_backend_keeps_torchs_thread_count():
    """Starting numba's threads (the first scan) leaves the thread count the user gave torch as it was, in a
    fresh process whose numba would use 2 threads."""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _TORCH_THREADS_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    assert out.split() == ["1"]


# --- causal conv1d ---------------------------------------------------------------------------------


def conv_direct(x, weight, bias, activation):
    """out[b, d, t] = bias[d] + Σ_k w[d, k] · x[b, d, t − (K−1) + k]."""
    K = weight.shape[-1]
    w = weight.reshape(weight.shape[0], K)
    xp = F.pad(x, (K - 1, 0))
    out = sum(w[:, k, None] * xp[..., k : k + x.shape[-1]] for k in range(K))
    if bias is not None:
        out = out + bias[:, None]
    return out if activation is None else out * torch.sigmoid(out)


@pytest.mark.parametrize("conv_backend", [None, *available_backends()])
@pytest.mark.parametrize("K", [1, 4, 5])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("weight_3d", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "token-major"])
def test_causal_conv1d_matches_direct(conv_backend, K, activation, weight_3d, layout):
    g = torch.Generator().manual_seed(K)
    x, w, bias = torch.randn(2, 7, 11, generator=g), torch.randn(7, K, generator=g), torch.randn(7, generator=g)
    x = token_major(x) if layout == "token-major" else x
    out = causal_conv1d(x, w[:, None] if weight_3d else w, bias, activation=activation, backend=conv_backend)
    torch.testing.assert_close(out, conv_direct(x, w, bias, activation), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        causal_conv1d(x, w, None, activation=activation), conv_direct(x, w, None, activation), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("conv_backend", [None, *available_backends()])
@pytest.mark.parametrize("layout", ["contiguous", "token-major"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_reverse_causal_conv1d_is_the_conv_of_the_flipped_sequence(conv_backend, layout, with_bias):
    """Values and gradients (x, weight, bias) of reverse=True against conv_direct on the flipped input; the
    numba kernel (cpu, token-major input) keeps the token-major layout."""
    g = torch.Generator().manual_seed(0)
    x, w, bias = torch.randn(2, 70, 13, generator=g), torch.randn(70, 4, generator=g), torch.randn(70, generator=g)
    x = token_major(x) if layout == "token-major" else x
    bias = bias if with_bias else None
    leaves = [t.clone().requires_grad_() for t in (x, w, bias) if t is not None]
    out = causal_conv1d(*leaves[:2], leaves[2] if with_bias else None, backend=conv_backend, reverse=True)
    want = conv_direct(*(t.flip(-1) if i == 0 else t for i, t in enumerate(leaves[:2])),
                       leaves[2] if with_bias else None, "silu").flip(-1)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    if resolve_backend(x, conv_backend) == "cpu":
        assert scan_cpu.token_major(out) == (layout == "token-major")
    gy = torch.randn(out.shape, generator=g)
    for a, b in zip(torch.autograd.grad(out, leaves, gy), torch.autograd.grad(want, leaves, gy), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_causal_conv1d_keeps_input_dtype():
    x, w = torch.randn(1, 3, 8).to(torch.bfloat16), torch.randn(3, 4)
    out = causal_conv1d(x, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), conv_direct(x.float(), w, None, "silu"), rtol=2e-2, atol=2e-2)


def test_causal_conv1d_rejects_unknown_activation():
    with pytest.raises(ValueError, match="'relu'"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), activation="relu")


# --- residual add + RMSNorm --------------------------------------------------------------------------


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
@pytest.mark.parametrize("channels", [40, 100, 384])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm_cpu_matches_the_module(channels, with_residual):
    """The fused kernel against RMSNorm.add_forward's torch path: the residual sum exactly, the norm to fp32
    rounding; 40 and 100 channels are not multiples of the kernel's 64 lanes."""
    from rmeeto.models.mamba import RMSNorm

    g = torch.Generator().manual_seed(channels)
    norm = RMSNorm(channels)
    norm.weight.data = torch.randn(channels, generator=g)
    hidden, residual = torch.randn(2, 37, channels, generator=g), torch.randn(2, 37, channels, generator=g)
    residual = residual if with_residual else None
    normed, new_residual = scan_cpu.add_rms_norm_cpu(hidden, residual, norm.weight, norm.eps)
    want = hidden if residual is None else residual + hidden
    assert torch.equal(new_residual, want)
    torch.testing.assert_close(normed, norm(want), rtol=1e-6, atol=1e-6)


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
@pytest.mark.parametrize("channels", [40, 384])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("outputs", ["both", "normed", "residual"])
def test_add_rms_norm_cpu_gradients_match_the_module(channels, with_residual, outputs):
    """With gradients wanted, the fused add + norm's backward kernel against autograd through the torch path:
    the gradients of hidden, residual and the norm's weight, to fp32 rounding, whichever outputs are used."""
    from rmeeto.models.mamba import RMSNorm

    g = torch.Generator().manual_seed(channels + with_residual)
    norm = RMSNorm(channels)
    norm.weight.data = torch.randn(channels, generator=g)
    hidden, residual = torch.randn(3, 37, channels, generator=g), torch.randn(3, 37, channels, generator=g)
    up_normed, up_residual = torch.randn(3, 37, channels, generator=g), torch.randn(3, 37, channels, generator=g)

    def grads(fused: bool) -> list[torch.Tensor]:
        leaves = [hidden.clone().requires_grad_(), residual.clone().requires_grad_() if with_residual else None]
        norm.weight.grad = None
        if fused:
            normed, new_residual = scan_cpu.add_rms_norm_cpu(*leaves, norm.weight, norm.eps)
        else:
            new_residual = leaves[0] if leaves[1] is None else leaves[1] + leaves[0]
            normed = norm(new_residual)
        loss = (normed * up_normed).sum() if outputs != "residual" else 0
        loss = loss + (new_residual * up_residual).sum() if outputs != "normed" else loss
        loss.backward()
        return [t.grad for t in leaves if t is not None] + [norm.weight.grad]

    for got, want in zip(grads(True), grads(False), strict=True):
        if want is None:  # the weight, when only the sum is used
            assert got is None and outputs == "residual"
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_fused_add_norm_only_where_the_kernel_applies():
    """fp32 on the cpu backend, with or without gradients."""
    x, w = torch.randn(1, 3, 8), torch.ones(8, requires_grad=True)
    assert dispatch.fused_add_norm(x, None, w)
    with torch.no_grad():
        assert dispatch.fused_add_norm(x, x, w)
        assert not dispatch.fused_add_norm(x.bfloat16(), x, w)
        assert not dispatch.fused_add_norm(x, x, w, backend="torch")


@pytest.mark.skipif("cpu" not in FAST or not packed.AVAILABLE, reason="numba or MKL missing")
def test_fused_block_cpu_only_where_one_kernel_call_applies():
    """A whole frozen block: fp32 contiguous CPU hidden and residual (or none; cpu_block_inputs, checked per block),
    an fp32 norm weight, every product on a packed copy, autocast off, the cpu backend (fused_block_cpu, checked
    once per forward)."""
    x, w = torch.randn(1, 3, 8), torch.ones(8)
    linears = [packed.PackedLinear(torch.randn(16, 8)), packed.PackedLinear(torch.randn(8, 16))]
    assert dispatch.cpu_block_inputs(x, x) and dispatch.cpu_block_inputs(x, None) and dispatch.cpu_block_inputs(x)
    assert not dispatch.cpu_block_inputs(x, torch.randn(1, 8, 3).transpose(1, 2))
    assert not dispatch.cpu_block_inputs(torch.randn(1, 8, 3).transpose(1, 2), x)
    assert not dispatch.cpu_block_inputs(x, x.double()) and not dispatch.cpu_block_inputs(x.double(), x)
    if torch.cuda.is_available():
        assert not dispatch.cpu_block_inputs(x.cuda(), None)
    with use_backend("cpu"):
        assert dispatch.fused_block_cpu(w, *linears)
        assert not dispatch.fused_block_cpu(w.bfloat16(), *linears)
        assert not dispatch.fused_block_cpu(w, *linears, packed.PackedLinear(torch.randn(8, 8), pack=False))
        assert not dispatch.fused_block_cpu(w, *linears, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not dispatch.fused_block_cpu(w, *linears)
    with use_backend("torch"):
        assert not dispatch.fused_block_cpu(w, *linears)


# --- selection -------------------------------------------------------------------------------------


def test_available_backends_here():
    names = available_backends()
    assert names[:2] == ["ref", "torch"]
    assert ("cpu" in names) == scan_cpu.AVAILABLE
    assert "cuda" not in names or torch.cuda.is_available()


def test_auto_prefers_cpu_kernel_on_cpu(monkeypatch):
    x = torch.zeros(1, 2, 3)
    assert get_backend() == "auto"
    assert resolve_backend(x) == ("cpu" if scan_cpu.AVAILABLE else "torch")
    monkeypatch.setattr(scan_cpu, "AVAILABLE", False)
    assert "cpu" not in available_backends()
    assert resolve_backend(x) == "torch"


def test_set_use_env_and_per_call(monkeypatch):
    x = torch.zeros(1, 2, 3)
    monkeypatch.setenv(dispatch.ENV_VAR, "ref")
    assert get_backend() == "ref" and resolve_backend(x) == "ref"
    set_backend("torch")
    assert get_backend() == "torch"
    with use_backend("ref"):
        assert resolve_backend(x) == "ref"
        assert resolve_backend(x, backend="torch") == "torch"
    assert get_backend() == "torch"
    set_backend(None)
    assert get_backend() == "ref"


def test_use_backend_restores_on_error():
    set_backend("torch")
    with pytest.raises(RuntimeError), use_backend("ref"):
        raise RuntimeError
    assert get_backend() == "torch"


def test_selected_backend_is_used(monkeypatch):
    calls = []
    monkeypatch.setitem(dispatch._SCANS, "ref", lambda *a: calls.append("ref") or a[0])
    x, softplus = make_inputs(1, 2, 3, 2)
    with use_backend("ref"):
        selective_scan(**x, delta_softplus=softplus)
    assert calls == ["ref"]


@pytest.mark.parametrize("name, kind", [("nope", "unknown"), ("cuda", "unavailable")])
def test_bad_backend_names(name, kind, monkeypatch):
    monkeypatch.setattr(dispatch.cuda, "available", lambda: False)
    for call in (
        lambda: set_backend(name),
        lambda: selective_scan(*make_inputs(1, 2, 3, 2)[0].values(), backend=name),
        lambda: causal_conv1d(torch.randn(1, 2, 3), torch.randn(2, 4), backend=name),
    ):
        with pytest.raises(ValueError, match=rf"{kind} scan backend '{name}'; available: auto, ref, torch"):
            call()
    monkeypatch.setenv(dispatch.ENV_VAR, name)
    with pytest.raises(ValueError, match=name):
        resolve_backend(torch.zeros(1))


def test_device_bound_backend_rejects_other_device(monkeypatch):
    monkeypatch.setattr(dispatch.cuda, "available", lambda: True)
    with pytest.raises(ValueError, match="'cuda' needs cuda tensors, got cpu"):
        resolve_backend(torch.zeros(1), "cuda")


def test_shape_errors():
    x, _ = make_inputs(2, 3, 4, 5)
    with pytest.raises(ValueError, match="A must be D×N"):
        selective_scan(x["u"], x["delta"], x["A"].t(), x["B"], x["C"])
    with pytest.raises(ValueError, match="C must be B×N×L"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"][..., :2])


def test_cuda_tensors_without_mamba_ssm_warn_once_with_the_import_error(monkeypatch):
    """A broken mamba-ssm is named (reasons, summary) and CUDA tensors warn once, naming the fallback."""
    err = ImportError("undefined symbol: _ZN3c10 (built for another torch)")
    monkeypatch.setattr(dispatch.cuda, "_scan_module", lambda: err)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "_warned_fallback", False)
    assert "undefined symbol" in dispatch.unavailable_backends()["cuda"] and "cuda" not in available_backends()
    cuda_like = SimpleNamespace(device=torch.device("cuda"))  # resolve_backend reads only the device
    with pytest.warns(RuntimeWarning, match=r"undefined symbol.*using the pure-PyTorch `torch` backend"):
        assert resolve_backend(cuda_like) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_backend(cuda_like) == "torch"
    with pytest.raises(ValueError, match="cuda: mamba-ssm does not import: ImportError: undefined symbol"):
        set_backend("cuda")


def test_backend_summary_names_the_backend_in_use():
    assert dispatch.backend_summary("cpu").startswith(f"scan backend: {resolve_backend(torch.zeros(1))} (device cpu")
    with use_backend("ref"):
        assert dispatch.backend_summary(torch.device("cpu")).startswith("scan backend: ref")


def test_block_compiles_without_graph_breaks_on_torch_backend():
    """Dynamo captures a whole Vim block on the `torch` backend as one graph (fullgraph=True fails
    on any graph break) with the eager numbers and gradients."""
    torch.manual_seed(0)
    from rmeeto.models.mamba import BiMamba

    block = BiMamba(16, d_state=4)
    x = torch.randn(2, 9, 16, requires_grad=True)
    with use_backend("torch"):
        eager = block(x)
        (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
        compiled = torch.compile(block, fullgraph=True, backend="eager")(x)
        (g_comp,) = torch.autograd.grad(compiled.square().sum(), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_comp, g_eager, rtol=1e-5, atol=1e-6)


def test_cuda_availability_is_a_constant_to_dynamo(monkeypatch):
    """With a CUDA device, auto's check for the kernels imports mamba-ssm; traced, that import broke the graph with a
    warning (an H200 machine without mamba-ssm) and stops a fullgraph compile: torch.compile takes the check's result
    as a constant."""
    from rmeeto.ops import cuda

    monkeypatch.setattr(cuda, "torch", SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: True)))
    want = 1.0 if cuda.available() else -1.0
    compiled = torch.compile(lambda x: x + 1 if cuda.available() else x - 1, fullgraph=True, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compiled(torch.zeros(2)).tolist() == [want, want]


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
@pytest.mark.parametrize("ndir", [1, 2])
@pytest.mark.parametrize("nb,L,nd,nn,rank,conv_bias", [(1, 2, 64, 16, 4, True), (2, 13, 80, 8, 5, False),
                                                        (3, 70, 130, 4, 2, True)])
def test_mamba_inner_cpu_equals_the_general_ops(nb, L, nd, nn, rank, conv_bias, ndir):
    """A mixer's directions as one call (conv, x_proj, scan kernels; Δ's rank-R product inside the scan; the
    second direction scanning backwards and added to the first) give what the conv, the linear maps and
    selective_scan give through their entry points on the cpu backend, summed, up to the summation order of
    dt_proj's product (the kernel sums in r order; the BLAS's order is its own, the same at some shapes):
    ragged channel blocks, two tokens (at one, nothing is token-major and the mixers take the general path),
    no conv bias, one direction or two, with parameters of their own."""
    from rmeeto.ops import mamba_inner_cpu, prepare_inner
    from rmeeto.ops.workspace import Workspace

    g = torch.Generator().manual_seed(nb * L + nd)
    x, z = (torch.randn(nb, L, nd, generator=g).transpose(1, 2) for _ in range(2))  # token-major B×D×L

    def direction() -> tuple:
        conv_w, conv_b = torch.randn(nd, 1, 4, generator=g), torch.randn(nd, generator=g) if conv_bias else None
        x_proj_w = torch.randn(rank + 2 * nn, nd, generator=g) / nd**0.5
        dt_proj_w, dt_bias = torch.randn(nd, rank, generator=g), torch.randn(nd, generator=g)
        A, D = -torch.rand(nd, nn, generator=g) - 0.1, torch.randn(nd, generator=g)
        return conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D

    directions = [direction() for _ in range(ndir)]
    with torch.no_grad():
        y = mamba_inner_cpu(x, z, prepare_inner(*directions), Workspace())
        want = 0
        with use_backend("cpu"):
            for (conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D), reverse in zip(directions, (False, True)[:ndir],
                                                                                     strict=True):
                conv = causal_conv1d(x, conv_w, conv_b, activation="silu", reverse=reverse)
                x_dbl = F.linear(conv.transpose(1, 2), x_proj_w)
                delta = (x_dbl[..., :rank] @ dt_proj_w.t()).transpose(1, 2)
                bm, cm = x_dbl[..., rank:rank + nn].transpose(1, 2), x_dbl[..., rank + nn:].transpose(1, 2)
                want = want + selective_scan(conv, delta, A, bm, cm, D, z=z, delta_bias=dt_bias, delta_softplus=True,
                                             reverse=reverse)
    assert y.shape == (nb, nd, L) and y.stride(1) == 1  # token-major, as the general path gives it
    torch.testing.assert_close(y, want, rtol=2e-6, atol=2e-6 * want.abs().max().item())


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
@pytest.mark.parametrize("nb, L, nd, rank", [(2, 9, 80, 5), (3, 17, 64, 24), (1, 2, 130, 3)], ids=str)
def test_a_recording_call_gives_x_proj_outputs_and_the_delta_the_scan_used(nb, L, nd, rank):
    """mamba_inner_cpu hands x_proj's outputs (dt, B, C per direction) back where asked, and delta_record makes
    from them softplus(dt·dt_projᵀ + bias), what the tensor operations give to rounding (ragged channel blocks,
    two tokens): the Δ the scan computed, as the scan given it, without softplus or bias, gives the same output
    to the bit."""
    from rmeeto.ops import delta_record, mamba_inner_cpu, prepare_inner
    from rmeeto.ops.workspace import Workspace

    g = torch.Generator().manual_seed(nb * L + nd)
    nn = 4
    x, z = (torch.randn(nb, L, nd, generator=g).transpose(1, 2) for _ in range(2))
    directions = [(torch.randn(nd, 1, 4, generator=g), torch.randn(nd, generator=g),
                   torch.randn(rank + 2 * nn, nd, generator=g) / nd**0.5, torch.randn(nd, rank, generator=g),
                   torch.randn(nd, generator=g), -torch.rand(nd, nn, generator=g) - 0.1, torch.randn(nd, generator=g))
                  for _ in range(2)]  # fmt: skip
    params = prepare_inner(*directions)
    x_dbl = torch.full((2, nb, L, rank + 2 * nn), float("nan"))
    with torch.no_grad():
        y = mamba_inner_cpu(x, z, params, Workspace(), x_dbl)
        delta = delta_record(x_dbl, params)
        assert delta.shape == (2, nb, L, nd)
        want_y = 0
        with use_backend("cpu"):
            for p, ((conv_w, conv_b, x_proj_w, dt_proj_w, dt_bias, A, D), reverse) in enumerate(
                    zip(directions, (False, True), strict=True)):  # fmt: skip
                conv = causal_conv1d(x, conv_w, conv_b, activation="silu", reverse=reverse)
                want_dbl = F.linear(conv.transpose(1, 2), x_proj_w)
                torch.testing.assert_close(x_dbl[p], want_dbl, rtol=1e-6, atol=1e-6 * want_dbl.abs().max().item())
                want = F.softplus(x_dbl[p, ..., :rank] @ dt_proj_w.t() + dt_bias)
                torch.testing.assert_close(delta[p], want, rtol=1e-5, atol=1e-6)
                bm, cm = (x_dbl[p, ..., rank + i * nn : rank + (i + 1) * nn].transpose(1, 2) for i in (0, 1))
                want_y = want_y + selective_scan(conv, delta[p].transpose(1, 2), A, bm, cm, D, z=z, reverse=reverse)
    assert torch.equal(y, want_y)


@pytest.mark.skipif("cpu" not in FAST, reason="numba not installed")
def test_kernel_scratch_is_line_aligned_and_kept_until_a_bigger_request():
    """The kernels' scratch arrays start on 64-byte lines and do not overlap; asking again for the same shapes
    gives the same arrays; a bigger request takes a new buffer, and asking for the old shapes then gives views
    of it, not of the old one."""
    shapes = ((3, 5, 64), (7, 64), (2, 3))
    with scan_cpu._LOCK:
        first = scan_cpu._scratch(shapes, 2)
        assert [a.shape for a in first] == [(2, *sh) for sh in shapes]
        assert all(a.ctypes.data % 64 == 0 for a in first)
        spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in first)
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:], strict=False))
        assert all(a is b for a, b in zip(scan_cpu._scratch(shapes, 2), first, strict=True))
        scan_cpu._scratch(((scan_cpu._SCRATCH[0].size + 1,),), 1)  # does not fit: a new buffer
        again = scan_cpu._scratch(shapes, 2)
        assert again[0].base is scan_cpu._SCRATCH[0] and first[0].base is not scan_cpu._SCRATCH[0]


# --- workspace ---------------------------------------------------------------------------------------


def test_workspace_reuses_slots_under_a_hold_and_nothing_else():
    """Under hold(), the i-th buffer of each reuse() takes the same memory (grown when too small); a reuse()
    inside another, or without a hold, gets memory of its own; outside reuse() nothing is active."""
    from rmeeto.ops.workspace import active, hold, reuse

    def two(ws, n):
        a, b = ws.empty(2, n), ws.empty(n)
        a.fill_(1.0)
        b.fill_(2.0)
        return a.data_ptr(), b.data_ptr()

    with hold():
        with reuse() as ws:
            first = two(ws, 3)
            assert active() is ws and first[0] != first[1]
            with reuse() as inner:
                assert inner is not ws and two(inner, 3)[0] not in first
            assert active() is ws and bool((ws._slots[0][:6] == 1.0).all())  # the inner one wrote elsewhere
        assert active() is None
        with reuse() as again:
            assert again is ws and two(again, 2) == first  # smaller: the same memory
            assert two(again, 2)[0] not in first  # the third and fourth slots are new
        with reuse() as grown:
            assert two(grown, 100)[0] != first[0]  # too small: the slot grows
    with reuse() as a, reuse() as b:
        assert a is not b
    with reuse() as c:
        assert c is not a and tuple(c.empty(4).shape) == (4,)


def test_kept_workspace_outlives_holds_and_stays_out_of_other_reuses():
    """kept() hands out the same memory call after call with no hold around it (a mixer's backward in each
    training step), not the held workspace's, and memory of its own inside another reuse() or kept()."""
    from rmeeto.ops.workspace import active, hold, kept, reuse

    with kept() as ws:
        first = ws.empty(8, 3).data_ptr()
    assert active() is None
    with kept() as again:
        assert again is ws and again.empty(8, 3).data_ptr() == first
        with kept() as inner, reuse() as other:
            assert inner is not ws and other is not ws and inner.empty(8, 3).data_ptr() != first
        assert active() is ws
    with hold(), reuse() as held:
        assert held is not ws
        with kept() as inside:
            assert inside is not ws
