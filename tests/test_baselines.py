"""Training-free baselines (EViT, PuMer, UTR, HSA, random drop): plans and their effect on a tiny Vim."""

import pytest
import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto.flops import count
from rmeeto.models.vim import TokenState
from rmeeto.reduction.baselines import (
    HSA,
    UTR,
    EViT,
    PuMer,
    RandomDrop,
    activation_importance,
    classified_plan,
    fuse_plan,
)
from rmeeto.reduction.merge import Merge, Plan
from rmeeto.reduction.signals import Signals

NAMES = ["evit", "pumer", "utr", "hsa", "random"]
DETERMINISTIC = ["evit", "pumer", "utr", "hsa"]
RATIOS = [0.0, 0.1, 0.3, 0.5]


def signals(b: int = 3, m: int = 20, c: int = 8, seed: int = 0) -> Signals:
    g = torch.Generator().manual_seed(seed)
    return Signals(hidden=torch.randn(b, m, c, generator=g, dtype=torch.float64),
                   cls=torch.randn(b, c, generator=g, dtype=torch.float64),
                   cls_index=torch.randint(0, m + 1, (b,), generator=g))


def increasing_hosts(groups: list[list[int]]) -> bool:
    """Whether one token per slot can be picked so that the picks increase with the slot
    (survivors in original order); greedy smallest feasible pick decides it."""
    last = -1
    for group in groups:
        later = [t for t in group if t > last]
        if not later:
            return False
        last = min(later)
    return True


def slot_groups(plan: Plan, row: int) -> list[list[int]]:
    dest = plan.dest[row].tolist()
    return [[t for t, d in enumerate(dest) if d == k] for k in range(plan.num_out)]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", NAMES)
def test_plan_removes_exactly_removed_and_keeps_order(name, ratio):
    method, sig = R.make_method(name), signals()
    m = sig.hidden.shape[1]
    plan = method.plan(sig, method.removed(m, ratio))
    assert plan.num_out == m - method.removed(m, ratio)
    assert plan.dest.min() >= -1 and plan.dest.max() < plan.num_out
    for row in range(plan.dest.shape[0]):
        groups = slot_groups(plan, row)
        assert all(groups), "every output slot holds at least one token"
        assert increasing_hosts(groups)


@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
@pytest.mark.parametrize("name", NAMES)
def test_sizes_add_up(name, ratio):
    method, sig = R.make_method(name), signals()
    m = sig.hidden.shape[1]
    removed = method.removed(m, ratio)
    plan = method.plan(sig, removed)
    sizes = Merge(plan, torch.ones(3, m, dtype=torch.float64)).sizes()
    dropped = {"evit": 0, "pumer": 0, "utr": int(0.5 * removed), "hsa": removed, "random": removed}[name]
    assert torch.all(sizes.sum(1) == m - dropped)
    if name in ("hsa", "random"):
        assert torch.all(sizes == 1)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_batched_plan_equals_per_image_plans(name):
    method, sig = R.make_method(name), signals(b=4)
    removed = method.removed(20, 0.3)
    batched = method.plan(sig, removed)
    for i in range(4):
        one = method.plan(Signals(sig.hidden[i:i + 1], sig.cls[i:i + 1], sig.cls_index[i:i + 1]), removed)
        assert torch.equal(one.dest[0], batched.dest[i]) and one.cls_slot[0] == batched.cls_slot[i]


def test_random_drop_is_seeded_and_draws_anew_for_every_image_and_batch():
    sig = signals(b=4)
    first, again = RandomDrop(seed=3), RandomDrop(seed=3)
    plans = [first.plan(sig, 8).dest for _ in range(3)]
    assert all(torch.equal(p, again.plan(sig, 8).dest) for p in plans), "same seed, same run"
    assert not torch.equal(plans[0], RandomDrop(seed=4).plan(sig, 8).dest)
    assert not torch.equal(plans[0], plans[1]), "a second batch gets new draws"
    assert len({tuple(row.tolist()) for row in plans[0]}) == 4, "each image draws its own tokens"


@pytest.mark.parametrize("name", NAMES)
def test_cls_goes_back_after_exactly_the_survivors_before_it(name):
    method, sig = R.make_method(name), signals(b=4)
    plan = method.plan(sig, method.removed(20, 0.3))
    for i in range(4):
        groups = slot_groups(plan, i)
        q = int(plan.cls_slot[i])
        # cls as a token between candidates p − 1 and p: the slots with it still have increasing hosts
        cls = [int(sig.cls_index[i]) - 0.5]
        assert increasing_hosts(groups[:q] + [cls] + groups[q:])


def test_evit_fuses_the_least_cls_similar_tokens_at_the_most_important_of_them():
    sig = signals(b=2, m=12)
    removed = EViT().removed(12, 0.25)
    plan = EViT().plan(sig, removed)
    importance = torch.cosine_similarity(sig.hidden, sig.cls[:, None], dim=-1)
    for row in range(2):
        fused = importance[row].argsort()[:removed + 1]
        slot = plan.dest[row, fused]
        assert torch.all(slot == slot[0]), "the inattentive tokens share one slot"
        assert (plan.dest[row] == slot[0]).sum() == removed + 1
        host = int(fused[-1])
        assert int(slot[0]) == sum(1 for t in range(host) if t not in fused.tolist())


def test_fuse_plan_of_one_or_no_token_keeps_everything():
    imp = torch.rand(2, 6)
    for n in (0, 1):
        assert torch.equal(fuse_plan(imp, n).dest, torch.arange(6).expand(2, 6))


def test_utr_prunes_the_less_important_reduced_tokens_and_merges_the_rest_into_set_b():
    sig = signals(b=1, m=16)
    imp = activation_importance(sig.hidden)
    plan = classified_plan(imp, sig.hidden, 6, prune_frac=0.5)
    set_a = set(imp[0].argsort()[:8].tolist())
    dest = plan.dest[0]
    dropped = [t for t in range(16) if dest[t] < 0]
    groups = [g for g in slot_groups(plan, 0) if len(g) > 1]
    merged = [t for g in groups for t in g if t in set_a]
    assert len(dropped) == 3 and len(merged) == 3 and set(dropped) | set(merged) <= set_a
    assert max(imp[0, dropped]) <= min(imp[0, merged])
    assert all(sum(t not in set_a for t in g) == 1 for g in groups), "each merge has one set-B host"


def test_activation_importance_variants():
    x = torch.tensor([[[1.0, -2.0, 3.0]]])
    assert activation_importance(x, "clip").item() == pytest.approx(4 / 3)
    assert activation_importance(x, "l1").item() == pytest.approx(6)
    assert activation_importance(x, "raw").item() == pytest.approx(2 / 3)
    assert activation_importance(x, "l2").item() == pytest.approx(14 ** 0.5)


@pytest.mark.parametrize("name,options,word", [
    ("utr", {"q": 1.5}, "q"),
    ("utr", {"score": "l3"}, "score"),
    ("hsa", {"score": "max"}, "score"),
    ("evit", {"op": "sum"}, "op"),
    ("pumer", {"op": "median"}, "op"),
    ("hsa", {"op": "mean"}, "op"),
    ("random", {"seed": "x"}, "seed"),
    ("evit", {"bogus": 1}, "bogus"),
])
def test_bad_options_are_value_errors_naming_the_option(name, options, word):
    with pytest.raises(ValueError, match=word):
        R.make_method(name, **options)


@pytest.mark.parametrize("method,ratio", [
    (EViT(), 1.0), (EViT(), -0.1), (PuMer(), 0.6), (UTR(), 0.51), (HSA(), 1.0), (RandomDrop(), 1.2)])
def test_bad_ratios_are_value_errors(method, ratio):
    with pytest.raises(ValueError, match="ratio"):
        method.removed(64, ratio)


# --- on a tiny Vim ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vim():
    torch.manual_seed(0)
    return rmeeto.create_model("vim_demo", depth=4, embed_dim=32).eval()


def run_points(model, name: str, ratio: float, images: torch.Tensor):
    """Logits and the (incoming, outgoing) TokenState of each reduction point (blocks 1, 2, 3)."""
    reducer = R.apply(model, name, r=ratio, blocks=[1, 2, 3], track_source=True)
    points: list[tuple[TokenState, TokenState]] = []

    def recording(block, state):
        after = reducer(block, state)
        points.append((state, after))
        return after

    model.token_reducer = recording
    try:
        with torch.no_grad():
            logits = model(images)
    finally:
        model.token_reducer = reducer
        R.remove(model)
    return logits, points


@pytest.mark.parametrize("name", NAMES)
def test_reduction_points_on_vim(vim, name):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    method = R.make_method(name)
    _, points = run_points(vim, name, 0.3, images)
    n0, p0 = 65, 32
    for before, after in points:
        n = before.hidden.shape[1]
        removed = method.removed(n - 1, 0.3)
        assert after.hidden.shape[1] == after.residual.shape[1] == n - removed
        for row in range(2):
            q = int(after.cls_index[row])
            assert torch.equal(after.source[row, q], torch.nn.functional.one_hot(torch.tensor(p0), n0).float())
            others = torch.cat([after.source[row, :q], after.source[row, q + 1:]])
            assert others[:, p0].sum() == 0, "no other token holds the cls token"
            assert torch.equal(others.sum(-1), torch.cat([after.size[row, :q], after.size[row, q + 1:]]))
            groups = [torch.nonzero(r).flatten().tolist() for r in others]
            assert increasing_hosts(groups[:q] + [[p0]] + groups[q:]), "survivors and cls in sequence order"


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_batched_logits_equal_per_image_logits(vim, name):
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    batched, _ = run_points(vim, name, 0.3, images)
    singles = torch.cat([run_points(vim, name, 0.3, images[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)


def test_random_drop_on_vim_is_reproducible(vim):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    first, _ = run_points(vim, "random", 0.3, images)
    again, _ = run_points(vim, "random", 0.3, images)
    assert torch.equal(first, again)


@pytest.mark.parametrize("name", NAMES)
def test_flops_cut_is_solved_and_counted(vim, name):
    base = count(vim)
    R.apply(vim, name, flops_cut=0.2, interval=1)
    try:
        assert 1 - count(vim) / base == pytest.approx(0.2, abs=0.05)
    finally:
        R.remove(vim)
