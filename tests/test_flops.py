"""FLOPs in the papers' convention (methods.md §4) and the FLOPs-cut solver."""

import pytest

import rmeeto
import rmeeto.reduction as R
from rmeeto.flops import count, count_config
from rmeeto.models import model_config
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


def test_mtr_removes_int_ratio_of_candidates():
    assert MTR().removed(196, 0.1) == 19
    with pytest.raises(ValueError, match="ratio"):
        MTR().removed(196, 0.5)


def test_impossible_cut_is_an_error():
    model = rmeeto.create_model("vim_demo")
    with pytest.raises(ValueError, match="FLOPs cut"):
        R.apply(model, "rmeeto", flops_cut=0.95, blocks=[7])
