"""Merging inside ViT blocks (methods.md §5) against a literal, per-image reference of the rules, end to end
on a tiny timm ViT; the r cap; the hooks; FLOPs in the papers' convention."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import rmeeto
import rmeeto.reduction as R
from rmeeto.flops import count, count_config
from rmeeto.models.deit import ReducibleViT, create_deit
from rmeeto.reduction.vit import InBlockMerge, InBlockReduction, in_block_plan, max_merge

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny() -> tuple[ReducibleViT, Tensor]:
    """A tiny timm DeiT (32×32, patch 8 → 16 patches + cls, 4 blocks, 2 heads) with non-trivial weights."""
    torch.manual_seed(0)
    model = create_deit("deit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2,
                        num_classes=5).eval()
    with torch.no_grad():
        for p in model.parameters():  # break the near-identical tokens of timm's init
            p.add_(torch.randn_like(p) * 0.1)
    return model, torch.randn(3, 3, 32, 32)


# ---------------------------------------------------------------------------------------- reference of §5
def reference_attention(attn: torch.nn.Module, h: Tensor, size: list[float], prop: bool) -> Tensor:
    """N×C → N×C: softmax(q·kᵀ·scale + log(size of the key)) · v per head, then the projection."""
    n = h.shape[0]
    q, k, v = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)  # H×N×d each
    logits = q @ k.transpose(-1, -2) * attn.head_dim**-0.5
    if prop:
        logits = logits + torch.tensor(size).log()[None, None, :]
    return attn.proj((logits.softmax(-1) @ v).transpose(0, 1).reshape(n, -1))


def reference_metric(attn: torch.nn.Module, h: Tensor, x: Tensor, metric: str) -> Tensor:
    if metric == "x":
        return x
    n = h.shape[0]
    q, k, v = attn.qkv(h).reshape(n, 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    return {"q": q, "k": k, "v": v}[metric].mean(0)


def reference_merge(x: Tensor, size: list[float], metric: Tensor, r: int, order: str, prune: bool
                    ) -> tuple[Tensor, list[float]]:
    """One image, literally: A = even positions (cls = position 0, never a source), B = odd ones; each A
    token's best B by cosine; the r best-scoring A tokens join their partner (size-weighted) or vanish."""
    n = x.shape[0]
    r = min(r, (n - 1) // 2)
    unit = [metric[i] / metric[i].norm() for i in range(n)]
    a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
    best, score = {}, {}
    for a in a_pos:
        sims = [float(unit[a] @ unit[b]) for b in b_pos]
        j = max(range(len(b_pos)), key=lambda j: sims[j])
        best[a], score[a] = b_pos[j], (-math.inf if a == 0 else sims[j])
    ranked = sorted(a_pos, key=lambda a: -score[a])
    sources = set(ranked[:r])
    groups = {t: [t] for t in range(n) if t not in sources}
    if not prune:
        for a in sources:
            groups[best[a]].append(a)
    if order == "unordered":
        layout = sorted(a for a in a_pos if a not in sources) + b_pos
    else:
        layout = sorted(groups)
        if order == "odd_even":
            rest = layout[1:]
            layout = layout[:1] + rest[0::2] + rest[1::2]
    rows, sizes = [], []
    for t in layout:
        s = sum(size[i] for i in groups[t])
        rows.append(sum(x[i] * size[i] for i in groups[t]) / s)
        sizes.append(s)
    return torch.stack(rows), sizes


def reference_logits(model: ReducibleViT, image: Tensor, r: int, order: str = "ordered", prune: bool = False,
                     metric: str = "x", prop: bool = True) -> Tensor:
    """One image through the timm ViT with §5 merging in every block, token by token."""
    vit = model.vit
    x = vit._pos_embed(vit.patch_embed(image[None]))[0]
    size = [1.0] * x.shape[0]
    for block in vit.blocks:
        h = block.norm1(x)
        x = x + reference_attention(block.attn, h, size, prop)
        x, size = reference_merge(x, size, reference_metric(block.attn, h, x, metric), r, order, prune)
        x = x + block.mlp(block.norm2(x))
    return vit.head(vit.norm(x)[0])


CASES = [("rmeeto", {}), ("tome", {}), ("shuffle", {}), ("prune", {}), ("rmeeto", {"metric": "k"}),
         ("tome", {"metric": "q"}), ("rmeeto", {"metric": "v"}), ("rmeeto", {"prop_attn": False})]


@pytest.mark.parametrize("method,options", CASES)
@pytest.mark.parametrize("r", [3, 7])  # 7: more than (N − 1) // 2 from the second block on (17 → 10 → 6 → 4 → 3)
def test_logits_match_the_literal_reference(tiny, method, options, r):
    model, images = tiny
    order = {"tome": "unordered", "shuffle": "odd_even"}.get(method, "ordered")
    R.apply(model, method, r=r, **options)
    with torch.no_grad():
        got = model(images)
        want = torch.stack([reference_logits(model, im, r, order, method == "prune", options.get("metric", "x"),
                                             options.get("prop_attn", True)) for im in images])
    R.remove(model)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_orders_and_proportional_attention_change_the_logits(tiny):
    """The reference test would pass vacuously if the options did nothing: they do change the logits."""
    model, images = tiny
    outputs = {}
    for name, options in [("rmeeto", {}), ("tome", {}), ("shuffle", {}), ("rmeeto", {"prop_attn": False})]:
        R.apply(model, name, r=3, **options)
        with torch.no_grad():
            outputs[(name, *options)] = model(images)
    R.remove(model)
    values = list(outputs.values())
    assert all(not torch.allclose(a, b, atol=1e-4) for i, a in enumerate(values) for b in values[i + 1:])


# ---------------------------------------------------------------------------------------- plan and cap
def test_cap_is_the_a_tokens_besides_cls():
    assert [max_merge(n) for n in (1, 2, 3, 4, 5, 197)] == [0, 0, 1, 1, 2, 98]
    assert InBlockMerge().removed(196, 11) == 11 and InBlockMerge().removed(9, 11) == 4  # N = 10: (10−1)//2
    with pytest.raises(ValueError, match="integer"):
        InBlockMerge().removed(196, 2.5)


@pytest.mark.parametrize("n", [9, 10])
@pytest.mark.parametrize("order", ["ordered", "unordered", "odd_even"])
def test_plan_never_merges_cls_even_at_the_cap(n, order):
    torch.manual_seed(1)
    metric = torch.randn(4, n, 6)
    metric[:, 0] = metric[:, 1]  # cls identical to a B token: still never a source
    plan = in_block_plan(metric, r=100, order=order)
    assert plan.num_out == n - (n - 1) // 2
    assert (plan.dest[:, 0] == 0).all()
    assert ((plan.dest[:, 0:1] == plan.dest).sum(1) == 1).all(), "cls shares its slot with nobody"
    for image in plan.dest:
        assert sorted(set(image.tolist())) == list(range(plan.num_out))
        assert (image[1::2].unique().numel() == image[1::2].numel()), "B tokens keep their own slots"


def test_layouts_on_a_hand_made_example():
    """8 tokens, A = 0, 2, 4, 6 (cls = 0), B = 1, 3, 5, 7; token 4 matches 5 best, token 6 matches 1:
    r = 1 merges 4 → 5; ToMe's layout: unmerged A by position (0, 2, 6), then all B (1, 3, 5, 7)."""
    e = torch.eye(8)
    metric = e.clone()
    metric[4] = e[5] + 0.1 * e[4]
    metric[6] = e[1] + 0.5 * e[6]
    metric[2] = e[2] + 0.2 * e[7]
    plan = in_block_plan(metric[None], r=1, order="unordered")
    assert plan.dest[0].tolist() == [0, 3, 1, 4, 5, 5, 2, 6]
    ordered = in_block_plan(metric[None], r=1, order="ordered")
    assert ordered.dest[0].tolist() == [0, 1, 2, 3, 4, 4, 5, 6]
    shuffled = in_block_plan(metric[None], r=1, order="odd_even")  # after cls: 1 2 3 5 6 7 → 1 3 6 2 5 7
    assert shuffled.dest[0].tolist() == [0, 1, 4, 2, 5, 5, 3, 6]
    pruned = in_block_plan(metric[None], r=1, prune=True)
    assert pruned.dest[0].tolist() == [0, 1, 2, 3, -1, 4, 5, 6]


# ---------------------------------------------------------------------------------------- placement, hooks
def test_between_placement_is_kept_as_an_option(tiny):
    model, images = tiny
    between = R.apply(model, "rmeeto", r=3, placement="between")
    assert not isinstance(between, InBlockReduction) and between.schedule.blocks == (2,)
    with torch.no_grad():
        a = model(images)
    inside = R.apply(model, "rmeeto", r=3, placement="in_block")
    assert isinstance(inside, InBlockReduction) and inside.schedule.blocks == (0, 1, 2, 3)
    with torch.no_grad():
        b = model(images)
    R.remove(model)
    assert not torch.allclose(a, b, atol=1e-4)
    assert all(not block.attn._forward_pre_hooks for block in model.vit.blocks), "remove() takes the hooks out"
    with pytest.raises(ValueError, match="placement='between'"):
        R.apply(model, "evit", r=0.2, placement="in_block")
    with pytest.raises(ValueError, match="between blocks only"):
        R.apply(rmeeto.create_model("vim_demo", depth=4), "rmeeto", r=2, placement="in_block")
    with pytest.raises(ValueError, match="unknown metric 'delta' for InBlockMerge"):
        R.apply(model, "rmeeto", r=3, metric="delta")


def test_a_wrapper_that_hides_the_placement_is_caught(tiny):
    model, images = tiny
    reducer = R.apply(model, "rmeeto", r=3)
    model.token_reducer = lambda i, state: reducer(i, state)  # no inside_blocks: called between blocks
    with pytest.raises(RuntimeError, match="before that block's attention"):
        model(images)
    R.remove(model)
    torch.testing.assert_close(model(images), model.vit(images))


# ---------------------------------------------------------------------------------------- FLOPs
def test_flops_attention_on_n_mlp_on_n_minus_r_plus_matching():
    model = rmeeto.create_model("deit_demo")  # 65 tokens, C = 64, depth 6, MLP ratio 4
    base = count(model)
    R.apply(model, "rmeeto", r=4)
    c, total, n = 64, 64 * 64 * 8 * 8 * 3 + 64 * 10, 65
    for _ in range(6):
        total += 4 * n * c * c + 2 * n * n * c + 8 * (n - 4) * c * c  # projections and attention on N, MLP on N − r
        total += 6 * n * c + 2 * c * (n / 2) ** 2 + 4 * c  # matching on the N tokens entering the block
        n -= 4
    assert count(model) == pytest.approx(total / 1e9, rel=1e-12)
    assert base == pytest.approx(count_config(model.cfg))


def test_flops_cut_is_solved_for_the_in_block_placement():
    deit = create_deit("deit_small_patch16_224")
    base = count(deit)
    reducer = R.apply(deit, "rmeeto", flops_cut=0.3)
    assert isinstance(reducer, InBlockReduction)
    assert abs(1 - count(deit) / base - 0.3) < 0.01
    R.apply(deit, "rmeeto", r=11)  # the released DeiT-S default: 197 → 65 tokens
    counts = deit.token_reducer.schedule.token_counts(deit.token_reducer.method, 197, 12)
    assert counts[-1] == (197 - 11 * 11, 11)


# ---------------------------------------------------------------------------------------- registry, export
def test_demo_deit_is_a_registered_family_that_exports(tmp_path):
    from rmeeto import export

    torch.manual_seed(0)
    model = rmeeto.create_model("deit_demo", depth=2).eval()
    assert isinstance(model, ReducibleViT) and model.vit.blocks[0].norm1.eps == 1e-6  # timm's DeiT LayerNorm
    export.save(model, tmp_path / "deit")
    loaded = export.load(tmp_path / "deit")
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.cfg == model.cfg and {"vit.pos_embed", "vit.cls_token"} <= model.no_weight_decay()
