"""safetensors export: logits parity with the reduction re-attached, EMA weights, clear errors."""

from __future__ import annotations

import json
import os
import stat

import lightning as L
import pytest
import timm
import torch

import rmeeto
import rmeeto.reduction
from rmeeto import export
from rmeeto.data import Augment, WebDatasetDataModule
from rmeeto.lit import ExportCallback, RMeeToModule
from rmeeto.lit.callbacks import EMA
from rmeeto.models import CheckpointError

TINY = {"img_size": 32, "depth": 4, "embed_dim": 32}


def tiny_model(**reduction) -> rmeeto.models.VisionMamba:
    torch.manual_seed(0)
    model = rmeeto.create_model("vim_demo", **TINY)
    if reduction:
        rmeeto.reduction.apply(model, **reduction)
    return model.eval()


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("reduction", [
    {"method": "rmeeto", "r": 2},
    {"method": "rmeeto", "r": 3, "blocks": [1, 3], "final_tokens": 9, "order": "odd_even", "op": "mean"},
    {"method": "mtr", "r": 0.2, "variant": "hybrid", "metric": "delta"},
    {},
])
def test_load_gives_identical_logits_with_the_reduction(tmp_path, reduction):
    model = tiny_model(**reduction)
    export.save(model, tmp_path)
    loaded = export.load(tmp_path)

    assert not loaded.training
    assert loaded.cfg == model.cfg
    if reduction:
        assert loaded.token_reducer.schedule == model.token_reducer.schedule
        assert loaded.token_reducer.method == model.token_reducer.method
    else:
        assert loaded.token_reducer is None
    with torch.no_grad():
        assert torch.equal(loaded(images()), model(images()))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["config"]["depth"] == 4 and config["weights"]["ema"] is False


def test_lit_module_exports_its_ema_weights(tmp_path):
    module = RMeeToModule(model_overrides=TINY, reduction={"method": "rmeeto", "r": 2}, ema_decay=0.5)
    (ema,) = [cb for cb in module.configure_callbacks() if isinstance(cb, EMA)]  # the training run's EMA callback
    module.trainer = L.Trainer(accelerator="cpu", logger=False, callbacks=[ema], enable_progress_bar=False)
    ema.setup(module.trainer, module, "fit")
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.01)
    ema.ema.update(module.model)  # EMA now halfway between start and live weights
    export.save(module, tmp_path / "ema")
    export.save(module, tmp_path / "live", use_ema=False)

    x = images()
    with torch.no_grad():
        ema_logits = ema.ema.module.eval()(x)
        live_logits = module.model.eval()(x)
        assert not torch.allclose(ema_logits, live_logits)
        assert torch.equal(export.load(tmp_path / "ema")(x), ema_logits)
        assert torch.equal(export.load(tmp_path / "live")(x), live_logits)
    assert json.loads((tmp_path / "ema/config.json").read_text())["model"]["name"] == "vim_demo"


def test_explicit_ema_state_for_a_bare_model(tmp_path):
    model = tiny_model(method="rmeeto", r=2)
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    export.save(model, tmp_path, ema_state=ema, extra={"note": "demo"})
    loaded = export.load(tmp_path)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.items())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["weights"]["ema"] is True and config["extra"] == {"note": "demo"}
    with pytest.raises(CheckpointError, match="EMA state"):
        export.save(model, tmp_path, ema_state={"head.weight": ema["head.weight"]})


def test_export_callback_writes_at_the_end_of_fit(tmp_path, demo_shards):
    L.seed_everything(0)
    module = RMeeToModule(model_overrides=TINY, reduction={"method": "rmeeto", "r": 2}, mixup=0.0, cutmix=0.0,
                          ema_decay=0.9)
    data = WebDatasetDataModule(str(demo_shards), img_size=32, batch_size=16, num_workers=0,
                                augment=Augment(auto_augment=None, reprob=0.0), mean=(0.1, 0.2, 0.3),
                                std=(0.4, 0.5, 0.6))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ExportCallback(str(tmp_path / "export"))])
    trainer.fit(module, datamodule=data)
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["extra"]["global_step"] == 2 and config["weights"]["ema"] is True
    assert config["data"] == {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6]}  # the run's normalisation
    assert export.load(tmp_path / "export").pretrained_cfg["mean"] == (0.1, 0.2, 0.3)
    with torch.no_grad():
        (ema,) = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
        assert torch.equal(export.load(tmp_path / "export")(images()), ema.ema.module(images()))


def test_missing_or_corrupt_files_raise_errors_naming_them(tmp_path):
    with pytest.raises(CheckpointError, match=r"config\.json.*not found"):
        export.load(tmp_path)
    export.save(tiny_model(method="rmeeto", r=2), tmp_path)
    config_path, weights_path = tmp_path / "config.json", tmp_path / "model.safetensors"
    good_config, good_weights = config_path.read_text(), weights_path.read_bytes()

    config_path.write_text(good_config[: len(good_config) // 2])
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        export.load(tmp_path)
    config_path.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match=r"config\.json: not an rmeeto export"):
        export.load(tmp_path)
    broken = json.loads(good_config)
    broken["model"]["config"]["depth"] = 2
    config_path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*does not fit"):
        export.load(tmp_path)
    broken = json.loads(good_config)
    broken["reduction"]["method"] = "nope"
    config_path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match=r"config\.json: bad reduction"):
        export.load(tmp_path)
    broken = json.loads(good_config)
    del broken["model"]["config"]
    config_path.write_text(json.dumps(broken))
    with pytest.raises(CheckpointError, match=r"config\.json: bad model"):
        export.load(tmp_path)

    config_path.write_text(good_config)
    weights_path.write_bytes(good_weights[: len(good_weights) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: these weights are not the ones"):
        export.load(tmp_path)
    unhashed = json.loads(good_config)
    del unhashed["weights"]["sha256"]  # as exports written before the hash
    config_path.write_text(json.dumps(unhashed))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors"):
        export.load(tmp_path)
    weights_path.unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        export.load(tmp_path)


@pytest.mark.parametrize("name,shape,method,amount", [
    ("videomamba_demo", (2, 3, 8, 32, 32), "mtr", 0.2), ("vim_demo", (2, 3, 64, 64), "evit", 0.2)])
def test_export_covers_every_model_family_and_method_class(tmp_path, name, shape, method, amount):
    torch.manual_seed(0)
    model = rmeeto.create_model(name).eval()
    rmeeto.reduction.apply(model, method, r=amount)
    export.save(model, tmp_path)
    loaded = export.load(tmp_path)
    x = torch.randn(*shape)
    assert type(loaded) is type(model) and torch.equal(model(x), loaded(x))


def test_a_failed_save_leaves_the_previous_export_whole(tmp_path):
    old = tiny_model(method="rmeeto", r=2)
    export.save(old, tmp_path / "export")
    (tmp_path / "export" / "metrics.csv").write_text("step,loss\n")  # a file the user put there
    new = tiny_model(method="mtr", r=0.3)
    with torch.no_grad():
        new.head.weight.add_(1.0)
    with pytest.raises(TypeError, match="not JSON serializable"):  # fails after the weights are written
        export.save(new, tmp_path / "export", extra={"when": object()})
    with torch.no_grad():
        assert torch.equal(export.load(tmp_path / "export")(images()), old(images()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left behind

    export.save(new, tmp_path / "export")
    with torch.no_grad():
        assert torch.equal(export.load(tmp_path / "export")(images()), new(images()))
    assert (tmp_path / "export" / "metrics.csv").read_text() == "step,loss\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_weights_of_another_save_are_refused(tmp_path):
    export.save(tiny_model(method="rmeeto", r=2), tmp_path / "a")
    other = tiny_model(method="mtr", r=0.3)
    with torch.no_grad():
        other.head.bias.add_(1.0)
    export.save(other, tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").write_bytes((tmp_path / "b" / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match=r"a/model\.safetensors: these weights are not the ones .*a/config\.json"):
        export.load(tmp_path / "a")


def test_exported_files_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        out = export.save(tiny_model(), tmp_path / "export")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {
        "model.safetensors": 0o644, "config.json": 0o644}


def test_normalisation_is_stored_and_given_back_as_pretrained_cfg(tmp_path):
    model = tiny_model()
    export.save(model, tmp_path / "default")
    assert export.load(tmp_path / "default").pretrained_cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN
    export.save(model, tmp_path / "custom", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    config = json.loads((tmp_path / "custom/config.json").read_text())
    assert config["data"] == {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    loaded = export.load(tmp_path / "custom")
    resolved = timm.data.resolve_data_config(model=loaded)
    assert resolved["mean"] == (0.5, 0.5, 0.5) and resolved["std"] == (0.25, 0.25, 0.25)
    assert resolved["input_size"] == (3, 32, 32)
    with pytest.raises(ValueError, match="one value per channel"):
        export.save(model, tmp_path / "bad", mean=(0.5,), std=(0.2, 0.2, 0.2))
