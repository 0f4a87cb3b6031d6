"""Re-train a token-reduced Vision Mamba with LightningCLI.

    python train.py fit --config configs/demo.yaml
    python train.py fit --config configs/demo.yaml --ckpt_path last      # resume the killed run
    python train.py validate --config configs/demo.yaml --ckpt_path last
    python train.py fit --config configs/demo.yaml --print_config        # the merged config

Always present (configurable under these keys): ``checkpoint`` (ModelCheckpoint writing ``last.ckpt`` every
``every_n_train_steps`` steps and at the end), ``lr_monitor`` (LearningRateMonitor), ``throughput``
(images/s), ``export`` (safetensors export at the end of fit when ``export.export_dir`` is set).
See docs/launch.md for SLURM, torchrun and multi-node runs.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from rmeeto.lit import ExportCallback, FinalCheckpoint, ImageThroughput, RMeeToModule


class RMeeToCLI(LightningCLI):
    """LightningCLI with the pipeline's callbacks and the fit/validate/test subcommands."""

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


def main(args: list[str] | None = None, **cli_kwargs: Any) -> RMeeToCLI:
    """Run the CLI on ``args`` (default: sys.argv); ``cli_kwargs`` go to LightningCLI (e.g. trainer_defaults)."""
    return RMeeToCLI(
        RMeeToModule,
        L.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        **cli_kwargs,
    )


if __name__ == "__main__":
    main()
