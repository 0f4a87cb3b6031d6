"""Callbacks of the re-training pipeline: image throughput and the export at the end of fit."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ThroughputMonitor

from rmeeto import export


def batch_images(batch: Any) -> int:
    """Number of images in an ``(images B×3×H×W, labels B)`` batch."""
    return batch[0].shape[0]


class ImageThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for ``(images, labels)`` batches: logs images/s per process as
    ``train/device/samples_per_sec`` (and over all ranks as ``train/samples_per_sec`` when there are
    several), the same under ``validate/``, averaged over the last ``window_size`` batches."""

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_images, window_size=window_size, **kwargs)


class FinalCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that, with ``save_last=True``, also writes ``last.ckpt`` when training ends.

    Lightning's writes it at train end only if nothing was saved before, so with ``every_n_train_steps``
    the steps after the last multiple would be missing from ``last.ckpt`` (and from ``--ckpt_path last``).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last is not True or trainer.fast_dev_run or self.dirpath is None:
            super().on_train_end(trainer, pl_module)
            return
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path, weights_only=self.save_weights_only)
        self.last_model_path = path


class ExportCallback(Callback):
    """At the end of fit, write ``export_dir/model.safetensors`` + ``config.json`` with
    :func:`rmeeto.export.save` (EMA weights when the module keeps an EMA and ``use_ema``); off when
    ``export_dir`` is None. Only global rank 0 writes."""

    def __init__(self, export_dir: str | None = None, use_ema: bool = True) -> None:
        super().__init__()
        self.export_dir = export_dir
        self.use_ema = use_ema

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.export_dir is None or not trainer.is_global_zero:
            return
        export.save(pl_module, self.export_dir, use_ema=self.use_ema,
                    extra={"global_step": trainer.global_step, "epoch": trainer.current_epoch})
