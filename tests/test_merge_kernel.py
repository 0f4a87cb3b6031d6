"""R-MeeTo's and MTR's merge kernels (rmeeto.reduction.merge_cpu): the general path's numbers to the bit, and used
only where they apply."""

import contextlib

import pytest
import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto.models.mamba import ScanRecord
from rmeeto.models.vim import TokenState
from rmeeto.ops import use_backend
from rmeeto.reduction import merge_cpu
from rmeeto.reduction.plans import rank_matches


def tiny_vim(depth: int = 6):
    torch.manual_seed(0)
    return rmeeto.create_model("vim_demo", img_size=32, patch_size=4, embed_dim=16, depth=depth, num_classes=5)


def state(b: int, n: int, c: int, cls, sizes: bool, seed: int = 0) -> TokenState:
    g = torch.Generator().manual_seed(seed)
    size = torch.randint(1, 5, (b, n), generator=g).float() if sizes else None
    return TokenState(torch.randn(b, n, c, generator=g), torch.randn(b, n, c, generator=g), cls, size)


def both_paths(reducer, s: TokenState, block: int = 2, name: str = "bipartite_wavg"
               ) -> tuple[TokenState, TokenState, int]:  # fmt: skip
    """(kernel path, general path, calls of merge_cpu's ``name``) for one reduction point, without gradients."""
    calls = []
    kernel = getattr(merge_cpu, name)
    setattr(merge_cpu, name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
    try:
        with torch.no_grad():
            fast = reducer(block, s)
            reducer._kernel = False
            general = reducer(block, s)
    finally:
        setattr(merge_cpu, name, kernel)
        reducer._kernel = True
    return fast, general, len(calls)


def assert_same(a: TokenState, b: TokenState) -> None:
    for x, y in ((a.hidden, b.hidden), (a.residual, b.residual), (a.size, b.size), (a.cls_index, b.cls_index)):
        assert x.shape == y.shape and torch.equal(x, y)


POINTS = [(65, 32, 8), (64, 0, 16), (12, 11, 1), (9, "per image", 4), (3, 1, 1), (197, 98, 11)]
"""(tokens N, cls position, tokens removed r)"""


@pytest.mark.parametrize("n,cls,r,distance,kth", [
    (n, cls, r, distance, kth) for n, cls, r in POINTS
    for distance, kth in [("cosine", 1), ("l1", 1), ("l2", 2), ("cosine", 3)]
    if kth <= (n - 1) // 2  # the k-th closest of the (N − 1) // 2 B tokens
])  # fmt: skip
@pytest.mark.parametrize("sizes", [False, True])
def test_the_kernel_merges_as_the_general_path_to_the_bit(n, cls, r, distance, kth, sizes, monkeypatch):
    reducer = R.apply(tiny_vim(), "rmeeto", r=1, blocks=[2], distance=distance, kth=kth)
    reducer.removed = {2: r}
    cls = torch.tensor([0, n - 1, n // 2]) if cls == "per image" else cls
    torch_ranked = []  # the kernel ranks best matches itself (random scores: no equal maxima), torch (topk) k-th ones
    monkeypatch.setattr(merge_cpu, "rank_matches", lambda *a: torch_ranked.append(1) or rank_matches(*a))
    fast, general, calls = both_paths(reducer, state(3, n, 24, cls, sizes, seed=n + r))
    assert calls == 1 and len(torch_ranked) == (kth > 1)
    assert_same(fast, general)
    assert fast.hidden.shape[1] == n - r


@pytest.mark.parametrize("kind,r,torch_decides", [
    ("zeros", 8, True), ("one token repeated", 8, True), ("two tokens alternating", 8, True),
    ("ties off the cut", 2, False), ("ties at the cut", 6, True), ("a merged token's two best matches", 2, False),
])  # fmt: skip
def test_ties_and_nan_scores_pick_the_same_tokens(kind, r, torch_decides, monkeypatch):
    """Equal scores (and the NaN scores of zero vectors) are broken as torch's max and argsort break them: by
    torch's own operations where the kernel cannot tell which tokens they pick (a NaN, or equal maxima on both
    sides of the cut between the r merged A tokens and the rest)."""
    g = torch.Generator().manual_seed(1)
    token = torch.randn(2, 2, 16, generator=g)
    repeated = torch.randn(2, 33, 16, generator=g)  # seven A tokens alike, their best matches equal:
    repeated[:, 20:] = repeated[:, 18:20].repeat(1, 7, 1)[:, :13]  # the 6th to 12th highest maxima of image 0
    if kind == "a merged token's two best matches":  # B tokens 0 and 1 alike, A token 0 nearly so: merged into B 0
        repeated[:, 3] = repeated[:, 1]
        repeated[:, 0] = repeated[:, 1] + 0.01 * torch.randn(2, 16, generator=g)
    hidden = {"zeros": torch.zeros(2, 33, 16), "one token repeated": token[:, :1].expand(2, 33, 16),
              "two tokens alternating": token.repeat(1, 17, 1)[:, :33]}.get(kind, repeated).contiguous()
    reducer = R.apply(tiny_vim(), "rmeeto", r=r, blocks=[2])
    torch_ranked = []
    monkeypatch.setattr(merge_cpu, "rank_matches", lambda *a: torch_ranked.append(1) or rank_matches(*a))
    fast, general, calls = both_paths(reducer, TokenState(hidden, hidden + 1, 16))
    assert calls == 1 and len(torch_ranked) == torch_decides
    assert torch.equal(fast.hidden.nan_to_num(7.0), general.hidden.nan_to_num(7.0))
    assert torch.equal(fast.residual, general.residual) and torch.equal(fast.cls_index, general.cls_index)


@pytest.mark.parametrize("channels", [8, 13, 24, 64, 100, 192, 384, 768])
def test_the_kernel_makes_the_norms_only_where_they_are_torchs_to_the_bit(channels):
    """merge_cpu.kernel_norms answers whether the kernel's norms are torch's for this width: checked here on other
    rows (scales 1e-30 to 1e30, squares under- and overflowing, zeros, infinities, NaN) than the 256 it tries."""
    g = torch.Generator().manual_seed(channels)
    rows = torch.randn(2000, channels, generator=g) * torch.logspace(-30, 30, 2000).unsqueeze(1)
    rows[:3] = torch.tensor([0.0, float("inf"), float("nan")]).unsqueeze(1)
    got = torch.empty(2000)
    merge_cpu._k.row_norms(rows.numpy(), got.numpy())
    want = torch.linalg.vector_norm(rows, dim=-1)
    assert merge_cpu.kernel_norms(channels) == torch.equal(got.nan_to_num(7.0), want.nan_to_num(7.0))


@pytest.mark.parametrize("b,na,nb,c", [(1, 98, 98, 384), (8, 93, 93, 384), (2, 32, 31, 24), (1, 5, 4, 16),
                                       (3, 1, 1, 8)])  # fmt: skip
def test_the_kernel_multiplies_only_where_its_products_are_torchs_to_the_bit(b, na, nb, c):
    """merge_cpu.kernel_scores answers whether MKL's SGEMM called from the kernel gives torch.bmm's scores for this
    shape (torch multiplies small matrices itself): checked here on other vectors than the ones it tries."""
    g = torch.Generator().manual_seed(na + c)
    a, b_set = torch.randn(b, na, c, generator=g), torch.randn(b, nb, c, generator=g) * 1e3
    got = torch.empty(b, na, nb)
    if merge_cpu.SGEMM_ADDRESS:
        merge_cpu._k.products(merge_cpu.SGEMM_ADDRESS, a.numpy(), b_set.numpy(), got.numpy())
    assert merge_cpu.kernel_scores(b, na, nb, c) == torch.equal(got, torch.bmm(a, b_set.transpose(1, 2)))


@pytest.mark.parametrize("fallback", ["norms", "scores"])
def test_torchs_norms_or_scores_where_the_kernels_differ(fallback, monkeypatch):
    """Where kernel_norms or kernel_scores says no, the merge takes torch's norms or scores: the same merge."""
    reducer = R.apply(tiny_vim(), "rmeeto", r=4, blocks=[2])
    s = state(3, 65, 24, 32, sizes=True)
    fast, general, _ = both_paths(reducer, s)
    torch_calls, vector_norm, bmm = [], torch.linalg.vector_norm, torch.bmm
    if fallback == "norms":
        monkeypatch.setattr(merge_cpu, "_EXACT_NORMS", {24: False})
        monkeypatch.setattr(torch.linalg, "vector_norm", lambda *a, **k: torch_calls.append(1) or vector_norm(*a, **k))
    else:
        monkeypatch.setattr(merge_cpu, "kernel_scores", lambda *shape: False)
        monkeypatch.setattr(torch, "bmm", lambda *a: torch_calls.append(1) or bmm(*a))
    slow, _, calls = both_paths(reducer, s)
    assert calls == 1 and len(torch_calls) == (3 if fallback == "norms" else 2)  # and the general path's
    assert_same(fast, general)
    assert_same(slow, general)


MTR_POINTS = [(65, 32, 16), (64, 0, 20), (12, 11, 1), (9, "per image", 3), (4, 1, 1), (197, 98, 14)]
"""(tokens N, cls position, tokens merged n < (N − 1) / 2)"""


@pytest.mark.parametrize("n,cls,r", MTR_POINTS)
@pytest.mark.parametrize("sizes", [False, True])
@pytest.mark.parametrize("indicator", ["cls", "delta"])
def test_mtr_kernel_merges_as_the_general_path_to_the_bit(n, cls, r, sizes, indicator):
    """MTR's merge (its grouping by tensor operations, then one kernel) gives the general path's streams, sizes and
    cls positions to the bit: cls anywhere, one per image, sizes or none, ranking by cls similarity or by a Δ
    record (given here as random positive values, B×Dᵢ×L in sequence order as a mixer keeps them)."""
    model = tiny_vim()
    reducer = R.apply(model, "mtr", r=0.1, blocks=[2], indicator=indicator)
    reducer.removed = {2: r}
    cls = torch.tensor([0, n - 1, n // 2]) if cls == "per image" else cls
    if indicator == "delta":
        g = torch.Generator().manual_seed(n)
        delta = [torch.rand(3, n, 32, generator=g).transpose(1, 2) for _ in range(2)]
        model.layers[1].mixer.last_record = ScanRecord(tuple(delta), (None, None), (None, None))
    fast, general, calls = both_paths(reducer, state(3, n, 24, cls, sizes, seed=n + r), name="grouped_mean")
    assert calls == 1 and fast.hidden.shape[1] == n - r
    assert_same(fast, general)


@pytest.mark.parametrize("kind", ["zeros", "one token repeated", "two tokens alternating"])
def test_mtr_kernel_ties_and_nan_scores_merge_the_same_tokens(kind):
    """Equal importances and similarities (and the NaN similarities of zero vectors): every decision is torch's,
    so the kernel merges the tokens the general path merges."""
    g = torch.Generator().manual_seed(1)
    token = torch.randn(2, 2, 16, generator=g)
    hidden = {"zeros": torch.zeros(2, 33, 16), "one token repeated": token[:, :1].expand(2, 33, 16),
              "two tokens alternating": token.repeat(1, 17, 1)[:, :33]}[kind].contiguous()
    reducer = R.apply(tiny_vim(), "mtr", r=0.1, blocks=[2], indicator="cls")
    reducer.removed = {2: 8}  # of the 32 non-cls tokens: 8 kept, 16 targets, 8 sources
    fast, general, calls = both_paths(reducer, TokenState(hidden, hidden + 1, 16), name="grouped_mean")
    assert calls == 1
    assert torch.equal(fast.hidden.nan_to_num(7.0), general.hidden.nan_to_num(7.0))
    assert torch.equal(fast.residual, general.residual) and torch.equal(fast.cls_index, general.cls_index)


@pytest.mark.parametrize("options", [{}, {"variant": "hybrid"}, {"variant": "prune"}, {"order": "odd_even"},
                                     {"op": "wavg"}, {"track_source": True}], ids=str)
def test_mtr_kernel_is_used_only_for_the_mean_merge_in_order(options):
    reducer = R.apply(tiny_vim(), "mtr", r=0.1, blocks=[2], indicator="cls", **options)
    fast, general, calls = both_paths(reducer, state(2, 65, 16, 32, sizes=True), name="grouped_mean")
    assert calls == (not options)
    assert torch.equal(fast.hidden, general.hidden) and torch.equal(fast.residual, general.residual)


def test_impossible_merges_raise_clear_errors_not_crashes():
    """Two tokens (cls and one A token, no B token): the kernel leaves the matching to torch, whose max raises;
    more tokens to merge than there are A tokens (which the schedule rules out) is a ValueError."""
    reducer = R.apply(tiny_vim(), "rmeeto", r=1, blocks=[2])
    with torch.no_grad(), pytest.raises(IndexError, match="non-zero size"):
        reducer(2, TokenState(torch.randn(1, 2, 16), torch.randn(1, 2, 16), 0))
    reducer.removed = {2: 3}
    with torch.no_grad(), pytest.raises(ValueError, match="cannot merge 3 of 5 tokens: at most 2"):
        reducer(2, TokenState(torch.randn(1, 5, 16), torch.randn(1, 5, 16), 0))


@pytest.mark.parametrize("method, r, name", [("rmeeto", 5, "bipartite_wavg"), ("mtr", 0.2, "grouped_mean")])
def test_a_merged_vim_gives_the_same_logits_with_and_without_the_kernel(method, r, name):
    model = tiny_vim().eval()
    reducer = R.apply(model, method, r=r)
    x = torch.randn(3, 3, 32, 32)
    calls, checks = [], []
    kernel, forward_applies, applies = getattr(merge_cpu, name), merge_cpu.forward_applies, merge_cpu.applies
    setattr(merge_cpu, name, lambda *a, **k: calls.append(1) or kernel(*a, **k))
    merge_cpu.forward_applies = lambda *a: checks.append("forward") or forward_applies(*a)
    merge_cpu.applies = lambda *a: checks.append("merge") or applies(*a)
    try:
        with torch.no_grad():
            fast = model(x)
            reducer._kernel = False
            general = model(x)
    finally:
        setattr(merge_cpu, name, kernel)
        merge_cpu.forward_applies, merge_cpu.applies = forward_applies, applies
    assert len(calls) == len(reducer.schedule.blocks) and torch.equal(fast, general)
    assert checks == ["forward"]  # once for the forward, not at each merge


@pytest.mark.parametrize("case", ["gradients", "bf16 hidden", "autocast", "source tracked", "torch backend",
                                  "odd_even", "prune", "mean", "metric delta"])
def test_the_kernel_is_used_only_where_it_applies(case):
    options = {"odd_even": {"order": "odd_even"}, "prune": {}, "mean": {"op": "mean"},
               "metric delta": {"metric": "delta"}}.get(case, {})
    model = tiny_vim()
    reducer = R.apply(model, "prune" if case == "prune" else "rmeeto", r=4, blocks=[2],
                      track_source=case == "source tracked", **options)
    s = state(2, 65, 16, 32, sizes=True)
    if case == "gradients":
        s.hidden.requires_grad_(True)
    if case == "bf16 hidden":
        s.hidden = s.hidden.bfloat16()
    assert merge_cpu.applies(state(2, 65, 16, 32, sizes=True))
    if case == "metric delta":  # the method needs the mixer's record: run the model instead
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
        assert not reducer._kernel
        return
    calls = []
    kernel = merge_cpu.bipartite_wavg
    merge_cpu.bipartite_wavg = lambda *a, **k: calls.append(1) or kernel(*a, **k)
    try:  # called as a Vim's forward calls it, and directly
        if case == "torch backend":
            with use_backend("torch"), torch.no_grad():
                reducer.for_forward(s.hidden)(2, s)
                reducer(2, s)
        else:
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast")
            with torch.set_grad_enabled(case == "gradients"), autocast:
                outs = [reducer.for_forward(s.hidden)(2, s), reducer(2, s)]
            if case == "gradients":
                sum(out.hidden.sum() for out in outs).backward()
                assert s.hidden.grad is not None
    finally:
        merge_cpu.bipartite_wavg = kernel
    assert calls == []


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("method, r", [("rmeeto", 3), ("mtr", 0.2)])
def test_a_merged_vim_compiles_without_gradients(frozen, method, r):
    """torch.compile cannot trace numba: the kernels' entry points run eagerly between the graphs (also with
    the parameters laid out once, inside rmeeto.frozen, and for MTR's recording mixers)."""
    model = tiny_vim(depth=3).eval()
    R.apply(model, method, r=r)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), rmeeto.frozen(model) if frozen else contextlib.nullcontext():
        compiled = torch.compile(model, backend="aot_eager", dynamic=False)
        torch.testing.assert_close(compiled(x), model(x))
