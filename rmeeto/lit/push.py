"""Push the re-trained model to the Hugging Face Hub at the end of fit.

    python train.py fit --config configs/rmeeto_vim_s_paper.yaml \\
        --trainer.callbacks+=rmeeto.lit.push.PushToHub --trainer.callbacks.repo_id=user/vim-s-rmeeto
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from rmeeto import export


class PushToHub(Callback):
    """At the end of fit, export the module (:func:`rmeeto.export.save`, EMA weights when it keeps an EMA
    and ``use_ema``) and upload it with a model card (:func:`rmeeto.export.push_to_hub`) to ``repo_id``.

    export_dir: where the export is written first (default: a temporary folder). dataset: named on the
    model card beside the last validation top-1 (default: the datamodule's ``root``). Only global rank 0
    pushes; the token comes from ``token``, ``HF_TOKEN`` or ``hf auth login``.
    """

    def __init__(self, repo_id: str, export_dir: str | None = None, private: bool = False,
                 revision: str | None = None, token: str | None = None, use_ema: bool = True,
                 dataset: str | None = None) -> None:
        super().__init__()
        self.repo_id = repo_id
        self.export_dir = export_dir
        self.private = private
        self.revision = revision
        self.token = token
        self.use_ema = use_ema
        self.dataset = dataset
        self.url: str | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.fast_dev_run:
            return
        with tempfile.TemporaryDirectory(prefix="rmeeto-push-") as tmp:
            directory = Path(self.export_dir or Path(tmp) / "export")
            export.save(pl_module, directory, use_ema=self.use_ema, extra=self.notes(trainer, pl_module))
            self.url = export.push_to_hub(directory, self.repo_id, token=self.token, private=self.private,
                                          revision=self.revision)
        rank_zero_info(f"pushed the export to {self.url}")

    def notes(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, object]:
        """Step, epoch, and the last validation top-1 (%) of the exported weights with its dataset."""
        notes: dict[str, object] = {"global_step": trainer.global_step, "epoch": trainer.current_epoch}
        ema = getattr(getattr(pl_module, "frozen", None), "ema", None)
        key = "val_ema/acc1" if ema is not None and self.use_ema else "val/acc1"
        top1 = trainer.callback_metrics.get(key)
        if top1 is not None:
            notes["top1"] = round(100 * float(top1), 2)
            root = getattr(trainer.datamodule, "root", None) if trainer.datamodule is not None else None
            notes["dataset"] = self.dataset or (Path(str(root)).name if root else None)
        return notes
