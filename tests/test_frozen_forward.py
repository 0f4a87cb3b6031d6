"""A frozen Vim's blocks and R-MeeTo's merges in one kernel call (rmeeto.models.frozen_forward): the same bits as the
blocks and merges called one at a time, and the per-block path wherever that call cannot run."""

import pytest
import torch

import rmeeto
import rmeeto.reduction
from rmeeto.models import frozen_forward
from rmeeto.models.vim import Block
from rmeeto.ops import available_backends, use_backend

pytestmark = pytest.mark.skipif("cpu" not in available_backends(), reason="numba not installed")


def tiny_vim(**overrides) -> rmeeto.models.VisionMamba:
    torch.manual_seed(0)
    config = dict(img_size=32, patch_size=4, embed_dim=16, depth=6, num_classes=5) | overrides
    return rmeeto.create_model("vim_demo", **config).eval()


def images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def per_block(model, x: torch.Tensor) -> torch.Tensor:
    """The frozen model's logits with its blocks and merges called one at a time (run_blocks declining)."""
    run_blocks = frozen_forward.run_blocks
    frozen_forward.run_blocks = lambda *a: None
    try:
        return model(x)
    finally:
        frozen_forward.run_blocks = run_blocks


@pytest.fixture
def kernel_calls(monkeypatch) -> list[int]:
    """blocks_forward's calls: the block it started at, per call."""
    calls, kernel = [], frozen_forward._k.blocks_forward
    monkeypatch.setattr(frozen_forward._k, "blocks_forward", lambda *a: calls.append(a[2]) or kernel(*a))
    return calls


@pytest.mark.parametrize("reduction", [None, {"method": "rmeeto", "r": 4}, {"method": "rmeeto", "r": 16}])
@pytest.mark.parametrize("batch", [1, 3])
def test_one_kernel_call_gives_the_bits_of_the_blocks_and_merges_one_by_one(reduction, batch, kernel_calls):
    model = tiny_vim()
    if reduction:
        rmeeto.reduction.apply(model, **reduction)
    x = images(batch)
    with torch.no_grad(), use_backend("cpu"), rmeeto.frozen(model):
        got = model(x)
        assert kernel_calls == [0]
        want = per_block(model, x)
    assert kernel_calls == [0] and torch.equal(got, want)
    with torch.no_grad(), use_backend("ref"):
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


def test_a_merge_left_to_torchs_ranking_is_the_reducers_and_the_blocks_go_on_after_it(kernel_calls):
    """Mixers that output zeros give NaN scores (0/0 cosines): the kernel stops before each merge, the reducer makes
    it (torch's ranking decides, as in the per-block path), and a new call runs the blocks from there. The residual
    stream carries the image, so the logits are finite."""
    model = tiny_vim()
    reducer = rmeeto.reduction.apply(model, "rmeeto", r=4)
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.out_proj.weight.zero_()
    x = images(2)
    with torch.no_grad(), use_backend("cpu"), rmeeto.frozen(model):
        got = model(x)
        want = per_block(model, x)
    assert kernel_calls == [0, *reducer.schedule.blocks] and torch.equal(got, want) and got.isfinite().all()


@pytest.mark.parametrize("case", ["mtr", "recording", "source tracked", "different blocks"])
def test_the_blocks_run_one_by_one_where_one_call_cannot_run_them(case, kernel_calls):
    model = tiny_vim()
    if case == "mtr":  # its merges need Δ from the mixers, and its grouping is torch's
        rmeeto.reduction.apply(model, "mtr", r=0.2)
    elif case == "source tracked":
        rmeeto.reduction.apply(model, "rmeeto", r=4, track_source=True)
    elif case == "recording":
        model.layers[3].mixer.record = True
    else:  # blocks whose parameters differ in shape cannot be stacked
        model.layers[1] = Block(rmeeto.models.VimConfig(img_size=32, patch_size=4, embed_dim=16, expand=1), 0.0).eval()
    x = images(2)
    with torch.no_grad(), use_backend("cpu"):
        want = model(x)
        with rmeeto.frozen(model):
            got = model(x)
    assert not kernel_calls and torch.equal(got, want)


def test_the_stacked_parameters_are_made_once_per_scope_and_again_after_a_change(monkeypatch):
    model = tiny_vim()
    rmeeto.reduction.apply(model, "rmeeto", r=4)
    made, stack = [], frozen_forward._stack
    monkeypatch.setattr(frozen_forward, "_stack", lambda *a: made.append(a[1]) or stack(*a))
    x = images(2)
    with torch.no_grad(), use_backend("cpu"):
        with rmeeto.frozen(model):
            first = [model(x), model(x)]
            assert len(made) == 1
            model.layers[2].norm.weight.mul_(2)  # a tensor operation: its version counter moves
            model.layers[4].mixer.A_log.add_(0.5)
            changed = model(x)
            assert len(made) == 2
            for n in (1, 3, 1):  # other batch sizes: a stack each, the last two kept
                model(images(n))
            assert [rows[0] for rows in made] == [2 * 65, 2 * 65, 65, 3 * 65]
            model(x)
            assert len(made) == 5
        want = model(x)
    assert torch.equal(first[0], first[1]) and not torch.equal(changed, first[0]) and torch.equal(changed, want)
