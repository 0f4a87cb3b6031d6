"""Two-process DDP (gloo, CPU) on the demo shards: disjoint training data per rank, exact-once validation,
metrics reduced over ranks.

The test runs this file as a script; Lightning's ``ddp`` strategy then starts the second rank by running
the same command again, and each rank writes what it saw to ``<out>/rank<r>.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

STEPS, BATCH, VAL_SAMPLES = 3, 16, 360


def run_rank(shards: Path, out: Path) -> None:
    """One rank's fit: 3 training steps, then a full validation pass."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import Callback

    from rmeeto.data import WebDatasetDataModule, eval_transform, webdataset_dm
    from rmeeto.lit import RMeeToModule
    from rmeeto.lit.callbacks import ExactOnceValidation
    from rmeeto.lit.cli import leave_process_group

    torch.set_num_threads(1)

    def deterministic(img_size: int, augment: Any, mean: Any, std: Any):
        # Training images must identify their sample, so the random crop/flip is replaced by the eval transform.
        return eval_transform(img_size, mean, std)

    webdataset_dm.train_transform = deterministic

    class Recorder(Callback):
        def __init__(self) -> None:
            self.train_hashes: list[str] = []
            self.correct = self.seen = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.train_hashes += [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in batch[0]]

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            images, labels = batch
            self.correct += int((pl_module.model(images).argmax(-1) == labels).sum())
            self.seen += len(labels)

        def on_fit_end(self, trainer, pl_module) -> None:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "train": self.train_hashes,
                      "correct": self.correct, "seen": self.seen, "metrics": metrics}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    L.seed_everything(0)
    module = RMeeToModule(model_overrides={"img_size": 32, "depth": 3, "embed_dim": 32},
                          reduction={"method": "rmeeto", "r": 2}, lr=1e-3, ema_decay=0.9)
    data = WebDatasetDataModule(str(shards), img_size=32, batch_size=BATCH, num_workers=0, shuffle_buffer=100)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=STEPS,
                        num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Recorder(), ExactOnceValidation()])
    trainer.fit(module, datamodule=data)
    leave_process_group()  # as train.py does: without it the process can abort at exit (gloo's threads)
    assert not torch.distributed.is_initialized()


def test_two_rank_ddp_splits_training_data_and_counts_validation_once(demo_shards, tmp_path):
    # PYTHONPATH: the script must import this checkout's rmeeto, not whichever one the environment has installed
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, __file__, str(demo_shards), str(tmp_path)], env=env, timeout=170,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert result.returncode == 0, result.stdout[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    assert [r["world_size"] for r in ranks] == [2, 2]
    train = [set(r["train"]) for r in ranks]
    assert [len(r["train"]) for r in ranks] == [STEPS * BATCH] * 2
    assert all(len(t) == STEPS * BATCH for t in train)  # no sample twice within a rank…
    assert not train[0] & train[1]  # …nor on both ranks
    # Exact-once validation (ExactOnceValidation also asserts it against val_num_samples) and reduced metrics.
    assert sum(r["seen"] for r in ranks) == VAL_SAMPLES and all(r["seen"] > 0 for r in ranks)
    accuracy = sum(r["correct"] for r in ranks) / VAL_SAMPLES
    for r in ranks:
        assert r["metrics"]["val/samples"] == VAL_SAMPLES
        assert r["metrics"]["val/acc1"] == pytest.approx(accuracy, abs=1e-6)
        assert "val_ema/acc1" in r["metrics"]
    assert ranks[0]["metrics"]["val/loss"] == pytest.approx(ranks[1]["metrics"]["val/loss"])


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]), Path(sys.argv[2]))
