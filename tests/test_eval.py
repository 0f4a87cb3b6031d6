"""eval.py end to end on tiny VideoMamba (image and video), DeiT and Vim models: which rows the table has,
the FLOPs cuts reached, the files written, what is skipped or refused, and how errors read."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rmeeto
from rmeeto import eval_cli
from rmeeto.data.video_demo import write_video_demo_shards
from rmeeto.evaluate import (
    Row,
    accuracy,
    eval_datamodule,
    example_input,
    format_table,
    input_shape,
    model_normalisation,
)
from rmeeto.flops import count
from rmeeto.models import CheckpointError
from rmeeto.models.deit import create_deit

CUTS = (0.2, 0.3)
DEFAULT_METHODS = ["rmeeto", "prune", "mtr", "evit", "tome", "random"]
VIDEOMAMBA_IMAGE = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_classes=10, d_state=8)
VIDEOMAMBA_VIDEO = dict(depth=6, d_state=8)  # videomamba_demo: 32×32, 8 frames, patch 8, 4 classes
DEIT = dict(img_size=32, patch_size=4, embed_dim=32, depth=6, num_heads=2, num_classes=10)
VIM = dict(img_size=32, depth=4, embed_dim=32)  # vim_demo at 32×32: 16 patches of 8×8


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Moving digits, 32×32, 8 frames: 32 val clips (JPEG frames) in 2 shards, and a token train split."""
    return write_video_demo_shards(tmp_path_factory.mktemp("video_demo"), train=4, val=32, per_shard=16)


@pytest.fixture
def vim_checkpoint(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    torch.save(rmeeto.create_model("vim_demo", **VIM).state_dict(), tmp_path / "vim.pth")
    return tmp_path / "vim.pth"


def args(model: str, options: dict, checkpoint: Path, data: Path | None, out: Path, *extra: str) -> list[str]:
    argv = ["--model", model, "--checkpoint", str(checkpoint), "--batch_size", "120", "--workers", "0",
            "--speed_batch", "2", "--speed_reps", "2", "--device", "cpu", "--out", str(out), *extra]
    argv += ["--model_args", json.dumps(options)] if options else []
    return argv + (["--data", str(data)] if data else [])


def run_table(model: str, options: dict, checkpoint: Path, data: Path, out: Path, *extra: str) -> list[Row]:
    settings, _ = eval_cli.parse(args(model, options, checkpoint, data, out, "--training_free", "--cuts",
                                      json.dumps(list(CUTS)), *extra))
    return eval_cli.run(settings)


def check_table(rows: list[Row], out: Path, methods: list[str], tolerance: float) -> None:
    """One unreduced row, then every method at every cut with the achieved cut near the requested one."""
    assert (rows[0].method, rows[0].flops_cut, rows[0].speedup, rows[0].flops_speedup) == ("none", 0.0, 1.0, 1.0)
    assert [(r.method, r.target_cut) for r in rows[1:]] == [(m, c) for m in methods for c in CUTS]
    for row in rows[1:]:
        assert abs(row.flops_cut - row.target_cut) < tolerance, row
        assert row.gflops < rows[0].gflops and row.r > 0 and 0 <= row.top1 <= row.top5 <= 100
        assert row.images_per_s > 0 and row.speed_reps >= 2
        assert row.flops_speedup == pytest.approx(rows[0].gflops / row.gflops)
    saved = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in saved] == [r.method for r in rows]
    assert len((out / "results.csv").read_text().splitlines()) == len(rows) + 1
    assert (out / "accuracy_vs_gflops.png").read_bytes().startswith(b"\x89PNG")


def test_videomamba_image_model(demo_shards, tmp_path):
    torch.manual_seed(0)
    model = rmeeto.create_model("videomamba_tiny", **VIDEOMAMBA_IMAGE)
    torch.save(model.state_dict(), tmp_path / "videomamba.pth")
    rows = run_table("videomamba_tiny", VIDEOMAMBA_IMAGE, tmp_path / "videomamba.pth", demo_shards, tmp_path / "out")
    check_table(rows, tmp_path / "out", DEFAULT_METHODS, tolerance=0.01)
    assert rows[0].gflops == pytest.approx(count(model))


def test_videomamba_video_model(video_shards, tmp_path):
    torch.manual_seed(0)
    model = rmeeto.create_model("videomamba_demo", **VIDEOMAMBA_VIDEO)
    torch.save(model.state_dict(), tmp_path / "videomamba_video.pth")
    rows = run_table("videomamba_demo", VIDEOMAMBA_VIDEO, tmp_path / "videomamba_video.pth", video_shards,
                     tmp_path / "out", "--methods", "[rmeeto, mtr]")
    # A bipartite split removes at most half of the tokens at the first point: rmeeto reaches 27 % for 30 %.
    check_table(rows, tmp_path / "out", ["rmeeto", "mtr"], tolerance=0.035)
    assert rows[0].gflops == pytest.approx(count(model))


def test_deit_skips_mtr_by_default(demo_shards, tmp_path, capsys):
    torch.manual_seed(0)
    model = create_deit("deit_tiny_patch16_224", **DEIT)
    torch.save({"model": model.vit.state_dict()}, tmp_path / "deit.pth")  # nested as in the DeiT releases
    rows = run_table("deit_tiny_patch16_224", DEIT, tmp_path / "deit.pth", demo_shards, tmp_path / "out")
    assert "skipping mtr for ReducibleViT: MTR needs the Δ/B/C record" in capsys.readouterr().out
    # rmeeto/prune/tome merge inside all 6 blocks with one r: a step of r moves the cut by ~4 %
    check_table(rows, tmp_path / "out", [m for m in DEFAULT_METHODS if m != "mtr"], tolerance=0.025)
    assert rows[0].gflops == pytest.approx(count(model))


def test_deit_refuses_what_it_cannot_run(demo_shards, tmp_path):
    model = create_deit("deit_tiny_patch16_224", **DEIT)
    torch.save(model.vit.state_dict(), tmp_path / "deit.pth")
    with pytest.raises(ValueError, match="--methods mtr: MTR needs the Δ/B/C record"):
        run_table("deit_tiny_patch16_224", DEIT, tmp_path / "deit.pth", demo_shards, tmp_path / "out",
                  "--methods", "[rmeeto, mtr]")
    with pytest.raises(CheckpointError, match=r"deit\.pth: does not fit this model: .*missing.*'blocks\.6\."):
        run_table("deit_tiny_patch16_224", {**DEIT, "depth": 8}, tmp_path / "deit.pth", demo_shards, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown model 'vim_huge'"):
        run_table("vim_huge", {}, tmp_path / "deit.pth", demo_shards, tmp_path / "out")


def test_data_must_fit_the_model_classes(demo_shards, tmp_path):
    model = rmeeto.create_model("videomamba_demo", **VIDEOMAMBA_VIDEO)
    torch.save(model.state_dict(), tmp_path / "video.pth")
    with pytest.raises(ValueError, match="10 classes, the model predicts 4"):  # the digits images: 10 classes
        run_table("videomamba_demo", VIDEOMAMBA_VIDEO, tmp_path / "video.pth", demo_shards, tmp_path / "out")


def test_model_as_loaded_is_its_own_reference(vim_checkpoint, demo_shards, tmp_path):
    """Without --training_free a checkpoint is one row: no reducer, so nothing to be faster than."""
    rows = eval_cli.run(eval_cli.parse(args("vim_demo", VIM, vim_checkpoint, demo_shards, tmp_path / "out"))[0])
    assert [(r.method, r.speedup, r.speedup_spread, r.flops_cut) for r in rows] == [("as loaded", 1.0, 0.0, 0.0)]
    assert rows[0].images_per_s > 0 and rows[0].speed_reps >= 2


@pytest.mark.parametrize("cut,reason", [
    ("1.5", "--cuts 1.5: a FLOPs cut is a fraction in \\(0, 1\\)"),
    ("-0.2", "--cuts -0.2: a FLOPs cut is a fraction in \\(0, 1\\)"),
    ("0.99", "--cuts 0.99: no method reaches it on this model \\(rmeeto: no r .* reaches a 99% .*likewise"),
])
def test_impossible_cuts_exit_non_zero_with_the_reason(vim_checkpoint, demo_shards, tmp_path, capsys, cut, reason):
    code = eval_cli.main(args("vim_demo", VIM, vim_checkpoint, demo_shards, tmp_path / "out", "--training_free",
                              "--cuts", f"[0.2, {cut}]"))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert re.search(reason, err)
    assert not (tmp_path / "out" / "results.json").exists(), "refused before evaluating"


@pytest.mark.parametrize("case", ["random_bytes", "missing", "unknown_model", "no_data", "bad_flag", "no_image",
                                  "yaml_typo"])
def test_known_errors_are_one_line_naming_the_culprit(vim_checkpoint, demo_shards, tmp_path, capsys, case):
    bad = tmp_path / "random.pth"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "eval.yaml").write_text("model: vim_demo\ncutz: [0.2]\n")
    argv, expected, code = {
        "random_bytes": (args("vim_demo", VIM, bad, demo_shards, tmp_path / "o"), f"{bad}: not a readable", 1),
        "missing": (args("vim_demo", VIM, tmp_path / "nope.pth", demo_shards, tmp_path / "o"), "nope.pth", 1),
        "unknown_model": (args("vim_huge", {}, vim_checkpoint, demo_shards, tmp_path / "o"), "'vim_huge'", 1),
        "no_data": (args("vim_demo", VIM, vim_checkpoint, tmp_path / "empty", tmp_path / "o"),
                    "empty: neither shards", 1),
        "bad_flag": (["--cuts", "[0.2]", "--no_such_flag", "1"], "--no_such_flag", 2),
        "yaml_typo": (["--config", str(tmp_path / "eval.yaml")], "'cutz' is not accepted", 2),
        "no_image": (args("vim_demo", VIM, vim_checkpoint, None, tmp_path / "o", "--visualize", "nope.jpg"),
                     "--visualize nope.jpg: no such image file", 1),
    }[case]
    assert eval_cli.main(argv) == code
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "weights_only" not in err, "torch's advice to unpickle untrusted files is not echoed"


def test_debug_shows_the_traceback(vim_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="empty: neither shards"):
        eval_cli.main(args("vim_demo", VIM, vim_checkpoint, tmp_path / "empty", tmp_path / "o", "--debug"))


def test_out_is_checked_before_anything_runs(vim_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    # --data does not exist either: the --out error comes first, before the model or the data are read
    code = eval_cli.main(args("vim_demo", VIM, vim_checkpoint, tmp_path / "no_data", blocker / "out"))
    err = capsys.readouterr().err
    assert code == 1 and f"--out {blocker / 'out'} is not writable" in err


def test_visualize_draws_each_method_and_nothing_else(vim_checkpoint, tmp_path, monkeypatch, capsys):
    """--visualize writes one figure per method (named with method and cut) and neither demo shards nor
    an evaluation table."""
    monkeypatch.chdir(tmp_path)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save("cat.jpg")
    code = eval_cli.main(args("vim_demo", VIM, vim_checkpoint, None, tmp_path / "out", "--visualize", "cat.jpg",
                              "--methods", "[rmeeto, mtr]", "--cuts", "[0.2]"))
    assert code == 0, capsys.readouterr().err
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["merge_mtr_20_cat.png", "merge_rmeeto_20_cat.png"]
    assert not (tmp_path / "data").exists(), "no demo shards written"


def test_paper_accuracy_printed_beside_the_measured_one(vim_checkpoint, demo_shards, tmp_path, monkeypatch,
                                                        capsys):
    model = rmeeto.create_model("vim_demo", pretrained=vim_checkpoint, **VIM)
    model.pretrained_cfg = {"paper_top1": 80.5}
    monkeypatch.setattr(eval_cli, "load_model", lambda settings: model)
    rows = eval_cli.run(eval_cli.parse(args("vim_demo", VIM, vim_checkpoint, demo_shards, tmp_path / "out"))[0])
    assert f"measured top-1 {rows[0].top1:.2f} (paper: 80.5)" in capsys.readouterr().out


def test_normalisation_comes_from_the_model_when_it_says(demo_shards):
    model = rmeeto.create_model("vim_demo", **VIM)
    assert model_normalisation(model) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # timm's default cfg
    model.pretrained_cfg = {}
    assert model_normalisation(model) is None
    model.pretrained_cfg = {"mean": (0.5, 0.5, 0.5), "std": [0.25, 0.25, 0.25]}
    norm = model_normalisation(model)
    assert norm == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    dm = eval_datamodule(demo_shards, model, workers=0, normalisation=norm)
    images, _ = next(iter(dm.val_dataloader()))
    # digits are dark backgrounds (0) with bright strokes: (0 − 0.5) / 0.25 = −2 is the darkest value
    assert images.min().item() == pytest.approx(-2.0, abs=0.02)


def test_accuracy_counts_correct_predictions(demo_shards):
    torch.manual_seed(0)
    model = rmeeto.create_model("vim_demo", **VIM).eval()
    dm = eval_datamodule(demo_shards, model, batch_size=100, workers=0)
    correct = total = 0
    with torch.no_grad():
        for images, labels in dm.val_dataloader():
            correct += (model(images).argmax(1) == labels).sum().item()
            total += labels.numel()
    acc = accuracy(model, dm.val_dataloader(), dm.num_classes)
    assert acc["samples"] == total == 360
    assert acc["top1"] == pytest.approx(100 * correct / total)
    assert acc["top1"] <= acc["top5"]


def test_table_columns_stay_aligned_with_long_method_names():
    rows = [Row("none", 0.0, 0.0, 1.0, 99.0, 100.0, 10.0),
            Row("a_very_long_method_name_indeed", 0.3, 14, 0.7, 90.0, 99.0, 12.0, 0.3, 1.2, 0.05, 1.43, 7, False,
                "speed untrusted")]
    table = format_table(rows).split("\n\n")[0].splitlines()
    assert len({len(line) for line in table}) == 1, table
    end = table[0].index("GFLOPs") + len("GFLOPs")
    assert [line[end - 6:end] for line in table[2:]] == ["1.0000", "0.7000"]
    assert "1.20×±5%*" in table[3] and " 1: speed untrusted" in format_table(rows)


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
