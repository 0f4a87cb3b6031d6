"""Lightning pipeline: training, optimiser groups, LR schedule, distillation, EMA, resume, DeepSpeed config."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from conftest import load_script
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import SingleDeviceStrategy
from timm.utils import ModelEmaV3

from rmeeto.data import Augment, WebDatasetDataModule
from rmeeto.lit import EMA, ExactOnceValidation, Reduction, RMeeToModule, distillation_loss
from rmeeto.lit.callbacks import ema_weights
from rmeeto.lit.optim import cosine_schedule, param_groups
from rmeeto.lit.precision import autocast_dtype, enable_tf32, frozen_forward

ROOT = Path(__file__).resolve().parents[1]
TINY = {"img_size": 32, "depth": 4, "embed_dim": 32}  # 16 patches + cls on the 32×32 demo shards
REDUCTION = {"method": "rmeeto", "r": 2}  # before block 2: 17 → 15 tokens


@pytest.fixture(autouse=True)
def one_thread_and_clean_argv(monkeypatch):
    """Tiny models on a shared 2-core machine run fastest single-threaded; LightningCLI(args=…) runs
    below must not see pytest's own command line."""
    monkeypatch.setattr(sys, "argv", ["train.py"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_train_script() -> Any:
    return load_script(ROOT / "train.py", "rmeeto_train_script")


def datamodule(root: Path, batch_size: int = 16) -> WebDatasetDataModule:
    return WebDatasetDataModule(str(root), img_size=32, batch_size=batch_size, num_workers=0, shuffle_buffer=200,
                                augment=Augment(auto_augment=None, reprob=0.0))


def trainer(**kwargs: Any) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_short_fit_lowers_the_loss_and_keeps_an_ema(demo_shards):
    L.seed_everything(0)
    module = RMeeToModule(model_overrides=TINY, reduction=REDUCTION, lr=2e-3, min_lr=1e-5, warmup_steps=3,
                          mixup=0.0, cutmix=0.0, label_smoothing=0.0, ema_decay=0.9)
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    recorder = LossRecorder()
    fit = trainer(max_steps=100, limit_val_batches=0, callbacks=[recorder])
    fit.fit(module, datamodule=datamodule(demo_shards))

    # Over 100 steps the mean loss drops by ≈ 0.25-0.3 (repeated runs; the shuffle buffer is not seeded).
    first, last = recorder.losses[:15], recorder.losses[-15:]
    assert len(recorder.losses) == 100
    assert sum(last) / len(last) < sum(first) / len(first) - 0.15, recorder.losses
    # The schedule reached its floor at the last step; every group kept its weight decay.
    optimizer = fit.optimizers[0]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-5, 1e-5])
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, 0.05]
    assert optimizer.defaults["fused"]  # one kernel for all tensors, CPU included
    (ema_callback,) = [cb for cb in fit.callbacks if isinstance(cb, EMA)]  # added by the module for ema_decay
    ema = ema_callback.weights()
    live = module.model.state_dict()
    assert not torch.allclose(ema["head.weight"], live["head.weight"])
    assert not torch.allclose(ema["head.weight"], start["head.weight"])
    assert not any(k.startswith("frozen") for k in module.state_dict())  # the EMA is not in state_dict


def test_bf16_mixed_precision_with_gradient_accumulation(demo_shards):
    """The recipes' bf16-mixed + accumulate_grad_batches=2, on CPU autocast: the optimiser steps once per
    two batches, weights stay fp32 and change, the loss stays finite."""
    module = RMeeToModule(model_overrides=TINY, reduction=REDUCTION, lr=1e-3, mixup=0.0, cutmix=0.0)
    start = module.model.head.weight.detach().clone()
    recorder = LossRecorder()
    fit = trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed", accumulate_grad_batches=2,
                  callbacks=[recorder])
    fit.fit(module, datamodule=datamodule(demo_shards))
    assert fit.global_step == 3 and len(recorder.losses) == 6  # 6 batches, 3 optimiser steps
    assert all(math.isfinite(loss) for loss in recorder.losses)
    assert module.model.head.weight.dtype == torch.float32
    assert not torch.equal(module.model.head.weight, start)


def test_no_weight_decay_on_norms_biases_ssm_params_and_embeddings():
    module = RMeeToModule(model_overrides=TINY)
    names = {id(p): n for n, p in module.model.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in param_groups(module.model, 0.05)}
    no_decay, decay = groups[0.0], groups[0.05]
    assert no_decay | decay == set(names.values()) and not no_decay & decay
    assert {"pos_embed", "cls_token", "layers.0.mixer.A_log", "layers.0.mixer.A_b_log", "layers.0.mixer.D",
            "layers.0.mixer.D_b", "norm_f.weight", "layers.0.norm.weight", "head.bias", "patch_embed.proj.bias",
            "layers.0.mixer.dt_proj.bias", "layers.0.mixer.conv1d_b.bias"} <= no_decay
    assert {"head.weight", "patch_embed.proj.weight", "layers.0.mixer.in_proj.weight",
            "layers.0.mixer.x_proj_b.weight", "layers.0.mixer.conv1d.weight"} <= decay
    assert all(name.endswith(".weight") and "norm" not in name for name in decay), decay


def test_cosine_schedule_endpoints():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=2e-5)
    schedule = cosine_schedule(optimizer, total_steps=100, min_lr=1e-6, warmup_steps=10, warmup_lr=1e-7)

    def lr_at(step: int) -> float:
        schedule.step_update(step)
        return optimizer.param_groups[0]["lr"]

    assert lr_at(0) == pytest.approx(1e-7)
    assert lr_at(5) == pytest.approx(1e-7 + (2e-5 - 1e-7) / 2)
    assert lr_at(10) == pytest.approx(2e-5)
    assert lr_at(55) == pytest.approx((2e-5 + 1e-6) / 2)
    assert lr_at(100) == pytest.approx(1e-6)
    assert lr_at(1000) == pytest.approx(1e-6)
    plain = cosine_schedule(torch.optim.AdamW([param], lr=3e-4), total_steps=10, min_lr=0.0)
    plain.step_update(0)
    assert plain.optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)
    with pytest.warns(UserWarning, match="warming up for 9 steps"):
        short = cosine_schedule(optimizer, total_steps=10, min_lr=0.0, warmup_steps=50)
    assert short.warmup_t == 9


def test_distillation_loss_is_the_authors_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    p_t = teacher.softmax(-1)
    expected = (p_t * (p_t.log() - student.log_softmax(-1))).sum(-1).mean()
    assert distillation_loss(student, teacher) == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_trains_the_student_only(demo_shards):
    L.seed_everything(0)
    module = RMeeToModule(model_overrides=TINY, reduction=REDUCTION, distill=True, lr=1e-3)
    teacher = module.frozen.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    assert teacher.token_reducer is None and module.model.token_reducer is not None
    fit = trainer(max_steps=3, limit_val_batches=0)
    fit.fit(module, datamodule=datamodule(demo_shards))

    assert {"train/loss", "train/loss_cls", "train/loss_kd"} <= set(fit.callback_metrics)
    assert fit.callback_metrics["train/loss_kd"] > 0
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    optimized = {id(p) for g in fit.optimizers[0].param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert not torch.equal(module.model.head.weight, teacher.head.weight)


class MiscountedData(WebDatasetDataModule):
    """Claims one more validation sample than the split has, as a loader dropping one would look."""

    @property
    def val_num_samples(self) -> int:
        return super().val_num_samples + 1


def test_validation_that_misses_samples_is_an_error(demo_shards):
    module = RMeeToModule(model_overrides=TINY, reduction=REDUCTION)
    data = MiscountedData(str(demo_shards), img_size=32, batch_size=60, num_workers=0)
    message = r"validation saw 360 samples \(\+0 skipped as unreadable\) over 1 rank.* split has 361"
    with pytest.raises(RuntimeError, match=message):
        trainer(callbacks=[ExactOnceValidation()]).validate(module, datamodule=data)
    fresh = RMeeToModule(model_overrides=TINY, reduction=REDUCTION)
    trainer(callbacks=[ExactOnceValidation()]).validate(fresh, datamodule=datamodule(demo_shards, batch_size=60))


def wait_for_checkpoint(path: Path, process: subprocess.Popen, min_step: int, timeout: float = 90) -> None:
    """Until ``path`` is a readable checkpoint with global_step ≥ ``min_step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-3000:]
        if path.is_file():
            try:
                if torch.load(path, map_location="cpu", weights_only=False)["global_step"] >= min_step:
                    return
            except Exception:  # caught mid-write: try again
                pass
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint at step ≥ {min_step} in {path}")


class ResumeProbe(Callback):
    """Records the state right after the resume, then stops after ``steps`` more optimizer steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.start: dict[str, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = {
            "global_step": trainer.global_step,
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
            "ema": {k: v.clone() for k, v in ema_weights(pl_module).items()},
            "model": {k: v.clone() for k, v in pl_module.model.state_dict().items()},
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.start["global_step"] + self.steps:
            trainer.should_stop = True


def test_killed_run_resumes_step_lr_and_ema(demo_shards, tmp_path):
    max_steps = 400
    args = [
        "--config", str(ROOT / "configs/demo.yaml"),
        "--model.pretrained", "null",
        "--model.model_overrides", yaml.safe_dump(TINY, default_flow_style=True).strip(),
        "--model.reduction", yaml.safe_dump(REDUCTION, default_flow_style=True).strip(),
        "--model.lr", "1e-3", "--model.warmup_steps", "2", "--model.ema_decay", "0.99",
        "--trainer.val_check_interval", "1.0",
        "--data.init_args.root", str(demo_shards), "--data.init_args.img_size", "32",
        "--data.init_args.batch_size", "16", "--data.init_args.num_workers", "0",
        "--trainer.max_steps", str(max_steps), "--trainer.max_epochs", "-1", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.logger.init_args.save_dir", str(tmp_path / "run"),
        "--checkpoint.dirpath", str(tmp_path / "ckpt"), "--checkpoint.every_n_train_steps", "2",
        "--export.export_dir", "null",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "fit", *args], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_checkpoint(tmp_path / "ckpt" / "last.ckpt", process, min_step=4)
    finally:
        process.send_signal(signal.SIGKILL)
        process.communicate()
    killed = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    step = killed["global_step"]
    assert 4 <= step < max_steps

    probe = ResumeProbe(steps=3)
    cli = load_train_script().main(["fit", *args, "--ckpt_path", "last"], trainer_defaults={"callbacks": [probe]})

    start = probe.start
    assert start["global_step"] == step
    assert start["lr"] == pytest.approx(killed["optimizer_states"][0]["param_groups"][0]["lr"])
    assert all(torch.equal(v, killed["ema_state_dict"][k]) for k, v in start["ema"].items())
    assert all(torch.equal(v, killed["state_dict"][f"model.{k}"]) for k, v in start["model"].items())
    # Three more steps on the original schedule (warm-up 2, cosine to 1e-5 at max_steps), not a restart.
    assert cli.trainer.global_step == step + 3
    progress = (step + 3 - 2) / (max_steps - 2)
    expected_lr = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * progress))
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(expected_lr)
    ema_now = ema_weights(cli.model)
    assert not torch.equal(ema_now["head.weight"], start["ema"]["head.weight"])
    final = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["global_step"] == step + 3  # saved at the end although not a multiple of every_n_train_steps
    assert torch.equal(final["ema_state_dict"]["head.weight"], ema_now["head.weight"])


def print_config(args: list[str], capsys: pytest.CaptureFixture) -> dict[str, Any]:
    with pytest.raises(SystemExit) as exit_info:
        load_train_script().main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (0, None)
    # deepspeed, when installed, logs "[date] [WARNING] …" lines to stdout on import: not part of the config
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[")]
    return yaml.safe_load("\n".join(lines))


def test_recipe_configs_parse(capsys):
    for size in ("ti", "s", "b"):
        for kind in ("paper", "official"):
            config = print_config(["--config", str(ROOT / f"configs/rmeeto_vim_{size}_{kind}.yaml"),
                                   "--trainer", str(ROOT / "configs/trainer/h100_1x8.yaml"),
                                   "--trainer", str(ROOT / "configs/strategy/ddp.yaml")], capsys)
            model = config["model"]
            assert model["lr"] == 2e-5 and model["min_lr"] == 1e-6 and model["weight_decay"] == 0.05
            assert model["reduction"]["r"] == {"ti": 5, "s": 11, "b": 11}[size]
            assert model["distill"] == (kind == "official")
            assert model["pretrained"].startswith(f"hf-hub:hustvl/Vim-{dict(ti='tiny', s='small', b='base')[size]}")
            assert model["ema_decay"] == (0.996 if size == "b" else None)
            trainer_config = config["trainer"]
            assert trainer_config["devices"] == 8 and trainer_config["num_nodes"] == 1
            assert trainer_config["precision"] == "bf16-mixed" and trainer_config["max_epochs"] == 3
            assert trainer_config["accumulate_grad_batches"] == 2
            assert config["data"]["init_args"]["batch_size"] == 128
            assert trainer_config["strategy"]["class_path"].endswith("DDPStrategy")
    config = print_config(["--config", str(ROOT / "configs/rmeeto_vim_s_paper.yaml"),
                           "--trainer", str(ROOT / "configs/trainer/h100_4x8.yaml")], capsys)
    assert config["trainer"]["num_nodes"] == 4 and config["trainer"]["devices"] == 8
    config = print_config(["--config", str(ROOT / "configs/demo_pretrain.yaml")], capsys)
    assert config["model"]["reduction"] is None and config["export"]["export_dir"] == "checkpoints/vim_demo"
    config = print_config(["--config", str(ROOT / "configs/demo.yaml"),
                           "--trainer", str(ROOT / "configs/trainer/slurm_requeue.yaml")], capsys)
    (plugin,) = config["trainer"]["plugins"]
    assert plugin["class_path"].endswith("SLURMEnvironment") and plugin["init_args"]["auto_requeue"] is True


def test_deepspeed_zero2_config_parses(capsys):
    config = print_config(["--config", str(ROOT / "configs/demo.yaml"),
                           "--trainer", str(ROOT / "configs/strategy/deepspeed_zero2.yaml")], capsys)
    strategy = config["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert strategy["init_args"]["stage"] == 2


def test_deepspeed_zero2_strategy_builds():
    """The setup installs deepspeed (Makefile); a training run needs CUDA, so only the build is checked."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    cli = load_train_script().main(["--config", str(ROOT / "configs/demo.yaml"),
                                    "--trainer", str(ROOT / "configs/strategy/deepspeed_zero2.yaml"),
                                    "--model.pretrained", "null"], run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config["zero_optimization"]["stage"] == 2


class AccumulatingStrategy(SingleDeviceStrategy):
    """Says it accumulates gradients itself, as DeepSpeed's strategy does: Lightning then calls ``optimizer_step``
    on every micro-batch and leaves the accumulation boundary to the strategy."""

    @property
    def handles_gradient_accumulation(self) -> bool:
        return True


@pytest.mark.parametrize("strategy", ["lightning", "deepspeed-like"])
def test_ema_updates_once_per_optimizer_step_under_accumulation(demo_shards, monkeypatch, strategy):
    updates = []
    update = ModelEmaV3.update
    monkeypatch.setattr(ModelEmaV3, "update", lambda self, *a, **kw: updates.append(1) or update(self, *a, **kw))
    steps = []
    optimizer_step = RMeeToModule.optimizer_step
    monkeypatch.setattr(RMeeToModule, "optimizer_step", lambda self, *a, **kw: steps.append(1) or
                        optimizer_step(self, *a, **kw))
    module = RMeeToModule(model_overrides=TINY, reduction=REDUCTION, mixup=0.0, cutmix=0.0, ema_decay=0.9)
    recorder = LossRecorder()
    kwargs = {"strategy": AccumulatingStrategy(torch.device("cpu"))} if strategy == "deepspeed-like" else {}
    fit = trainer(max_steps=4, limit_val_batches=0, accumulate_grad_batches=2, callbacks=[recorder], **kwargs)
    fit.fit(module, datamodule=datamodule(demo_shards))
    assert len(recorder.losses) == 8 and fit.global_step == 4
    assert len(steps) == (8 if strategy == "deepspeed-like" else 4)  # the hook the EMA used to hang on
    assert len(updates) == 4


class HeadDtypes(Callback):
    """Records the dtype of the teacher's and the EMA's head outputs."""

    def __init__(self) -> None:
        self.dtypes: dict[str, set[torch.dtype]] = {"teacher": set(), "ema": set()}

    def on_fit_start(self, trainer, pl_module) -> None:
        record = self.dtypes
        pl_module.frozen.teacher.head.register_forward_hook(lambda m, i, out: record["teacher"].add(out.dtype))
        (ema,) = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
        ema.ema.module.head.register_forward_hook(lambda m, i, out: record["ema"].add(out.dtype))


def test_teacher_and_ema_run_in_the_training_precision_without_an_ambient_autocast(demo_shards):
    """bf16-true gives what DeepSpeed's bf16 gives: a bf16 student, bf16 batches and no autocast around the step.
    The fp32 teacher and EMA still run in bf16 (under their own autocast), not in full fp32."""
    module = RMeeToModule(model_overrides=TINY, reduction=REDUCTION, mixup=0.0, cutmix=0.0, distill=True,
                          ema_decay=0.9)
    probe = HeadDtypes()
    fit = trainer(max_steps=2, limit_val_batches=1, val_check_interval=2, precision="bf16-true", callbacks=[probe])
    fit.fit(module, datamodule=datamodule(demo_shards))
    assert probe.dtypes == {"teacher": {torch.bfloat16}, "ema": {torch.bfloat16}}
    assert math.isfinite(fit.callback_metrics["val_ema/loss"])
    (ema,) = [cb for cb in fit.callbacks if isinstance(cb, EMA)]
    assert all(v.dtype == torch.float32 for v in ema.weights().values() if v.is_floating_point())


def test_autocast_dtype_and_frozen_forward():
    assert autocast_dtype("bf16-mixed") == autocast_dtype("bf16-true") == torch.bfloat16
    assert autocast_dtype("16-mixed") == torch.float16
    assert autocast_dtype("32-true") is None and autocast_dtype("64-true") is None
    model = torch.nn.Linear(4, 3)
    images = torch.randn(2, 4, dtype=torch.bfloat16)
    assert frozen_forward(model, images, torch.bfloat16).dtype == torch.bfloat16
    assert frozen_forward(model, images, None).dtype == torch.float32


def test_enable_tf32():
    before = torch.get_float32_matmul_precision()
    try:
        enable_tf32()
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_reduction_config_is_typed():
    reduction = Reduction(method="rmeeto", r=2, blocks=[1, 3], options={"order": "odd_even"})
    module = RMeeToModule(model_overrides=TINY, reduction=reduction)
    assert module.model.token_reducer.schedule.blocks == (1, 3)
    assert module.model.token_reducer.method.order == "odd_even"
    # stored as plain data: checkpoints stay loadable with torch.load(weights_only=True)
    assert module.hparams.reduction == {"method": "rmeeto", "r": 2, "flops_cut": None, "blocks": [1, 3], "interval": 2,
                                        "parity": "even", "final_tokens": None, "options": {"order": "odd_even"}}
    assert Reduction(r=8.0).r == 8 and isinstance(Reduction(r=8.0).r, int) and Reduction(r=0.3).r == 0.3
    with pytest.raises(TypeError, match="rr"):
        Reduction(method="rmeeto", rr=8)
    with pytest.raises(ValueError, match="bad option for method 'rmeeto'"):
        RMeeToModule(model_overrides=TINY, reduction={"method": "rmeeto", "r": 2, "options": {"ordr": "x"}})


def test_validation_and_test_epochs_run_inside_frozen_with_the_same_metrics(demo_shards, monkeypatch):
    """FrozenEval opens rmeeto.frozen for the model and the EMA copy at each validation and test epoch (their blocks
    and merges then run as one kernel call a forward) and closes it at the epoch's end: no mixer is left prepared, no
    workspace held. The metrics are those of plain forwards, to the bit."""
    import rmeeto.models.mamba as mamba
    from rmeeto.lit.callbacks import FrozenEval
    from rmeeto.models import frozen_forward
    from rmeeto.ops import workspace

    calls, kernel = [], frozen_forward._k.blocks_forward
    monkeypatch.setattr(frozen_forward._k, "blocks_forward", lambda *a: calls.append(1) or kernel(*a))

    def evaluate(frozen_eval: bool) -> dict[str, float]:
        if not frozen_eval:
            monkeypatch.setattr(FrozenEval, "_open", lambda self, trainer, pl_module: None)
        L.seed_everything(0)
        module = RMeeToModule(model_overrides=TINY, reduction=REDUCTION, ema_decay=0.9)
        run = trainer(limit_val_batches=2, limit_test_batches=2)
        data = datamodule(demo_shards)
        metrics = {**run.validate(module, datamodule=data)[0], **run.test(module, datamodule=data)[0]}
        mixers = [m for model in (module.model, run.callbacks[-1].ema.module) for m in model.modules()
                  if isinstance(m, mamba.BiMamba)]  # fmt: skip
        assert isinstance(run.callbacks[-1], EMA) and all(m._prepared is None for m in mixers)
        assert getattr(workspace._LOCAL, "held", None) is None
        return metrics

    frozen_metrics = evaluate(True)
    assert len(calls) == 2 * 2 * 2  # (model, EMA) × 2 batches × (validation, test)
    calls.clear()
    plain_metrics = evaluate(False)
    assert not calls and {"val/loss", "val_ema/loss", "test/loss", "test_ema/acc1"} <= set(frozen_metrics)
    assert frozen_metrics == plain_metrics
