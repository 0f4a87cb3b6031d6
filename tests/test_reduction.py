"""Token reduction: plans and merges against a literal reference of the spec, plus invariants."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rmeeto
import rmeeto.reduction as R
from rmeeto.models.vim import TokenState
from rmeeto.reduction.merge import Merge
from rmeeto.reduction.plans import bipartite_plan


def tiny_vim(depth: int = 6):
    torch.manual_seed(0)
    return rmeeto.create_model("vim_demo", img_size=32, patch_size=4, embed_dim=16, depth=depth, num_classes=5)


def pair_score(u, v, distance):
    """methods.md §2: the metric is L2-normalised first, whatever the distance."""
    u, v = u / u.norm(), v / v.norm()
    if distance == "cosine":
        return float(u @ v)
    return -float((u - v).abs().sum() if distance == "l1" else (u - v).pow(2).sum().sqrt())


def reference_merge_point(x, res, size, p, r, prune=False, distance="cosine", order="ordered"):
    """methods.md §2 step by step for ONE image: x, res N×C, size N, cls at p → (x, res, size, q)."""
    n = x.shape[0]
    idx = [j for j in range(n) if j != p]
    xs, rs, ss = x[idx], res[idx], size[idx]
    m = len(idx)
    a_set, b_set = list(range(0, m, 2)), list(range(1, m, 2))
    partner, score = {}, {}
    for a in a_set:
        sims = [pair_score(xs[a], xs[b], distance) for b in b_set]
        best = max(range(len(b_set)), key=lambda j: (sims[j], -j))  # first of equal maxima, as argmax
        partner[a], score[a] = b_set[best], sims[best]
    by_score = sorted(a_set, key=lambda a: -score[a])
    merged = by_score[:r]
    if order == "unordered":  # the authors' ToMe layout: unmerged A by descending score, then B in order
        survivors = [a for a in by_score if a not in merged] + b_set
        q = int(p * (len(a_set) - r) / len(a_set))
    else:
        survivors = sorted([a for a in a_set if a not in merged] + b_set)
        q = int(p * (n - r) / n)
    out_x, out_r, out_s = [], [], []
    for t in survivors:
        group = [t] + ([] if prune else [a for a in merged if partner[a] == t])
        w = torch.stack([ss[g] for g in group])
        out_x.append(sum(xs[g] * ss[g] for g in group) / w.sum())
        out_r.append(sum(rs[g] * ss[g] for g in group) / w.sum())
        out_s.append(w.sum())
    ins = lambda rows, c: torch.stack(rows[:q] + [c] + rows[q:])  # noqa: E731
    return ins(out_x, x[p]), ins(out_r, res[p]), ins(out_s, size[p]), q


def random_state(b=3, n=17, c=8, p=8, sizes=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = torch.randint(1, 4, (b, n), generator=g).float() if sizes else None
    if size is not None:
        size[:, p] = 1
    return TokenState(torch.randn(b, n, c, generator=g, dtype=torch.float64),
                      torch.randn(b, n, c, generator=g, dtype=torch.float64), p, size)


@pytest.mark.parametrize("distance,order", [("cosine", "ordered"), ("l1", "ordered"), ("l2", "ordered"),
                                            ("cosine", "unordered"), ("l2", "unordered")])
@pytest.mark.parametrize("prune", [False, True])
@pytest.mark.parametrize("n,p,r", [(17, 8, 5), (16, 7, 8), (11, 0, 3), (12, 11, 1), (33, 16, 11)])
def test_rmeeto_merge_point_matches_the_spec(prune, n, p, r, distance, order):
    model = tiny_vim()
    reducer = R.apply(model, "prune" if prune else "rmeeto", blocks=[2], r=r, distance=distance, order=order)
    state = random_state(n=n, p=p)
    out = reducer(2, state)
    for i in range(state.hidden.shape[0]):
        ex, er, es, q = reference_merge_point(state.hidden[i], state.residual[i], state.size[i], p, r, prune,
                                              distance, order)
        assert out.cls_index[i] == q
        torch.testing.assert_close(out.hidden[i], ex)
        torch.testing.assert_close(out.residual[i], er)
        torch.testing.assert_close(out.size[i], es.float())


def reference_mtr(x, importance, p, n, size=None, variant="merge"):
    """methods.md §3 for ONE image: N×C tokens with cls at p, importance of the N−1 others → tokens after the
    point and the new cls index. Sources merge by the plain mean of their vectors (``size`` given: the
    size-weighted option); survivors and cls keep their sequence order."""
    others = [j for j in range(x.shape[0]) if j != p]
    m = len(others)
    rank = sorted(range(m), key=lambda t: -float(importance[t]))
    source, target = rank[m - n:], rank[n:m - n]
    unit = x[others] / x[others].norm(dim=-1, keepdim=True)
    into = {s: max(target, key=lambda t: float(unit[s] @ unit[t])) for s in source}
    w = torch.ones(x.shape[0], dtype=x.dtype) if size is None else size
    rows, q = [], None
    for j in range(x.shape[0]):
        if j == p:
            q = len(rows)  # cls goes after exactly the survivors that preceded it
            rows.append(x[p])
        elif others.index(j) not in source:
            t = others.index(j)
            group = [j] + ([others[s] for s in source if into[s] == t] if variant == "merge" else [])
            rows.append(sum(x[g] * w[g] for g in group) / sum(w[g] for g in group))
    return torch.stack(rows), q


@pytest.mark.parametrize("variant", ["merge", "prune"])
@pytest.mark.parametrize("n,p,ratio,op", [(21, 10, 0.2, "mean"), (10, 2, 0.25, "mean"), (11, 0, 0.0, "mean"),
                                          (32, 31, 0.33, "mean"), (21, 10, 0.2, "wavg"), (17, 8, 0.4, "wavg")])
def test_mtr_merge_point_matches_the_spec(n, p, ratio, op, variant):
    model = tiny_vim()
    reducer = R.apply(model, "mtr", r=ratio, blocks=[2], indicator="cls", op=op, variant=variant)
    reducer.removed[2] = int(ratio * (n - 1))  # this state is smaller than the model's own sequence
    state = random_state(n=n, p=p)
    out = reducer(2, state)
    for i in range(state.hidden.shape[0]):
        x = state.hidden[i]
        others = torch.cat([x[:p], x[p + 1:]])
        importance = torch.cosine_similarity(others, x[p][None], dim=-1)
        size = state.size[i] if op == "wavg" else None
        expected, q = reference_mtr(x, importance, p, int(ratio * (n - 1)), size, variant)
        assert out.cls_index[i] == q
        torch.testing.assert_close(out.hidden[i], expected)


@pytest.mark.parametrize("name,options", [("mtr", dict(variant="prune", indicator="cls")), ("hsa", {}),
                                          ("random", {})])
def test_pruning_keeps_the_input_order_minus_the_dropped_tokens(name, options):
    """With a prune variant the output, cls included, is the input sequence with the dropped tokens removed."""
    model = tiny_vim()
    reducer = R.apply(model, name, r=0.3, blocks=[2], **options)
    n, c = 65, 4
    ids = torch.arange(n, dtype=torch.float64)
    hidden = torch.randn(3, n, c, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    hidden[..., 0] = ids  # channel 0 names the token
    out = reducer(2, TokenState(hidden, hidden.clone(), torch.tensor([32, 0, 64])))
    for i in range(3):
        kept = out.hidden[i, :, 0].round().long().tolist()
        assert kept == sorted(kept) and len(set(kept)) == len(kept) == n - reducer.removed[2]
        assert kept[int(out.cls_index[i])] == [32, 0, 64][i]
        torch.testing.assert_close(out.hidden[i], hidden[i, kept])


def test_mtr_importance_is_mean_delta_of_both_directions():
    model = tiny_vim()
    reducer = R.apply(model, "mtr", r=0.2, blocks=[3])
    seen = {}
    original = reducer.method.plan
    object.__setattr__(reducer.method, "plan", lambda s, a: seen.setdefault("s", s) and original(s, a))
    model(torch.randn(2, 3, 32, 32))
    sig, rec = seen["s"], model.layers[2].mixer.last_record
    full = (rec.delta[0].mean(1) + rec.delta[1].mean(1)) / 2  # B×N
    for i in range(2):
        keep = [j for j in range(full.shape[1]) if j != sig.cls_index[i]]
        torch.testing.assert_close(sig.importance("delta")[i], full[i, keep])


def test_reductions_follow_a_per_image_cls_index_to_the_head():
    """After an MTR point each image may hold its cls elsewhere; the head reads each image's own."""
    model = tiny_vim().eval()
    R.apply(model, "mtr", r=0.3, blocks=[2, 4])
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    seen = []
    inner = model.token_reducer
    model.token_reducer = lambda i, s: seen.append(out := inner(i, s)) or out
    with torch.no_grad():
        batched = model(images)
        singles = torch.cat([model(images[i:i + 1]) for i in range(4)])
    assert len(set(seen[3].cls_index.tolist())) > 1, "the test needs images whose cls moved differently"
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), m=st.integers(2, 40), c=st.integers(2, 6), frac=st.floats(0, 1),
       order=st.sampled_from(["ordered", "odd_even", "unordered"]), seed=st.integers(0, 2**16))
def test_bipartite_invariants(b, m, c, frac, order, seed):
    r = int(frac * ((m + 1) // 2))
    x = torch.randn(b, m, c, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    merge, prune = bipartite_plan(x, r, order=order), bipartite_plan(x, r, order=order, prune=True)
    assert merge.num_out == prune.num_out == m - r
    survivors = prune.dest >= 0  # with prune, exactly the survivors keep a slot
    assert (survivors.sum(1) == m - r).all()
    assert torch.equal(merge.dest[survivors], prune.dest[survivors])  # same survivors, same slots
    assert (merge.dest >= 0).all()  # merging loses no token
    if order == "ordered":  # survivors keep their relative order
        for i in range(b):
            assert prune.dest[i][survivors[i]].tolist() == list(range(m - r))
    size = torch.rand(b, m, dtype=torch.float64) + 0.5
    torch.testing.assert_close(Merge(merge, size).sizes().sum(1), size.sum(1))  # sizes add up
    out = Merge(merge, size)(x)
    for i in range(b):  # each image reduced on its own
        single = bipartite_plan(x[i:i + 1], r, order=order)
        torch.testing.assert_close(Merge(single, size[i:i + 1])(x[i:i + 1])[0], out[i])


@pytest.mark.parametrize("method,amount,options", [("rmeeto", 4, {}), ("mtr", 0.2, {"indicator": "cls"}),
                                                   ("prune", 3, {})])
def test_merging_copies_of_one_token_changes_nothing(method, amount, options):
    model = tiny_vim()
    reducer = R.apply(model, method, r=amount, blocks=[2], **options)
    token = torch.randn(1, 1, 16)
    state = TokenState(token.expand(2, 65, 16).clone(), token.expand(2, 65, 16).clone().float(), 32)
    out = reducer(2, state)
    torch.testing.assert_close(out.hidden, token.expand(2, out.hidden.shape[1], 16))


def test_reduced_vim_token_counts_sizes_and_cls():
    model = tiny_vim(depth=8)
    reducer = R.apply(model, "rmeeto", r=6, track_source=True)
    counts = []
    inner = model.token_reducer
    model.token_reducer = lambda i, s: counts.append((i, (out := inner(i, s)).hidden.shape[1], out)) or out
    model(torch.randn(2, 3, 32, 32))
    assert reducer.schedule.blocks == (2, 4, 6)
    assert [(i, n) for i, n, _ in counts if i in (2, 4, 6)] == [(2, 59), (4, 53), (6, 47)]
    final = counts[-1][2]
    assert (final.cls_index == int(int(int(32 * 59 / 65) * 53 / 59) * 47 / 53)).all()
    torch.testing.assert_close(final.size.sum(1), torch.full((2,), 65.0))
    torch.testing.assert_close(final.source.sum(-1), final.size)  # each token holds `size` originals
    assert (final.source.sum(1) == 1).all()  # every original token is in exactly one output token


def test_r_zero_is_the_identity_and_remove_restores():
    model = tiny_vim()
    x = torch.randn(2, 3, 32, 32)
    y0 = model(x)
    R.apply(model, "rmeeto", r=0)
    assert torch.equal(model(x), y0)
    R.apply(model, "mtr", r=0.3)
    assert not torch.allclose(model(x), y0)
    R.remove(model)
    assert model.token_reducer is None and torch.equal(model(x), y0)
    assert not any(layer.mixer.record for layer in model.layers)


def test_final_token_count_schedule():
    model = tiny_vim(depth=8)
    reducer = R.apply(model, "rmeeto", r=4, final_tokens=40)
    counts = reducer.schedule.token_counts(reducer.method, 65, 8)
    assert [n for n, _ in counts] == [65, 65, 61, 61, 57, 57, 40, 40]
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(ValueError, match="r=37 tokens to merge, but only 28"):
        R.apply(model, "rmeeto", r=4, final_tokens=20)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rmeeto", r=40), "r=40 tokens to merge, but only 32 A-set candidates"),
    (dict(method="rmeeto", r=4, order="sideways"), "unknown order 'sideways'"),
    (dict(method="rmeeto", r=4, distance="cos"), "unknown distance 'cos'"),
    (dict(method="rmeeto", r=4, op="sum"), "unknown op 'sum'"),
    (dict(method="rmeeto", r=4, color="red"), "bad option for method 'rmeeto'"),
    (dict(method="mtr", r=0.6), "MTR ratio r must be in"),
    (dict(method="tome2", r=1), "unknown reduction method 'tome2'"),
    (dict(method="rmeeto"), "exactly one of r"),
    (dict(method="rmeeto", r=2, interval=9), "interval must be in"),
    (dict(method="rmeeto", r=2, blocks=[0, 2]), "blocks must be increasing and ≥ 1"),
    (dict(method="mtr", r=0.1, final_tokens=9), "final_tokens needs a token-count method"),
])
def test_bad_input_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R.apply(tiny_vim(), **kwargs)


def test_an_impossible_r_names_the_block_and_the_largest_r_that_works():
    with pytest.raises(ValueError) as err:
        R.apply(tiny_vim(), "rmeeto", r=30, interval=2)  # blocks 2, 4 on 65 tokens
    message = str(err.value)
    assert "before block 4 (35 tokens)" in message and "only 17 A-set candidates" in message
    assert "the largest r this schedule allows is 21" in message
    R.apply(tiny_vim(), "rmeeto", r=21, interval=2)  # and it does
    with pytest.raises(ValueError, match="largest r this schedule allows is 21"):
        R.apply(tiny_vim(), "rmeeto", r=22, interval=2)


@pytest.mark.parametrize("options", [
    dict(metric="delta"), dict(metric="B", distance="l1"), dict(metric="C", distance="l2", kth=2),
    dict(op="mean"), dict(op="max"), dict(op="min"), dict(order="odd_even"), dict(order="unordered"),
])
def test_every_rmeeto_ablation_runs_on_a_vim(options):
    model = tiny_vim()
    R.apply(model, "rmeeto", r=5, parity="odd", interval=3, **options)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.parametrize("options", [dict(variant="prune"), dict(variant="hybrid"), dict(indicator="B"),
                                     dict(indicator="C"), dict(indicator="cls")])
def test_every_mtr_ablation_runs_on_a_vim(options):
    model = tiny_vim()
    R.apply(model, "mtr", r=0.25, **options)
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


def test_works_under_torch_compile():
    torch.manual_seed(0)
    model = rmeeto.create_model("vim_demo", img_size=32, patch_size=8, embed_dim=16, depth=3).eval()
    R.apply(model, "rmeeto", r=3)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.parametrize("name,r,options", [("rmeeto", 8, {}), ("mtr", 0.3, {"indicator": "cls"}),
                                            ("rmeeto", 8, {"distance": "l2"}), ("evit", 0.3, {})])
def test_bf16_autocast_makes_the_same_merge_decisions(name, r, options):
    """Scores are fp32 with autocast off: the same tokens give the same plan under bf16 autocast."""
    model = tiny_vim()
    reducer = R.apply(model, name, r=r, blocks=[2], **options)
    state = random_state(b=4, n=65, c=16, p=32, seed=7)
    state.hidden, state.residual = state.hidden.float(), state.residual.float()
    plain = reducer(2, TokenState(state.hidden, state.residual, 32, state.size))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = reducer(2, TokenState(state.hidden, state.residual, 32, state.size))
    assert torch.equal(plain.cls_index, mixed.cls_index) and torch.equal(plain.size, mixed.size)
    assert torch.equal(plain.hidden, mixed.hidden)
