"""eval.py --training-free end to end on tiny VideoMamba (image and video) and DeiT models: which rows the
table has, the FLOPs cuts reached, the files written, and what is skipped or refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

import rmeeto
from rmeeto.data.video_demo import write_video_demo_shards
from rmeeto.evaluate import example_input, input_shape
from rmeeto.flops import count
from rmeeto.models import CheckpointError
from rmeeto.models.deit import create_deit

ROOT = Path(__file__).resolve().parents[1]
CUTS = (0.2, 0.3)
DEFAULT_METHODS = ["rmeeto", "prune", "mtr", "evit", "tome", "random"]
VIDEOMAMBA_IMAGE = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_classes=10, d_state=8)
VIDEOMAMBA_VIDEO = dict(depth=6, d_state=8)  # videomamba_demo: 32×32, 8 frames, patch 8, 4 classes
DEIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=10)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eval_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rmeeto_eval_script", ROOT / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Moving digits, 32×32, 8 frames: 32 val clips (JPEG frames) in 2 shards, and a token train split."""
    return write_video_demo_shards(tmp_path_factory.mktemp("video_demo"), train=4, val=32, per_shard=16)


def model_args(options: dict) -> list[str]:
    return ["--model-args", *(f"{key}={value}" for key, value in options.items())] if options else []


def run_eval(eval_script: ModuleType, model: str, options: dict, checkpoint: Path, data: Path, out: Path,
             *extra: str) -> list:
    return eval_script.main(["--training-free", "--model", model, *model_args(options), "--checkpoint",
                             str(checkpoint), "--data", str(data), "--cuts", *map(str, CUTS), "--batch-size", "120",
                             "--workers", "0", "--speed-batch", "2", "--device", "cpu", "--out", str(out), *extra])


def check_table(rows: list, out: Path, methods: list[str], tolerance: float) -> None:
    """One unreduced row, then every method at every cut with the achieved cut near the requested one."""
    assert (rows[0].method, rows[0].flops_cut, rows[0].speedup) == ("none", 0.0, 1.0)
    assert [(r.method, r.target_cut) for r in rows[1:]] == [(m, c) for m in methods for c in CUTS]
    for row in rows[1:]:
        assert abs(row.flops_cut - row.target_cut) < tolerance, row
        assert row.gflops < rows[0].gflops and row.amount > 0 and 0 <= row.top1 <= row.top5 <= 100
        assert row.images_per_s > 0
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved] == [r.method for r in rows]
    assert len((out / "results.csv").read_text().splitlines()) == len(rows) + 1
    assert (out / "accuracy_vs_gflops.png").read_bytes().startswith(b"\x89PNG")


def test_videomamba_image_model(eval_script, demo_shards, tmp_path):
    torch.manual_seed(0)
    model = rmeeto.create_model("videomamba_tiny", **VIDEOMAMBA_IMAGE)
    torch.save(model.state_dict(), tmp_path / "videomamba.pth")
    rows = run_eval(eval_script, "videomamba_tiny", VIDEOMAMBA_IMAGE, tmp_path / "videomamba.pth", demo_shards,
                    tmp_path / "out")
    check_table(rows, tmp_path / "out", DEFAULT_METHODS, tolerance=0.01)
    assert rows[0].gflops == pytest.approx(count(model))


def test_videomamba_video_model(eval_script, video_shards, tmp_path):
    torch.manual_seed(0)
    model = rmeeto.create_model("videomamba_demo", **VIDEOMAMBA_VIDEO)
    torch.save(model.state_dict(), tmp_path / "videomamba_video.pth")
    rows = run_eval(eval_script, "videomamba_demo", VIDEOMAMBA_VIDEO, tmp_path / "videomamba_video.pth",
                    video_shards, tmp_path / "out", "--methods", "rmeeto", "mtr")
    # A bipartite split removes at most half of the tokens at the first point: rmeeto reaches 27 % for 30 %.
    check_table(rows, tmp_path / "out", ["rmeeto", "mtr"], tolerance=0.035)
    assert rows[0].gflops == pytest.approx(count(model))


def test_deit_skips_mtr_by_default(eval_script, demo_shards, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_deit("deit_tiny_patch16_224", **DEIT)
    torch.save({"model": model.vit.state_dict()}, tmp_path / "deit.pth")  # nested as in the DeiT releases
    rows = run_eval(eval_script, "deit_tiny_patch16_224", DEIT, tmp_path / "deit.pth", demo_shards, tmp_path / "out")
    assert "skipping mtr for ReducibleViT: MTR needs the Δ/B/C record" in capsys.readouterr().out
    # rmeeto/prune/tome merge inside all 6 blocks with one r: a step of r moves the cut by ~4 %
    check_table(rows, tmp_path / "out", [m for m in DEFAULT_METHODS if m != "mtr"], tolerance=0.025)
    assert rows[0].gflops == pytest.approx(count(model))


def test_deit_refuses_what_it_cannot_run(eval_script, demo_shards, tmp_path):
    model = create_deit("deit_tiny_patch16_224", **DEIT)
    torch.save(model.vit.state_dict(), tmp_path / "deit.pth")
    with pytest.raises(SystemExit, match="--methods mtr: MTR needs the Δ/B/C record"):
        run_eval(eval_script, "deit_tiny_patch16_224", DEIT, tmp_path / "deit.pth", demo_shards, tmp_path / "out",
                 "--methods", "rmeeto", "mtr")
    with pytest.raises(CheckpointError, match=r"deit\.pth: does not fit this model: .*missing.*'blocks\.6\."):
        run_eval(eval_script, "deit_tiny_patch16_224", {**DEIT, "depth": 8}, tmp_path / "deit.pth", demo_shards,
                 tmp_path / "out")
    with pytest.raises(SystemExit, match="unknown model 'vim_huge'"):
        run_eval(eval_script, "vim_huge", {}, tmp_path / "deit.pth", demo_shards, tmp_path / "out")


def test_data_must_fit_the_model_classes(eval_script, demo_shards, tmp_path):
    model = rmeeto.create_model("videomamba_demo", **VIDEOMAMBA_VIDEO)
    torch.save(model.state_dict(), tmp_path / "video.pth")
    with pytest.raises(SystemExit, match="10 classes, the model predicts 4"):  # the digits images: 10 classes
        run_eval(eval_script, "videomamba_demo", VIDEOMAMBA_VIDEO, tmp_path / "video.pth", demo_shards,
                 tmp_path / "out")


@pytest.mark.parametrize("name,options,shape", [
    ("vim_demo", {}, (3, 64, 64)),
    ("videomamba_demo", {}, (3, 8, 32, 32)),
    ("deit", DEIT, (3, 32, 32)),
])
def test_example_input_follows_the_model(name, options, shape):
    model = create_deit(**options) if name == "deit" else rmeeto.create_model(name, **options)
    assert input_shape(model) == shape
    assert input_shape(model, img_size=48)[-2:] == (48, 48)
    x = example_input(model, 2)
    assert x.shape == (2, *shape)
    with torch.no_grad():
        assert model.eval()(x).shape == (2, model.num_classes)
