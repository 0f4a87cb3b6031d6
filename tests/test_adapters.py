"""One ``rmeeto.reduction.apply`` for VideoMamba (image and video), DeiT and a generic Mamba block list:
token counts, cls position, token order and sizes, for rmeeto, prune and mtr."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

import rmeeto
import rmeeto.reduction as R
from rmeeto.flops import count
from rmeeto.models.deit import ReducibleViT, create_deit
from rmeeto.models.generic import MambaBlocks
from rmeeto.models.mamba import RMSNorm
from rmeeto.models.vim import Block, TokenState, VimConfig
from rmeeto.reduction.merge import odd_even

DEPTH, CLASSES, DIM = 6, 5, 32


pytestmark = pytest.mark.usefixtures("one_thread")


class PatchTokens(nn.Module):
    """A user's embedding for the generic adapter: 8×8 patches, cls first, learned positions."""

    def __init__(self, img_size: int = 48):
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, DIM))
        self.pos = nn.Parameter(torch.randn(1, (img_size // 8) ** 2 + 1, DIM) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(len(x), -1, -1), tokens], dim=1) + self.pos


def generic_model(plain_mixers: bool = False) -> MambaBlocks:
    blocks = nn.ModuleList(Block(VimConfig(embed_dim=DIM, d_state=8), 0.0) for _ in range(DEPTH))
    if plain_mixers:  # a mixer that cannot record Δ (like mamba-ssm's fused Mamba)
        for block in blocks:
            block.mixer = nn.Linear(DIM, DIM)
    return MambaBlocks(PatchTokens(), blocks, RMSNorm(DIM), nn.Linear(DIM, CLASSES), num_tokens=37, embed_dim=DIM)


def build(kind: str) -> tuple[nn.Module, Tensor]:
    """A tiny model of each family and an input batch of 2 (37 tokens; the video model 65)."""
    torch.manual_seed(0)
    image = torch.randn(2, 3, 48, 48)
    if kind == "videomamba_image":
        return rmeeto.create_model("videomamba_tiny", img_size=48, patch_size=8, embed_dim=DIM, depth=DEPTH,
                                   num_classes=CLASSES, d_state=8), image
    if kind == "videomamba_video":
        model = rmeeto.create_model("videomamba_tiny_k400_f8", img_size=32, patch_size=8, embed_dim=DIM,
                                    depth=DEPTH, num_classes=CLASSES, num_frames=4, d_state=8)
        return model, torch.randn(2, 3, 4, 32, 32)
    if kind == "deit":
        return create_deit(img_size=48, patch_size=8, embed_dim=DIM, num_heads=2, depth=DEPTH,
                           num_classes=CLASSES), image
    return generic_model(), image


@dataclass
class Point:
    """One reduction point as the reducer saw it (copied: the blocks overwrite the returned state)."""

    block: int
    n_in: int
    cls_in: int
    source_in: Tensor
    had_residual: bool
    n_out: int
    cls_out: int
    residual_out: tuple[int, ...] | None
    size_out: Tensor
    source_out: Tensor


def first_cls(state: TokenState) -> int:
    """The cls index, which these families (cls at index 0) keep the same for every image."""
    assert (state.cls_index == state.cls_index[0]).all()
    return int(state.cls_index[0])


def run_traced(model: nn.Module, x: Tensor, method: str, amount: float, **options) -> tuple[Tensor, list[Point]]:
    """Logits of ``model`` reduced by ``method`` (tracking sources) and what happened at each point."""
    reducer = R.apply(model, method, r=amount, track_source=True, **options)
    points: list[Point] = []

    def traced(block: int, state: TokenState) -> TokenState:
        n_in, cls_in = state.hidden.shape[1], first_cls(state)
        out = reducer(block, state)
        if out is not state:
            residual = None if out.residual is None else tuple(out.residual.shape)
            points.append(Point(block, n_in, cls_in, state.source, state.residual is not None, out.hidden.shape[1],
                                first_cls(out), residual, out.size.clone(), out.source.clone()))
        return out

    traced.inside_blocks = getattr(reducer, "inside_blocks", False)  # where the model calls the reducer
    model.token_reducer = traced
    with torch.no_grad():
        logits = model(x)
    R.remove(model)
    return logits, points


def survivors(point: Point, image: int, b_parity: int = 1) -> list[int]:
    """Per output slot but cls, the candidate index (cls removed) of the token that kept its slot: the only
    token in it, or for a bipartite group the B token the A tokens merged into (B = odd candidates; inside
    ViT blocks, where cls takes part in the split, odd positions of all tokens = even candidates)."""
    members = torch.einsum("km,nm->kn", point.source_out[image], point.source_in[image]) > 0
    out = []
    for slot in range(point.n_out):
        if slot == point.cls_out:
            continue
        tokens = [j - (j > point.cls_in) for j in members[slot].nonzero().flatten().tolist()]
        kept = tokens if len(tokens) == 1 else [t for t in tokens if t % 2 == b_parity]
        assert len(kept) == 1, tokens
        out.append(kept[0])
    return out


def check_points(points: list[Point], n0: int, method: str, amount: float, order: str = "ordered",
                 blocks: tuple[int, ...] = tuple(range(2, DEPTH, 2)), b_parity: int = 1) -> None:
    assert tuple(p.block for p in points) == blocks
    for p in points:
        removed = int(amount * (p.n_in - 1)) if method == "mtr" else int(amount)
        assert removed > 0 and p.n_out == p.n_in - removed
        assert p.cls_in == 0 and p.cls_out == int(p.cls_in * (p.n_in - removed) / p.n_in) == 0
        assert p.residual_out == ((2, p.n_out, DIM) if p.had_residual else None)
        torch.testing.assert_close(p.size_out, p.source_out.sum(-1))  # a size counts original tokens
        if method == "prune":
            assert (p.size_out == 1).all()  # nothing merged: every survivor is one original token
        else:
            assert (p.size_out.sum(1) == n0).all()  # every original token is in exactly one slot
        assert (p.source_out[:, 0, 0] == 1).all() and (p.source_out[:, 0].sum(-1) == 1).all()  # cls alone
        if method == "mtr":
            continue  # MTR's survivors are told apart by Δ, not position: order is checked on its prune variant
        for image in range(2):
            kept = survivors(p, image, b_parity)
            expected = sorted(kept)
            if order == "odd_even":
                expected = odd_even(torch.tensor([expected]))[0].tolist()
            assert kept == expected


KINDS = ["videomamba_image", "videomamba_video", "deit", "generic"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["rmeeto", "prune", "mtr"])
def test_reducers_keep_the_invariants_on_every_family(kind, method):
    model, x = build(kind)
    amount = {"rmeeto": 4, "prune": 4, "mtr": 0.2}[method]
    if kind == "videomamba_video" and method != "mtr":
        amount = 8
    options = {"indicator": "cls"} if kind == "deit" and method == "mtr" else {}
    logits, points = run_traced(model.eval(), x, method, amount, **options)
    assert logits.shape == (2, CLASSES) and torch.isfinite(logits).all()
    if kind == "deit" and method != "mtr":  # the authors' ViT placement: inside every block
        check_points(points, model.cfg.num_patches + 1, method, amount, blocks=tuple(range(DEPTH)), b_parity=0)
    else:
        check_points(points, model.cfg.num_patches + 1, method, amount)


@pytest.mark.parametrize("kind", ["videomamba_video", "deit"])
def test_mtr_keeps_the_token_order(kind):
    model, x = build(kind)
    options = {"indicator": "cls"} if kind == "deit" else {}
    _, points = run_traced(model.eval(), x, "mtr", 0.2, variant="prune", **options)
    for p in points:
        assert all(survivors(p, image) == sorted(survivors(p, image)) for image in range(2))


@pytest.mark.parametrize("kind", ["deit", "videomamba_image"])
def test_ordered_vs_odd_even_runs(kind):
    """One merge point, survivors placed in order or odd-even shuffled: a ViT (no order after the
    embedding) gives the same logits either way up to float rounding, a Mamba does not (R-MeeTo's order
    study). With more points the shuffle also changes what the next bipartite split pairs up."""
    model, x = build(kind)
    ordered, _ = run_traced(model.eval(), x, "rmeeto", 4, blocks=[2])
    shuffled, points = run_traced(model, x, "rmeeto", 4, blocks=[2], order="odd_even")
    check_points(points, model.cfg.num_patches + 1, "rmeeto", 4, order="odd_even", blocks=(2,),
                 b_parity=0 if kind == "deit" else 1)
    same = torch.allclose(ordered, shuffled, atol=1e-4)
    assert same == (kind == "deit")


def test_adapters_without_reduction_are_the_wrapped_models():
    model, x = build("deit")
    assert isinstance(model, ReducibleViT)
    torch.testing.assert_close(model(x), model.vit(x))
    assert set(model.state_dict()) == {f"vit.{k}" for k in model.vit.state_dict()}

    generic, x = build("generic")
    hidden, residual = generic.embed_tokens(x), None
    for block in generic.layers:
        hidden, residual = block(hidden, residual)
    torch.testing.assert_close(generic(x), generic.head(generic.norm_f(residual + hidden)[:, 0]))


def test_delta_methods_need_a_recording_mixer():
    model = generic_model(plain_mixers=True)
    with pytest.raises(ValueError, match=r"MTR needs the Δ/B/C record.*model\.layers\[1\]"):
        R.apply(model, "mtr", r=0.2)
    R.apply(model, "rmeeto", r=4)  # a hidden-state method needs nothing from the mixer
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, CLASSES)
    deit, _ = build("deit")
    with pytest.raises(ValueError, match="indicator='cls'"):
        R.apply(deit, "mtr", r=0.2)


def test_flops_for_deit_but_not_for_other_models():
    deit, _ = build("deit")
    base = count(deit)
    R.apply(deit, "rmeeto", flops_cut=0.2)
    assert abs(1 - count(deit) / base - 0.2) < 0.02
    generic, _ = build("generic")
    with pytest.raises(TypeError, match="Vim, VideoMamba and DeiT/ViT models only, not for MambaBlocks"):
        count(generic)
    with pytest.raises(TypeError, match="Vim, VideoMamba and DeiT/ViT"):
        R.apply(generic, "rmeeto", flops_cut=0.2)
    with pytest.raises(TypeError, match="not for VisionTransformer"):
        count(deit.vit)


def test_vit_needs_a_single_cls_token():
    import timm

    with pytest.raises(ValueError, match="prefix token"):
        ReducibleViT(timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, depth=1))
    with pytest.raises(TypeError, match="not a Linear"):
        ReducibleViT(nn.Linear(2, 2))
