"""Callbacks of the re-training pipeline: EMA of the weights, the exact-once validation check, image throughput,
the final ``last.ckpt`` and the export at the end of fit."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.plugins.environments import SLURMEnvironment
from timm.utils import ModelEmaV3
from torch import Tensor

from rmeeto import export
from rmeeto.lit.precision import autocast_dtype, frozen_forward
from rmeeto.models import frozen


def batch_images(batch: Any) -> int:
    """Number of images in an ``(images B×3×H×W, labels B)`` batch."""
    return batch[0].shape[0]


def check_writable(directory: str | os.PathLike, what: str) -> None:
    """OSError naming ``what`` and the path unless a file can be written in ``directory`` (created for the probe
    and removed again if it did not exist). An actual write, as permission bits neither bind root nor show a
    read-only mount."""
    path = Path(directory)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise OSError(f"{what} {path} is not writable ({err.strerror or err})") from err
    if created:
        path.rmdir()


class EMA(Callback):
    """An fp32 exponential moving average (timm's ``ModelEmaV3``, ``decay``) of ``pl_module.model``.

    - Updated once per optimizer step (whenever ``trainer.global_step`` has moved), so gradient accumulation gives
      one update per step, also under DeepSpeed, which calls ``optimizer_step`` on every micro-batch.
    - Validated and tested next to the live weights, in the training precision, and logged as ``val_ema/*`` and
      ``test_ema/*`` through ``pl_module.log_eval``.
    - Saved in checkpoints as ``ema_state_dict`` and restored from them (``fit``, ``validate`` and ``test``).
    - Kept outside the module: not wrapped by DDP, not cast to bf16 by DeepSpeed, not in ``state_dict``.
    """

    def __init__(self, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.ema: ModelEmaV3 | None = None
        self._updated_at = 0  # trainer.global_step at the last update

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.ema is None:  # here, so that it exists when a checkpoint is restored
            self.ema = ModelEmaV3(pl_module.model, decay=self.decay, dtype=torch.float32).requires_grad_(False)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:  # a fresh run: start from the weights DDP has broadcast to every rank
            self._on_device(pl_module).set(pl_module.model)
        self._updated_at = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step > self._updated_at:
            self._on_device(pl_module).update(pl_module.model)
            self._updated_at = trainer.global_step

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(trainer, pl_module, batch, "val_ema")

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(trainer, pl_module, batch, "test_ema")

    def _evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, name: str) -> None:
        images, labels = batch
        logits = frozen_forward(self._on_device(pl_module).module, images, autocast_dtype(trainer.precision))
        pl_module.log_eval(name, logits, labels)

    def _on_device(self, pl_module: L.LightningModule) -> ModelEmaV3:
        """The EMA, moved to the module's device the first time it is used there."""
        assert self.ema is not None, "EMA used before setup"
        if next(self.ema.parameters()).device != pl_module.device:
            self.ema.to(pl_module.device)
        return self.ema

    def weights(self) -> dict[str, Tensor]:
        """The EMA's state dict (keys as the model's)."""
        assert self.ema is not None, "EMA used before setup"
        return self.ema.module.state_dict()

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint["ema_state_dict"] = self.weights()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("ema_state_dict")
        if state is not None and self.ema is not None:
            self.ema.module.load_state_dict(state)


class FrozenEval(Callback):
    """Runs each validation and test epoch inside :func:`rmeeto.frozen` for the module's ``model`` and the
    :class:`EMA` copies: their weights do not change within an epoch, so a Vim's forward takes the frozen path
    (its mixers' parameters laid out and packed once, and on the cpu backend each block one kernel call): a
    validation pass over the 360 demo images 1.13× as fast with a Vim-S (64×64, batch 32), 1.03× with the demo Vim,
    whose pass is mostly decoding. The scopes sit in one ExitStack, closed at the epoch's end or on an exception,
    so they end in the order they began."""

    def __init__(self) -> None:
        super().__init__()
        self._scopes: ExitStack | None = None

    def _open(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()
        emas = [cb.ema.module for cb in trainer.callbacks if isinstance(cb, EMA) and cb.ema is not None]
        with ExitStack() as scopes:
            for model in [pl_module.model, *emas]:
                scopes.enter_context(frozen(model))
            self._scopes = scopes.pop_all()

    def _close(self) -> None:
        scopes, self._scopes = self._scopes, None
        if scopes is not None:
            scopes.close()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._open(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()


def ema_weights(pl_module: L.LightningModule) -> dict[str, Tensor] | None:
    """The EMA weights of the run ``pl_module`` takes part in (its trainer's :class:`EMA`), None without one."""
    try:
        trainer = pl_module.trainer
    except RuntimeError:  # not attached to a Trainer
        return None
    ema = next((cb for cb in trainer.callbacks if isinstance(cb, EMA) and cb.ema is not None), None)
    return ema.weights() if ema is not None else None


@runtime_checkable
class ValidationSize(Protocol):
    """A datamodule that knows how many samples a full validation pass sees over all ranks."""

    @property
    def val_num_samples(self) -> int: ...


@runtime_checkable
class ValidationSkips(Protocol):
    """A datamodule that counts the validation samples its readers on this rank skipped as unreadable so far."""

    @property
    def val_skipped_samples(self) -> int: ...


@runtime_checkable
class Normalized(Protocol):
    """A datamodule that normalises images with a per-channel ``mean`` and ``std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


def normalization(datamodule: Any) -> dict[str, tuple[float, ...] | None]:
    """``mean``/``std`` keywords for :func:`rmeeto.export.save`: the datamodule's, else None (the model's own)."""
    if isinstance(datamodule, Normalized):
        return {"mean": tuple(datamodule.mean), "std": tuple(datamodule.std)}
    return {"mean": None, "std": None}


def skipped_samples(datamodule: Any) -> int:
    return datamodule.val_skipped_samples if isinstance(datamodule, ValidationSkips) else 0


class ExactOnceValidation(Callback):
    """After every full validation pass, check that the ranks together saw each sample exactly once: the images
    of all batches, summed over ranks, plus the samples skipped as unreadable during the pass (``on_error="skip"``),
    must equal the datamodule's ``val_num_samples``. Off without such a datamodule, during the sanity check and
    for partial passes (``limit_val_batches`` other than 1.0)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen = 0
        self._skipped_before = 0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._seen = 0
        self._skipped_before = skipped_samples(trainer.datamodule)

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._seen += batch_images(batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        datamodule, limit = trainer.datamodule, trainer.limit_val_batches
        if (trainer.sanity_checking or not isinstance(datamodule, ValidationSize)
                or not (isinstance(limit, float) and limit == 1.0)):
            return
        counts = torch.tensor([self._seen, skipped_samples(datamodule) - self._skipped_before],
                              dtype=torch.float64, device=pl_module.device)
        seen, skipped = (round(v) for v in trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        expected = datamodule.val_num_samples
        if seen + skipped != expected:
            raise RuntimeError(
                f"validation saw {seen} samples (+{skipped} skipped as unreadable) over {trainer.world_size} "
                f"rank(s) but the split has {expected}: samples were dropped or repeated (check how the val "
                "loader splits data over ranks and workers)"
            )


def main_process_only(signum: int) -> None:
    """Wrap the current Python handler of ``signum`` so that it runs only in this process: DataLoader workers
    forked later inherit the wrapper and ignore the signal."""
    handler = signal.getsignal(signum)
    if callable(handler):
        signal.signal(signum, partial(_run_in, os.getpid(), handler))


def _run_in(pid: int, handler: Callable[[int, FrameType | None], Any], signum: int, frame: FrameType | None) -> None:
    if os.getpid() == pid:
        handler(signum, frame)


class RequeueSignalInMainProcess(Callback):
    """Lets only the training process handle the SLURM requeue signal (``SIGUSR1``, or ``SLURMEnvironment``'s
    ``requeue_signal``). Slurm may deliver it to every process of the job step, and a forked DataLoader worker
    inherits Lightning's handler: it would save an HPC checkpoint and requeue the job from inside the worker.
    Applied after Lightning registers its handlers and before the first loader (sanity check or training)
    forks its workers."""

    def __init__(self) -> None:
        super().__init__()
        self._applied = False

    def _apply(self, trainer: L.Trainer) -> None:
        if self._applied:
            return
        environment = getattr(trainer.strategy, "cluster_environment", None)
        main_process_only(environment.requeue_signal if isinstance(environment, SLURMEnvironment) else
                          signal.SIGUSR1)
        self._applied = True

    def on_sanity_check_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._applied = False  # Lightning restores the original handlers at teardown


class ImageThroughput(ThroughputMonitor):
    """Lightning's ThroughputMonitor for ``(images, labels)`` batches: logs images/s per process as
    ``train/device/samples_per_sec`` (and over all ranks as ``train/samples_per_sec`` when there are
    several), the same under ``validate/``, averaged over the last ``window_size`` batches."""

    def __init__(self, window_size: int = 20, **kwargs: Any) -> None:
        super().__init__(batch_size_fn=batch_images, window_size=window_size, **kwargs)


class FinalCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that, with ``save_last=True``, also writes ``last.ckpt`` when training ends, and checks at
    the start of fit that ``dirpath`` is writable (not after the first hours of training).

    Lightning's writes it at train end only if nothing was saved before, so with ``every_n_train_steps``
    the steps after the last multiple would be missing from ``last.ckpt`` (and from ``--ckpt_path last``).
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.dirpath is not None:
            check_writable(self.dirpath, "checkpoint.dirpath")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last is not True or trainer.fast_dev_run or self.dirpath is None:
            super().on_train_end(trainer, pl_module)
            return
        path = os.path.join(self.dirpath, self.CHECKPOINT_NAME_LAST + self.FILE_EXTENSION)
        trainer.save_checkpoint(path, weights_only=self.save_weights_only)
        self.last_model_path = path


class ExportCallback(Callback):
    """At the end of fit, write ``export_dir/model.safetensors`` + ``config.json`` with
    :func:`rmeeto.export.save` (EMA weights when the run keeps an EMA and ``use_ema``); off when
    ``export_dir`` is None. Only global rank 0 writes; every rank checks at the start of fit that
    ``export_dir`` is writable."""

    def __init__(self, export_dir: str | None = None, use_ema: bool = True) -> None:
        super().__init__()
        self.export_dir = export_dir
        self.use_ema = use_ema

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self.export_dir is not None:
            check_writable(self.export_dir, "export.export_dir")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.export_dir is None or not trainer.is_global_zero:
            return
        export.save(pl_module, self.export_dir, use_ema=self.use_ema, **normalization(trainer.datamodule),
                    extra={"global_step": trainer.global_step, "epoch": trainer.current_epoch})
