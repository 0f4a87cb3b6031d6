"""The public checkpoints, as timm pretrained configs keyed ``architecture.tag`` (the one list of them).

Each entry says where the weights live on the Hugging Face Hub (``hf_hub_id`` + ``hf_hub_filename``, or
``hf_hub_subfolder`` for a folder whose single checkpoint is found by listing it at download time) and the
paper's top-1 (%) and GFLOPs for that checkpoint. R-MeeTo entries also give the ``reduction`` the weights
were re-trained with (apply it with ``rmeeto.reduction.apply(model, **model.pretrained_cfg["reduction"])``).

Sources: Vim (Zhu et al., 2024; hustvl/Vim READMEs), VideoMamba (Li et al., 2024; its MODEL_ZOO), R-MeeTo
(Shi et al., 2024: Tab. 2 for ImageNet, Tab. 13 for Kinetics-400; the ``Soptq/R-Meeto`` folders of its
CKPT.md). Baseline GFLOPs of Vim and VideoMamba-Ti/S/B are R-MeeTo's Tab. 2 figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import PretrainedCfg


@dataclass
class CheckpointCfg(PretrainedCfg):
    """timm's PretrainedCfg plus the folder to list, the paper's numbers and the re-training reduction."""

    hf_hub_subfolder: str | None = None
    paper_top1: float | None = None
    paper_gflops: float | None = None
    reduction: dict[str, Any] | None = None


#: Fields that tell where the weights come from; a user-given one replaces the registry's checkpoint.
SOURCE_FIELDS = ("file", "url", "state_dict", "hf_hub_id", "hf_hub_filename", "hf_hub_subfolder")
#: Fields that only hold for the registry's own checkpoint.
PAPER_FIELDS = ("paper_top1", "paper_gflops", "reduction")


def _cfg(repo: str | None = None, file: str | None = None, folder: str | None = None, top1: float | None = None,
         gflops: float | None = None, r: int | None = None, **kwargs: Any) -> CheckpointCfg:
    return CheckpointCfg(
        hf_hub_id=repo, hf_hub_filename=file, hf_hub_subfolder=folder, paper_top1=top1, paper_gflops=gflops,
        reduction={"method": "rmeeto", "r": r} if r else None, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        crop_pct=0.875, interpolation="bicubic", first_conv="patch_embed.proj", classifier="head", **kwargs,
    )


def blank_cfg() -> CheckpointCfg:
    """The config of an architecture without a public checkpoint (mean/std, no weights)."""
    return _cfg()


_RMEETO = "Soptq/R-Meeto"
_VIDEOMAMBA = "OpenGVLab/VideoMamba"
#: ``architecture.tag`` → checkpoint; the first tag of an architecture is its default (``pretrained=True``).
PRETRAINED_CFGS: dict[str, CheckpointCfg] = {
    "vim_tiny_patch16_224_midclstok.in1k": _cfg("hustvl/Vim-tiny-midclstok", "vim_t_midclstok_76p1acc.pth",
                                                top1=76.1, gflops=1.45),
    "vim_tiny_patch16_224_midclstok.rmeeto_r5": _cfg(_RMEETO, folder="Vim-Ti_30epoch_75.3", top1=75.3,
                                                     gflops=1.28, r=5),
    "vim_small_patch16_224_midclstok.in1k": _cfg("hustvl/Vim-small-midclstok", "vim_s_midclstok_80p5acc.pth",
                                                 top1=80.5, gflops=5.08),
    "vim_small_patch16_224_midclstok.rmeeto_r11": _cfg(_RMEETO, folder="Vim-S_15epoch_80.0", top1=79.9,
                                                       gflops=3.58, r=11),
    "vim_tiny_patch16_stride8_224_midclstok.in1k_ft": _cfg("hustvl/Vim-tiny-midclstok",
                                                           "vim_t_midclstok_ft_78p3acc.pth", top1=78.3),
    "vim_small_patch16_stride8_224_midclstok.in1k_ft": _cfg("hustvl/Vim-small-midclstok",
                                                            "vim_s_midclstok_ft_81p6acc.pth", top1=81.6),
    "vim_base_patch16_224_midclstok.in1k": _cfg("hustvl/Vim-base-midclstok", "vim_b_midclstok_81p9acc.pth",
                                                top1=81.9, gflops=18.87),
    "vim_base_patch16_224_midclstok.rmeeto_r11": _cfg(_RMEETO, folder="Vim-B_15epochs_81.3", top1=81.3,
                                                      gflops=13.21, r=11),
    "vim_demo_patch8_64": _cfg(input_size=(3, 64, 64), num_classes=10),
    "videomamba_tiny.in1k": _cfg(_VIDEOMAMBA, "videomamba_t16_in1k_res224.pth", top1=76.9, gflops=1.45),
    "videomamba_tiny.rmeeto_r5": _cfg(_RMEETO, folder="VideoMamba-Ti_30epoch_75.9", top1=75.9, gflops=1.28, r=5),
    "videomamba_small.in1k": _cfg(_VIDEOMAMBA, "videomamba_s16_in1k_res224.pth", top1=81.2, gflops=5.08),
    "videomamba_small.rmeeto_r11": _cfg(_RMEETO, folder="VideoMamba-S_15epochs_80.1", top1=80.1, gflops=3.58,
                                        r=11),
    "videomamba_middle.in1k": _cfg(_VIDEOMAMBA, "videomamba_m16_in1k_res224.pth", top1=82.8, gflops=12.7),
    "videomamba_base.in1k": _cfg(_VIDEOMAMBA, "videomamba_b16_in1k_res224.pth", top1=82.7, gflops=18.87),
    "videomamba_base.rmeeto_r11": _cfg(_RMEETO, folder="VideoMamba-B_15epochs_81.9", top1=81.9, gflops=13.21,
                                       r=11),
    **{
        f"videomamba_{size}_k400_f{frames}.k400": _cfg(
            _VIDEOMAMBA, f"videomamba_{size[0]}16_k400_f{frames}_res224.pth", top1=top1, num_classes=400,
            gflops={"tiny": 11.54, "small": 40.43, "middle": 115.33}[size] if frames == 8 else None)
        for size, top1s in {"tiny": (76.9, 78.1, 78.8, 79.6), "small": (79.3, 80.8, 81.5, 81.8),
                            "middle": (80.6, 81.9, 82.4, 82.8)}.items()
        for frames, top1 in zip((8, 16, 32, 64), top1s, strict=True)
    },
    "videomamba_tiny_k400_f8.rmeeto_r88": _cfg(_RMEETO, folder="K400_VideoMamba-Ti_30epochs_76.5", top1=76.5,
                                               gflops=9.49, r=88, num_classes=400),
    "videomamba_small_k400_f8.rmeeto_r88": _cfg(_RMEETO, folder="K400_VideoMamba-S_15epochs_78.5", top1=78.5,
                                                gflops=30.99, r=88, num_classes=400),
    "videomamba_middle_k400_f8.rmeeto_r88": _cfg(_RMEETO, folder="K400_VideoMamba-M_15epochs_78.9", top1=78.9,
                                                 gflops=71.71, r=88, num_classes=400),
    "videomamba_demo": _cfg(input_size=(3, 32, 32), num_classes=4),
    "deit_demo": _cfg(input_size=(3, 64, 64), num_classes=10),
}
