"""Pictures: merge maps from a tiny Vim, the merge figure and the accuracy-vs-FLOPs plot."""

import numpy as np
import pytest
import torch

import rmeeto
import rmeeto.reduction as R
from rmeeto import viz
from rmeeto.models.deit import create_deit
from rmeeto.models.vim import TokenState
from rmeeto.reduction.reducer import Schedule

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLOCKS = (1, 2, 3)


@pytest.fixture(scope="module")
def vim():
    torch.manual_seed(0)
    return rmeeto.create_model("vim_demo", depth=4, embed_dim=32).eval()


@pytest.fixture(scope="module")
def image():
    return torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name,amount,prunes", [
    ("rmeeto", 8, False), ("mtr", 0.2, False), ("evit", 0.3, False), ("utr", 0.3, True), ("hsa", 0.3, True)])
def test_merge_maps_give_one_group_per_patch_and_one_group_per_token(vim, image, name, amount, prunes):
    maps = viz.merge_maps(vim, image, name, r=amount, blocks=BLOCKS)
    counts = Schedule(BLOCKS, (amount,) * 3).token_counts(R.make_method(name), 65, 4)
    assert list(maps) == list(BLOCKS), "one map per reduction point, keyed by block"
    for block, ids in maps.items():
        tokens = counts[block][0]
        assert ids.shape == (8, 8) and np.issubdtype(ids.dtype, np.integer)
        groups = np.unique(ids[ids >= 0])
        assert np.array_equal(groups, np.arange(tokens - 1)), "ids are the non-cls tokens, all present"
        assert ((ids == viz.DROPPED).any()) == prunes
    assert vim.token_reducer is None, "the model is left as it was"


@pytest.mark.parametrize("family", ["videomamba", "deit"])
@pytest.mark.parametrize("name,amount", [("rmeeto", 8), ("evit", 0.3)])
def test_merge_maps_follow_a_first_cls_token(image, family, name, amount):
    """VideoMamba (image) and DeiT put cls first, not in the middle: every patch is still in exactly one
    group and the groups are the non-cls tokens."""
    torch.manual_seed(0)
    if family == "deit":
        model = create_deit(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
    else:
        model = rmeeto.create_model("videomamba_tiny", img_size=64, patch_size=8, embed_dim=32, depth=4,
                                    num_classes=10, d_state=8)
    maps = viz.merge_maps(model.eval(), image, name, r=amount, blocks=BLOCKS)
    counts = Schedule(BLOCKS, (amount,) * 3).token_counts(R.make_method(name), 65, 4)
    for block, ids in maps.items():
        assert ids.shape == (8, 8) and (ids >= 0).all()
        assert np.array_equal(np.unique(ids), np.arange(counts[block][0] - 1))


def test_merge_maps_draw_image_models_only():
    video = rmeeto.create_model("videomamba_demo", depth=4)
    with pytest.raises(ValueError, match="image models.*video model"):
        viz.merge_maps(video, torch.randn(3, 8, 32, 32), "rmeeto", r=4)


def test_merge_maps_restore_a_previous_reducer(vim, image):
    previous = R.apply(vim, "mtr", r=0.2, blocks=[2])
    viz.merge_maps(vim, image[None], "rmeeto", r=4, blocks=[1])
    assert vim.token_reducer is previous and vim.layers[1].mixer.record
    R.remove(vim)


def test_merge_maps_take_one_image(vim, image):
    with pytest.raises(ValueError, match="one image"):
        viz.merge_maps(vim, torch.stack([image, image]), "rmeeto", r=4)


def test_group_map_reads_the_source_counts():
    # 5 original tokens (cls at 2), 3 out (cls at 1): token 0 holds patches 0 and 3, token 2 holds 1; 4 dropped.
    source = torch.tensor([[1, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.float32)
    ids = viz.group_map(source, cls_index=1, cls_origin=2, grid=(2, 2))
    assert ids.tolist() == [[0, 1], [0, viz.DROPPED]]


def test_draw_merge_maps_writes_a_png(vim, image, tmp_path):
    maps = viz.merge_maps(vim, image, "utr", r=0.3, blocks=BLOCKS)
    path = viz.draw_merge_maps(image, maps, tmp_path / "merge.png", title="utr at −30% FLOPs")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_group_colours_average_each_group_and_blacken_dropped():
    rgb = np.arange(12, dtype=float).reshape(2, 2, 3) / 12
    ids = np.array([[0, 0], [1, viz.DROPPED]])
    out = viz.group_colours(rgb, ids)
    np.testing.assert_allclose(out[0, 0], rgb[0].mean(0))
    np.testing.assert_allclose(out[1, 0], rgb[1, 0])
    assert np.all(out[1, 1] == 0)
    assert viz.borders(ids).tolist() == [[True, True], [True, False]]


def test_plot_accuracy_vs_flops_writes_a_png(tmp_path):
    rows = [{"method": "mtr", "gflops": 4.1, "top1": 78.8}, {"method": "mtr", "gflops": 3.0, "top1": 75.4},
            {"method": "evit", "gflops": 4.1, "top1": 75.8}]
    data = viz.plot_accuracy_vs_flops(rows, tmp_path / "acc.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000


def test_first_cls_index_reads_an_int_or_a_per_image_tensor():
    hidden = torch.zeros(2, 5, 4)
    assert viz.first_cls_index(TokenState(hidden, None, 2)) == 2
    assert viz.first_cls_index(TokenState(hidden, None, torch.tensor([3, 1]))) == 3
