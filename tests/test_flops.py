"""FLOPs in the papers' convention (methods.md §4) and the FLOPs-cut solver."""

import pytest

import rmeeto
import rmeeto.reduction as R
from rmeeto.flops import count, count_config
from rmeeto.models import model_config
from rmeeto.models.deit import ViTConfig, create_deit
from rmeeto.reduction.methods import MTR, BipartiteMerge
from rmeeto.reduction.reducer import Schedule


@pytest.mark.parametrize("name,base,r,merged", [
    ("vim_tiny", 1.449, 5, 1.285), ("vim_small", 5.077, 11, 3.585), ("vim_base", 18.868, 11, 13.207)])
def test_papers_numbers_to_three_decimals(name, base, r, merged):
    cfg = model_config(name)
    assert round(count_config(cfg), 3) == base
    schedule = Schedule.every(cfg.depth, r)
    assert schedule.blocks == tuple(range(2, 24, 2))
    assert round(count_config(cfg, BipartiteMerge(), schedule), 3) == merged


@pytest.mark.parametrize("dim,paper,exact", [(192, 1.3, 1.2536832), (384, 4.6, 4.598882304),
                                               (768, 17.6, 17.563828224)])
def test_deit_numbers(dim, paper, exact):
    """DeiT-Ti/S/B at 224 (depth 12, MLP ratio 4): 12 blocks of 4nC² + 2n²C + 8nC² on n = 197 tokens,
    embedding 196·C·768, head 1000·C; e.g. Ti: 12 · 102 049 152 + 28 901 376 + 192 000 multiply-adds."""
    cfg = ViTConfig(img_size=224, patch_size=16, embed_dim=dim, depth=12, mlp_ratio=4.0, num_classes=1000)
    assert count_config(cfg) == pytest.approx(exact, abs=1e-9)
    assert round(count_config(cfg), 1) == paper


def test_deit_config_is_read_from_the_timm_model():
    model = create_deit("deit_tiny_patch16_224")
    assert model.cfg == ViTConfig(img_size=224, patch_size=16, embed_dim=192, depth=12, mlp_ratio=4.0,
                                  num_classes=1000)
    assert count(model) == count_config(model.cfg)


def test_count_follows_the_attached_reducer():
    model = rmeeto.create_model("vim_demo")
    base = count(model)
    R.apply(model, "rmeeto", r=4)
    reduced = count(model)
    assert reduced < base
    R.remove(model)
    assert count(model) == base
    assert count(model, img_size=128) > 3.9 * base  # 4× the tokens


@pytest.mark.parametrize("method", ["rmeeto", "mtr", "prune"])
@pytest.mark.parametrize("cut", [0.2, 0.3, 0.4])
def test_solver_hits_the_requested_cut(method, cut):
    cfg = model_config("vim_small")
    model = rmeeto.models.VisionMamba(cfg)
    R.apply(model, method, flops_cut=cut)
    achieved = 1 - count(model) / count_config(cfg)
    tolerance = 0.01 if method == "mtr" else 0.02  # r is an integer for the bipartite methods
    assert abs(achieved - cut) < tolerance


@pytest.fixture(scope="module")
def deit_small():
    return create_deit("deit_small_patch16_224")


@pytest.mark.parametrize("method,options", [("rmeeto", {}), ("evit", {}), ("mtr", {"indicator": "cls"})])
def test_solver_hits_the_requested_cut_on_deit(deit_small, method, options):
    R.apply(deit_small, method, flops_cut=0.3, **options)
    achieved = 1 - count(deit_small) / count_config(deit_small.cfg)
    assert abs(achieved - 0.3) < 0.01


def test_mtr_removes_int_ratio_of_candidates():
    assert MTR().removed(196, 0.1) == 19
    with pytest.raises(ValueError, match="ratio"):
        MTR().removed(196, 0.5)


def test_impossible_cut_is_an_error():
    model = rmeeto.create_model("vim_demo")
    with pytest.raises(ValueError, match="FLOPs cut"):
        R.apply(model, "rmeeto", flops_cut=0.95, blocks=[7])
