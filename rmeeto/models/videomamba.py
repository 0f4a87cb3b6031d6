"""VideoMamba (Li et al., ECCV 2024) image and video classifiers, built from the Vim blocks.

VideoMamba is a Vim whose mixer *sums* its two scan directions (``divide_out=False``) and whose cls
token comes **first** (index 0). Image models patchify B×3×H×W with a Conv2d; video models embed
B×3×T×H×W tubelets (``tubelet_size`` frames × patch × patch) with a Conv3d and add a spatial position
embedding (1, M + 1, C) shared by all frames plus a temporal one (1, T / tubelet_size, C); tokens are laid
out frame after frame, cls first. Everything after the embedding is :class:`~rmeeto.models.vim.VisionMamba`'s,
including the ``token_reducer`` hook between blocks.

Parameter names are those of the public checkpoints (``videomamba_{t,s,m}16_in1k_res224.pth``,
``videomamba_{t,s,m}16_k400_f{8,16,32,64}_res224.pth``): ``patch_embed.proj.*``, ``cls_token``,
``pos_embed``, ``temporal_pos_embedding`` (video), ``layers.{i}.mixer.*``, ``layers.{i}.norm.weight``,
``norm_f.weight``, ``head.*``.

The variants register themselves with :mod:`rmeeto.models.registry`, so ``rmeeto.create_model`` and
``timm.create_model`` build them by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from rmeeto.models import registry
from rmeeto.models.vim import TokenState, VimConfig, VisionMamba, check_patch_multiple


@dataclass(frozen=True)
class VideoMambaConfig(VimConfig):
    """Architecture of a VideoMamba; the defaults are VideoMamba-S for 224×224 images.

    num_frames: None for an image model (input B×3×H×W), else the clip length T of a video model
    (input B×3×T×H×W). tubelet_size: frames per token (video only). ``num_patches`` counts all tokens
    but cls: (img_size / patch_size)² · T / tubelet_size.
    """

    divide_out: bool = False
    num_frames: int | None = None
    tubelet_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_stride not in (None, self.patch_size):
            raise ValueError(f"VideoMamba takes non-overlapping patches; patch_stride={self.patch_stride}")
        if self.num_frames is not None and (self.num_frames < 1 or self.num_frames % self.tubelet_size):
            raise ValueError(f"num_frames={self.num_frames} must be a positive multiple of "
                             f"tubelet_size={self.tubelet_size}")

    @property
    def is_video(self) -> bool:
        return self.num_frames is not None

    @property
    def grid_patches(self) -> int:
        """Patches per frame, M."""
        return (self.img_size // self.patch_size) ** 2

    @property
    def time_steps(self) -> int:
        """Token frames, T / tubelet_size (1 for an image model)."""
        return self.num_frames // self.tubelet_size if self.is_video else 1

    @property
    def num_patches(self) -> int:
        return self.grid_patches * self.time_steps


class TubeletEmbed(nn.Module):
    """B×3×T×H×W → B×T'×M×C with a Conv3d over tubelets (T' = T / tubelet_size, M patches per frame)."""

    def __init__(self, cfg: VideoMambaConfig):
        super().__init__()
        kernel = (cfg.tubelet_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(3).permute(0, 2, 3, 1)


class VideoMamba(VisionMamba):
    """VideoMamba classifier: B×3×H×W (image model) or B×3×T×H×W (video model) → B×num_classes."""

    cfg: VideoMambaConfig

    def __init__(self, cfg: VideoMambaConfig = VideoMambaConfig()):
        super().__init__(cfg)
        if cfg.is_video:  # the Vim parts built above assume one frame: swap in the video embedding
            self.patch_embed = TubeletEmbed(cfg)
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_patches + 1, cfg.embed_dim))
            self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, cfg.time_steps, cfg.embed_dim))
            trunc_normal_(self.pos_embed, std=0.02)

    def embed(self, x: Tensor) -> TokenState:
        """Patchify, add the position embeddings (spatial, and temporal for video), put cls at index 0."""
        cfg = self.cfg
        expected_dims = 5 if cfg.is_video else 4
        if x.dim() != expected_dims:
            layout = "B×3×T×H×W clips" if cfg.is_video else "B×3×H×W images"
            raise ValueError(f"this VideoMamba takes {layout}; got a tensor of shape {tuple(x.shape)}")
        check_patch_multiple(x, cfg.patch_size)
        tokens = self.patch_embed(x)
        if not cfg.is_video:
            tokens = tokens[:, None]  # B×1×M×C: an image is a one-frame clip
        if tokens.shape[1:3] != (cfg.time_steps, cfg.grid_patches):
            raise ValueError(
                f"input gives {tokens.shape[1]} token frame(s) of {tokens.shape[2]} patches but the model was "
                f"built for {cfg.time_steps} of {cfg.grid_patches} (img_size={cfg.img_size}, "
                f"patch_size={cfg.patch_size}, num_frames={cfg.num_frames}); got input {tuple(x.shape[1:])}"
            )
        tokens = tokens + self.pos_embed[:, None, 1:]
        if cfg.is_video:
            tokens = tokens + self.temporal_pos_embedding[:, :, None]
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        return TokenState(hidden=torch.cat([cls, tokens.flatten(1, 2)], dim=1), residual=None, cls_index=0)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"temporal_pos_embedding"} if self.cfg.is_video else set())


#: (embed dim, depth) of the released sizes; B (768, 24) has no public checkpoint but is in the papers.
SIZES = {"tiny": (192, 24), "small": (384, 24), "middle": (576, 32), "base": (768, 24)}
#: ImageNet-1k image models, Kinetics-400 video models (released: Ti/S/M at 8/16/32/64 frames), and a
#: tiny video model for the moving-digits demo set (:mod:`rmeeto.data.video_demo`).
VARIANTS: dict[str, VideoMambaConfig] = {
    **{f"videomamba_{size}": VideoMambaConfig(embed_dim=dim, depth=depth) for size, (dim, depth) in SIZES.items()},
    **{
        f"videomamba_{size}_k400_f{frames}": VideoMambaConfig(embed_dim=SIZES[size][0], depth=SIZES[size][1],
                                                              num_classes=400, num_frames=frames)
        for size in ("tiny", "small", "middle") for frames in (8, 16, 32, 64)
    },
    "videomamba_demo": VideoMambaConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_classes=4,
                                        num_frames=8),
}


registry.register_family(VARIANTS, VideoMamba)
