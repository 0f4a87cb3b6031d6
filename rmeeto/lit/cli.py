"""The ``train.py`` command line: LightningCLI over :class:`RMeeToModule` and any LightningDataModule, with the
pipeline's callbacks, early checks and one-line errors.

Always present (configurable under these keys): ``checkpoint`` (:class:`FinalCheckpoint` writing ``last.ckpt``
every ``every_n_train_steps`` steps and at the end), ``lr_monitor`` (LearningRateMonitor), ``throughput``
(images/s), ``export`` (safetensors export at the end of fit when ``export.export_dir`` is set), ``exact_once``
(the exact-once validation check) and ``requeue_signal`` (SLURM's requeue signal handled by the training process
only, not by DataLoader workers). The module adds the EMA callback when ``model.ema_decay`` is set.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
import zipfile
from argparse import ArgumentError
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from rmeeto.data import ShardError
from rmeeto.lit.callbacks import (
    ExactOnceValidation,
    ExportCallback,
    FinalCheckpoint,
    ImageThroughput,
    RequeueSignalInMainProcess,
)
from rmeeto.lit.module import RMeeToModule
from rmeeto.models import CheckpointError
from rmeeto.models.deepspeed_checkpoint import is_deepspeed_checkpoint
from rmeeto.ops import backend_summary

#: Errors a user causes (bad checkpoint, corrupt shard, impossible r, unknown model, bad path, bad option): shown
#: as one line. Anything else keeps its traceback.
KNOWN_ERRORS = (ArgumentError, ValueError, OSError, ShardError)
DEBUG_FLAG, DEBUG_ENV = "--debug", "RMEETO_DEBUG"


def check_ckpt_path(ckpt_path: str | None, checkpoint_dir: str | None) -> None:
    """CheckpointError unless ``ckpt_path`` is None, a Lightning keyword or remote path, ``"last"`` with a
    ``last*.ckpt`` in ``checkpoint_dir`` (the ModelCheckpoint's naming, a file or a DeepSpeed directory), a
    zip-format torch checkpoint file, or a DeepSpeed checkpoint directory. Cheap checks only: the file is read
    once, by Lightning."""
    if ckpt_path is None or ckpt_path in ("best", "hpc") or ckpt_path.startswith("registry") or "://" in ckpt_path:
        return  # Lightning's own keywords, model-registry and remote (fsspec) paths: left to Lightning
    if ckpt_path == "last":
        if checkpoint_dir is None or not any(Path(checkpoint_dir).glob("last*.ckpt")):
            raise CheckpointError(f"--ckpt_path last: no last*.ckpt in checkpoint.dirpath {checkpoint_dir} "
                                  "(nothing to resume; leave --ckpt_path out for a fresh run)")
        return
    path = Path(ckpt_path)
    if path.is_dir():
        if not is_deepspeed_checkpoint(path):
            raise CheckpointError(f"--ckpt_path {path}: a directory but not a DeepSpeed checkpoint")
    elif not path.is_file():
        raise CheckpointError(f"--ckpt_path {path}: checkpoint not found")
    elif not zipfile.is_zipfile(path):
        raise CheckpointError(f"--ckpt_path {path}: not a PyTorch checkpoint (not in torch.save's zip format)")


class RMeeToCLI(LightningCLI):
    """LightningCLI with the pipeline's callbacks, the fit/validate/test subcommands and checks of
    ``--ckpt_path`` before anything is built."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {name: keys for name, keys in LightningCLI.subcommands().items() if name != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(FinalCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.every_n_train_steps": 500})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(ImageThroughput, "throughput")
        parser.add_lightning_class_args(ExportCallback, "export")
        parser.add_lightning_class_args(ExactOnceValidation, "exact_once")
        parser.add_lightning_class_args(RequeueSignalInMainProcess, "requeue_signal")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            config: Namespace = self.config[subcommand]
            check_ckpt_path(config.get("ckpt_path"), config.get("checkpoint.dirpath"))

    def _report_backend(self) -> None:
        device = self.trainer.strategy.root_device
        rank_zero_only(print)(backend_summary(device))

    before_fit = before_validate = before_test = _report_backend


def main(args: list[str] | None = None, **cli_kwargs: Any) -> RMeeToCLI:
    """Run the CLI on ``args`` (default: sys.argv); ``cli_kwargs`` go to LightningCLI (e.g. trainer_defaults).
    A bad option raises ``argparse.ArgumentError`` (not SystemExit after the usage text)."""
    parser_kwargs = {"exit_on_error": False, **cli_kwargs.pop("parser_kwargs", {})}
    return RMeeToCLI(RMeeToModule, L.LightningDataModule, subclass_mode_data=True,
                     save_config_kwargs={"overwrite": True}, args=args, parser_kwargs=parser_kwargs, **cli_kwargs)


#: Lines of a jsonargparse error that say what is wrong (not which union members were tried).
_REASON = re.compile(r"not accepted|does not accept|unrecognized|required|Expected a (?!path|<class 'NoneType'>)")


def argument_error_line(message: str) -> str:
    """One line for jsonargparse's nested error report: the full key and the reason, e.g.
    ``model.reduction: Option 'rr' is not accepted`` or ``model.lr: Expected a <class 'float'>. Got value: abc``."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) == 1:
        return lines[0]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    reason = next((line for line in lines if _REASON.search(line)), lines[-1])
    return f"{'.'.join(keys)}: {reason}" if keys else reason


def error_line(err: BaseException) -> str:
    """One line for a known error: its message (from a DataLoader worker: the worker's last traceback line)."""
    message = str(err).strip()
    if isinstance(err, ArgumentError):
        return argument_error_line(message)
    if "Original Traceback" in message:  # re-raised by the DataLoader with the worker's traceback in the message
        return message.splitlines()[-1].strip()
    return " ".join(f"{type(err).__name__}: {message}".split())


def run(argv: list[str] | None = None) -> int:
    """``train.py``'s entry point: :func:`main` on ``argv`` (default: sys.argv) with known errors printed as one
    line on stderr; the exit status. ``--debug`` (anywhere) or ``RMEETO_DEBUG=1`` shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        main(argv)
    except KNOWN_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"error: {error_line(err)}  [{DEBUG_FLAG} shows the traceback]", file=sys.stderr)
        return 2 if isinstance(err, ArgumentError) else 1
    leave_process_group()
    return 0


def leave_process_group() -> None:
    """Destroy torch.distributed's process group where the run made one (DDP, DeepSpeed; Lightning leaves it up): a
    gloo group left to the interpreter's exit can abort the process after a finished run (SIGABRT, "terminate called
    without an active exception"), which a scheduler counts as a failed job. Only after success: after an error the
    other ranks may still be inside a collective, which destroying the group would wait for."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
