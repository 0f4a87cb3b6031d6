"""rmeeto.ops.packed: linear maps with fixed weights on MKL's packed GEMM."""

import pytest
import torch

from rmeeto.ops import packed
from rmeeto.ops.packed import PackedLinear

needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch built without MKL")


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_mkl
def test_available_where_torch_has_mkl():
    """torch's CPU library exports MKL's packed routines where torch has MKL, so the tests below run them."""
    assert packed.AVAILABLE


@pytest.mark.parametrize(("shape", "n"), [((5, 7), 3), ((2, 131, 384), 768), ((1, 1, 16), 56)])
def test_packed_linear_matches_matmul(shape, n):
    """x @ wᵀ as torch.matmul gives it, for 2-d and 3-d x, into a new tensor or the out given, and again from
    the packed copy already made; a transposed (non-contiguous) x too."""
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(*shape, generator=g), torch.randn(n, shape[-1], generator=g)
    f = PackedLinear(w)
    want = x @ w.t()
    _close(f(x), want)
    out = torch.empty_like(want)
    assert f(x, out) is out
    _close(out, want)
    xt = torch.randn(shape[-1], 6, generator=g).t()
    _close(f(xt), xt @ w.t())


@needs_mkl
def test_packed_linear_keeps_copies_for_the_last_row_and_thread_counts():
    """The weight is packed when first needed, for the rows and threads of the call; the copies for the last
    COPIES (rows, threads) keys are kept (a key seen again packs nothing), the least recently used one
    replaced by a new key; the right product each time."""
    assert packed.COPIES == 2
    w = torch.randn(8, 4)
    f = PackedLinear(w)
    assert f._packs == {}
    threads = torch.get_num_threads()
    copies = {}
    for rows, kept in ((3, [3]), (4, [3, 4]), (3, [4, 3]), (5, [3, 5])):
        x = torch.randn(rows, 4)
        _close(f(x), x @ w.t())
        assert list(f._packs) == [(r, threads) for r in kept]
        copies.setdefault(rows, f._packs[rows, threads])
        assert f._packs[rows, threads] is copies[rows]  # the copy made at the key's first use, not packed again
    torch.set_num_threads(1)
    try:
        x = torch.randn(3, 4)
        _close(f(x), x @ w.t())
        assert list(f._packs) == [(5, threads), (3, 1)]
    finally:
        torch.set_num_threads(threads)


def test_packed_linear_falls_back_to_matmul(monkeypatch):
    """Without MKL's routines, or for a non-fp32 input, the product is torch.matmul's and nothing is packed."""
    w = torch.randn(6, 5)
    f = PackedLinear(w)
    x = torch.randn(3, 5)
    monkeypatch.setattr(packed, "AVAILABLE", False)
    assert torch.equal(f(x), torch.matmul(x, w.t()))
    monkeypatch.undo()
    half = PackedLinear(w.bfloat16())
    assert half(x.bfloat16()).dtype == torch.bfloat16
    assert f._packs == {} and half._packs == {}


def test_packed_linear_scales_by_a_power_of_two_exactly(monkeypatch):
    """alpha = 0.5 packed into the weight (a Vim mixer's halving) gives the unscaled product halved, to the bit;
    the fallback scales too."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 9, 24, generator=g), torch.randn(10, 24, generator=g)
    assert torch.equal(PackedLinear(w, 0.5)(x), PackedLinear(w)(x) * 0.5)
    monkeypatch.setattr(packed, "AVAILABLE", False)
    assert torch.equal(PackedLinear(w, 0.5)(x), torch.matmul(x, w.t()) * 0.5)


def test_packed_linear_without_packing_is_matmul():
    """pack=False (a weight used once): torch.matmul's product, scaled, and nothing packed."""
    w, x = torch.randn(6, 5), torch.randn(3, 5)
    f = PackedLinear(w, 0.5, pack=False)
    assert torch.equal(f(x), torch.matmul(x, w.t()) * 0.5) and f._packs == {}
