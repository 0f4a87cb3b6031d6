"""VideoMamba: released key layout and shapes, embedding, summed directions, FLOPs tables, the video data
module on the moving-digits set, the recipes, and a short Lightning fit."""

from __future__ import annotations

import inspect
import io
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import webdataset as wds
import yaml
from lightning.pytorch.callbacks import Callback

import rmeeto
import rmeeto.reduction as R
from rmeeto.data.pipelines import eval_pipeline
from rmeeto.data.reader import ErrorPolicy, read_shards
from rmeeto.data.shards import ShardError
from rmeeto.data.video import VideoDataModule, check_clip, decode_clip, write_clip_shards
from rmeeto.data.video_demo import CLASSES, moving_digit_clips, write_video_demo_shards
from rmeeto.flops import count, count_config
from rmeeto.lit import RMeeToModule
from rmeeto.models import CheckpointError, VisionMamba
from rmeeto.models import model_config as videomamba_config
from rmeeto.models.mamba import BiMamba
from rmeeto.models.videomamba import VideoMamba
from rmeeto.reduction.methods import BipartiteMerge
from rmeeto.reduction.reducer import Schedule

ROOT = Path(__file__).resolve().parents[1]
TINY_VIDEO = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_classes=5, num_frames=4, d_state=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def video_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Moving digits, 32×32, 8 frames: train 128 clips (.npy, 4 shards), val 64 (JPEG frames, 2 shards)."""
    return write_video_demo_shards(tmp_path_factory.mktemp("video_demo"))


def released_layout(dim: int, depth: int, num_classes: int, frames: int | None = None) -> dict[str, tuple]:
    """Key → shape of the public VideoMamba checkpoints (patch 16, 224², d_state 16, expand 2, d_conv 4),
    written out from the released model definition, independently of rmeeto's modules."""
    inner, rank = 2 * dim, -(-dim // 16)
    shapes = {
        "patch_embed.proj.weight": (dim, 3, 16, 16) if frames is None else (dim, 3, 1, 16, 16),
        "patch_embed.proj.bias": (dim,), "cls_token": (1, 1, dim), "pos_embed": (1, 197, dim),
        "norm_f.weight": (dim,), "head.weight": (num_classes, dim), "head.bias": (num_classes,),
    }
    if frames is not None:
        shapes["temporal_pos_embedding"] = (1, frames, dim)
    for i in range(depth):
        m = f"layers.{i}.mixer."
        shapes[f"layers.{i}.norm.weight"] = (dim,)
        shapes[m + "in_proj.weight"] = (2 * inner, dim)
        shapes[m + "out_proj.weight"] = (dim, inner)
        for b in ("", "_b"):
            shapes[f"{m}conv1d{b}.weight"] = (inner, 1, 4)
            shapes[f"{m}conv1d{b}.bias"] = (inner,)
            shapes[f"{m}x_proj{b}.weight"] = (rank + 32, inner)
            shapes[f"{m}dt_proj{b}.weight"] = (inner, rank)
            shapes[f"{m}dt_proj{b}.bias"] = (inner,)
            shapes[f"{m}D{b}"] = (inner,)
        shapes[m + "A_log"] = shapes[m + "A_b_log"] = (inner, 16)
    return shapes


@pytest.mark.parametrize("name,dim,depth,params", [
    ("videomamba_tiny", 192, 24, 7), ("videomamba_small", 384, 24, 26), ("videomamba_middle", 576, 32, 74),
    ("videomamba_base", 768, 24, 98)])
def test_released_sizes(name, dim, depth, params):
    cfg = videomamba_config(name)
    assert (cfg.embed_dim, cfg.depth, cfg.num_patches, cfg.divide_out) == (dim, depth, 196, False)
    numel = sum(int(np.prod(s)) for s in released_layout(dim, depth, 1000).values())
    assert round(numel / 1e6) == params  # 7M / 26M / 74M (VideoMamba model zoo), 98M (MTR paper)


@pytest.mark.parametrize("name,frames", [("videomamba_tiny", None), ("videomamba_tiny_k400_f8", 8)])
def test_released_checkpoint_layout_loads_strictly(tmp_path, name, frames):
    model = rmeeto.create_model(name)
    classes = 1000 if frames is None else 400
    layout = released_layout(192, 24, classes, frames)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout
    torch.manual_seed(0)
    state = {k: torch.randn(shape) for k, shape in layout.items()}
    torch.save({"model": state, "epoch": 1}, tmp_path / "released.pth")
    loaded = rmeeto.create_model(name, pretrained=tmp_path / "released.pth")
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    other = "videomamba_tiny" if frames else "videomamba_tiny_k400_f8"
    with pytest.raises(CheckpointError, match="released.pth.*patch_embed.proj.weight"):
        rmeeto.create_model(other, pretrained=tmp_path / "released.pth")


def test_video_embedding_is_videomambas_layout():
    """Frame after frame, spatial embedding on every frame plus the frame's temporal one, cls first with
    pos_embed[0] — computed here the way the reference does it, through (b t) n c and (b n) t c."""
    torch.manual_seed(0)
    model = rmeeto.create_model("videomamba_tiny_k400_f8", **{**TINY_VIDEO, "tubelet_size": 2})
    torch.nn.init.normal_(model.temporal_pos_embedding)
    x = torch.randn(2, 3, 4, 32, 32)
    b, t, n, c = 2, 2, 16, 32
    feats = model.patch_embed.proj(x).permute(0, 2, 3, 4, 1).reshape(b * t, n, c)
    feats = torch.cat([model.cls_token.expand(b * t, -1, -1), feats], dim=1) + model.pos_embed
    cls, patches = feats[:b, :1], feats[:, 1:]
    patches = patches.reshape(b, t, n, c).transpose(1, 2).reshape(b * n, t, c) + model.temporal_pos_embedding
    patches = patches.reshape(b, n, t, c).transpose(1, 2).reshape(b, t * n, c)
    state = model.embed(x)
    assert (state.cls_index == 0).all() and state.residual is None and model.cfg.num_patches == t * n
    assert "temporal_pos_embedding" in model.no_weight_decay()
    torch.testing.assert_close(state.hidden, torch.cat([cls, patches], dim=1))
    assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match="built for 2 of 16"):
        model(torch.randn(1, 3, 8, 32, 32))
    with pytest.raises(ValueError, match="B×3×T×H×W clips"):
        model(torch.randn(1, 3, 32, 32))


def test_image_model_puts_cls_first():
    torch.manual_seed(0)
    model = rmeeto.create_model("videomamba_tiny", img_size=32, patch_size=8, embed_dim=32, depth=2)
    x = torch.randn(2, 3, 32, 32)
    state = model.embed(x)
    expected = torch.cat([model.cls_token.expand(2, -1, -1), model.patch_embed(x)], dim=1) + model.pos_embed
    torch.testing.assert_close(state.hidden, expected)
    assert isinstance(model, VideoMamba) and isinstance(model, VisionMamba)
    assert "temporal_pos_embedding" not in model.state_dict() and model.no_weight_decay() == {"pos_embed", "cls_token"}


def test_videomamba_sums_the_two_directions_vim_averages():
    torch.manual_seed(0)
    summed = BiMamba(16, d_state=4, divide_out=False)
    averaged = BiMamba(16, d_state=4)
    averaged.load_state_dict(summed.state_dict())
    x = torch.randn(2, 7, 16)
    torch.testing.assert_close(summed(x), 2 * averaged(x))
    assert not rmeeto.create_model("videomamba_demo").layers[0].mixer.divide_out
    assert rmeeto.create_model("vim_demo").layers[0].mixer.divide_out


def test_unknown_names_list_both_families():
    with pytest.raises(ValueError, match="unknown model 'videomamba_huge'.*videomamba_tiny.*vim_tiny"):
        rmeeto.create_model("videomamba_huge")
    with pytest.raises(ValueError, match="unknown model option"):
        rmeeto.create_model("videomamba_tiny", frames=8)
    with pytest.raises(ValueError, match="multiple of tubelet_size"):
        videomamba_config("videomamba_tiny_k400_f8", tubelet_size=3)


# FLOPs: R-MeeTo paper Table 2 (image, r = 5/11/11) and Table 13 (K400 8 frames, r = 88), papers' convention.
@pytest.mark.parametrize("name,base,r,merged", [
    ("videomamba_tiny", 1.449, 5, 1.285), ("videomamba_small", 5.077, 11, 3.585),
    ("videomamba_base", 18.868, 11, 13.207), ("videomamba_tiny_k400_f8", 11.539, 88, 9.493),
    ("videomamba_small_k400_f8", 40.430, 88, 30.986), ("videomamba_middle_k400_f8", 115.333, 88, 71.708)])
def test_flops_match_the_papers_tables(name, base, r, merged):
    cfg = videomamba_config(name)
    schedule = Schedule.every(cfg.depth, r)
    assert len(schedule.blocks) == (15 if cfg.depth == 32 else 11)
    assert round(count_config(cfg), 3) == base
    assert round(count_config(cfg, BipartiteMerge(), schedule), 3) == merged


def test_count_and_flops_cut_on_a_video_model():
    model = rmeeto.create_model("videomamba_tiny_k400_f8", **{**TINY_VIDEO, "depth": 8})
    base = count(model)
    assert base == count_config(model.cfg)
    R.apply(model, "mtr", flops_cut=0.3)
    assert abs(1 - count(model) / base - 0.3) < 0.01
    tubelets = rmeeto.create_model("videomamba_tiny_k400_f8", **{**TINY_VIDEO, "depth": 8, "tubelet_size": 2})
    assert count(tubelets) < base  # half the tokens; the patch embedding costs the same


@pytest.mark.parametrize("recipe", sorted((ROOT / "configs").glob("videomamba_*.yaml")), ids=lambda p: p.stem)
def test_recipes_reduce_as_the_paper(recipe):
    """Each recipe's model and reduction give the paper's reduced GFLOPs; its data arguments exist."""
    config = yaml.safe_load(recipe.read_text())
    model, reduction = config["model"]["model"], config["model"]["reduction"]
    cfg = videomamba_config(model)
    schedule = Schedule.every(cfg.depth, reduction["r"], reduction["interval"], reduction["parity"])
    target = {"ti": 1.285, "s": 3.585, "b": 13.207, "ti_k400": 9.493, "s_k400": 30.986, "m_k400": 71.708}
    assert round(count_config(cfg, BipartiteMerge(), schedule), 3) == target[recipe.stem.removeprefix("videomamba_")]
    module, _, name = config["data"]["class_path"].rpartition(".")
    data_class = getattr(__import__(module, fromlist=[name]), name)
    inspect.signature(data_class).bind(**config["data"]["init_args"])
    if cfg.is_video:
        assert config["data"]["init_args"]["num_frames"] == cfg.num_frames


def test_demo_clips_move_in_the_labelled_direction():
    clips, labels = moving_digit_clips(8, size=32, num_frames=8)
    assert clips.shape == (8, 8, 32, 32, 3) and clips.dtype == np.uint8 and list(labels) == [0, 1, 2, 3] * 2
    for clip, label in zip(clips, labels, strict=True):
        ink = clip[..., 0].astype(float)
        profiles = ink.sum(axis=1) if label < 2 else ink.sum(axis=2)  # column mass for right/left, row for down/up
        centre = [(profile * np.arange(32)).sum() / profile.sum() for profile in profiles]
        step = np.diff(centre)
        assert (step > 0).all() if label in (0, 2) else (step < 0).all(), (CLASSES[label], centre)


def test_video_loaders_batches_and_exact_once_validation(video_shards):
    data = VideoDataModule(str(video_shards), img_size=32, batch_size=16, num_workers=0, shuffle_buffer=32)
    data.setup("fit")
    clips, labels = next(iter(data.train_dataloader()))
    assert clips.shape == (16, 3, 8, 32, 32) and clips.dtype == torch.float32 and labels.dtype == torch.int64
    assert len(data.train_dataloader()) == 128 // 16
    for world_size in (2, 3):  # 2 val shards: split by shard, then by sample
        seen = []
        for rank in range(world_size):
            part = VideoDataModule(str(video_shards), img_size=32, batch_size=16, num_workers=0, rank=rank,
                                   world_size=world_size)
            seen += [int(y) for _, batch in part.val_dataloader() for y in batch]
            assert len(part.train_dataloader()) == 128 // world_size // 16
        assert len(seen) == data.val_num_samples == 64 and sorted(seen) == sorted([0, 1, 2, 3] * 16)


def test_bad_clips_name_the_shard_and_key(tmp_path):
    good = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="uint8 T×H×W×3"):
        write_clip_shards([("flat", good[0], 1)], tmp_path / "bad", "val", num_classes=2)
    write_clip_shards([("ok", good, 0)], tmp_path, "val", num_classes=2)
    shard = str(tmp_path / "val-000000.tar")
    assert [s["key"] for s in read_shards([{"url": shard}], {shard: 1}, check=check_clip)] == ["ok"]
    short = list(read_shards([{"url": shard}], {shard: 3}, check=check_clip))  # the index promises 3 clips
    assert isinstance(short[-1], ShardError) and "index says 3" in str(short[-1]) and short[-1].lost == 2
    with pytest.raises(ShardError, match="sample 'bad'.*undecodable clip"):
        decode_clip({"key": "bad", "shard": shard, "clip": b"not numpy", "label": 0})

    mixed = str(tmp_path / "mixed.tar")
    with wds.TarWriter(mixed) as writer:
        for key, clip in (("float", good.astype(np.float32)), ("fine", good)):
            buffer = io.BytesIO()
            np.save(buffer, clip)
            writer.write({"__key__": key, "npy": buffer.getvalue(), "cls": "1"})
    policy = ErrorPolicy("skip")
    with pytest.warns(UserWarning, match="sample 'float'.*uint8"):
        clips = list(eval_pipeline([mixed], [2], transform=lambda clip: clip, policy=policy, check=check_clip,
                                  decode=decode_clip))
    assert [label for _, label in clips] == [1] and policy.skipped == 1


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_cutmix_of_clips_cuts_one_spatial_box_through_every_frame():
    from rmeeto.data.transforms import mix, mixup_fn

    torch.manual_seed(0)
    cutmix = mixup_fn(5, mixup=0.0, cutmix=1.0, label_smoothing=0.0)
    b, t = 4, 3
    frame_ids = torch.arange(t, dtype=torch.float32).view(1, 1, t, 1, 1)
    clip_ids = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1, 1)
    clips = (10 * clip_ids + frame_ids).expand(b, 3, t, 16, 16).contiguous()  # value = 10·clip + frame
    mixed, targets = mix(cutmix, clips.clone(), torch.arange(b))
    assert mixed.shape == clips.shape and targets.shape == (b, 5)
    swapped = mixed != clips
    assert swapped.any()
    # Every frame keeps its own frame index (no box across time) and carries the same spatial box.
    torch.testing.assert_close(mixed.remainder(10), clips.remainder(10))
    assert torch.equal(swapped, swapped[:, :, :1].expand_as(swapped))
    # The soft target weights the other clip's label by the box's share of the frame.
    share = swapped[0, 0, 0].float().mean()
    torch.testing.assert_close(targets[0, 0], 1 - share)


def test_short_fit_of_a_reduced_videomamba_lowers_the_loss(video_shards):
    L.seed_everything(0)
    module = RMeeToModule(model="videomamba_demo", reduction={"method": "rmeeto", "r": 8}, lr=3e-3, min_lr=1e-4,
                          warmup_steps=2, mixup=0.0, cutmix=0.0, label_smoothing=0.0)
    data = VideoDataModule(str(video_shards), img_size=32, batch_size=16, num_workers=0, shuffle_buffer=64,
                           crop_scale=(0.8, 1.0))
    recorder = LossRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=32, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder])
    trainer.fit(module, datamodule=data)
    assert len(recorder.losses) == 32
    first, last = recorder.losses[:8], recorder.losses[-8:]
    # From ≈ 1.3 (ln 4 ≈ 1.39: four balanced directions) to ≈ 1.0 over 32 steps in repeated runs.
    assert sum(last) / 8 < sum(first) / 8 - 0.1, recorder.losses
