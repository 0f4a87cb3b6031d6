"""The bundled digits demo's fixed parts, shared by ``demo.py``, ``eval.py`` and ``scripts/results.py``:
where the demo checkpoint, data and recipe live, its evaluation data, and its re-training run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import lightning as L
from torch import nn

from rmeeto.evaluate import eval_datamodule, model_normalisation

CHECKPOINT = Path("checkpoints/vim_demo")  # an rmeeto.export directory (configs/demo_pretrain.yaml)
DATA = Path("data/demo")
CONFIG = Path("configs/demo.yaml")
METHODS = ["rmeeto", "prune", "mtr", "evit", "tome", "random"]
CUTS = [0.1, 0.2, 0.3]  # three merge points in 8 blocks cannot take bipartite merging to −40 %
SPEED_BATCH = 64  # at batch 8 this 26-MFLOP model is all per-op overhead: speed would not follow FLOPs


def load_base(root: Path = Path(".")) -> nn.Module:
    """The demo Vim as exported, in eval mode; a missing export names the command that rebuilds it."""
    from rmeeto.export import load

    if not (root / CHECKPOINT).exists():
        raise FileNotFoundError(f"{root / CHECKPOINT} missing: rebuild it with "
                                "`.venv/bin/python train.py fit --config configs/demo_pretrain.yaml`")
    return load(root / CHECKPOINT)


def val_data(model: nn.Module, root: Path = Path("."), workers: int = 1) -> L.LightningDataModule:
    """The demo's validation DataModule (360 digits, written on first use) for ``model``, normalised as the
    model says (its pretrained_cfg) or else as the shards' index does."""
    from rmeeto.data.demo import ensure_demo_shards

    shards = ensure_demo_shards(root / DATA)
    return eval_datamodule(shards, model, batch_size=120, workers=workers, normalisation=model_normalisation(model))


def retrain(run_dir: Path, *overrides: str, root: Path = Path(".")) -> float:
    """Run the demo's R-MeeTo re-training (``train.py fit --config configs/demo.yaml``, outputs and export
    under ``run_dir``, then ``overrides``) in a child process; returns its wall seconds."""
    run_dir = Path(run_dir).resolve()
    command = [sys.executable, "train.py", "fit", "--config", str(CONFIG), "--model.pretrained", str(CHECKPOINT),
               "--trainer.default_root_dir", str(run_dir), "--trainer.logger.init_args.save_dir", str(run_dir),
               "--checkpoint.dirpath", str(run_dir / "checkpoints"), "--export.export_dir", str(run_dir / "export"),
               *overrides]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=root)
    return time.perf_counter() - start
