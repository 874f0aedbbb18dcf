"""Vision Mamba (Vim; Zhu et al. 2024): images as a sequence of patch tokens with a class token
in the middle, scanned both ways by bidirectional Mamba layers.

    image (B, C, H, W) -> patches (conv, kernel = stride = patch) (B, M, D), M = (H/p) * (W/p)
    -> class token inserted at position M // 2 -> + learned position embedding
    -> MambaEncoder (prenorm BiMamba blocks, final norm) -> the class token -> head

`create_model("vim_tiny", num_classes=10, img_size=64, in_chans=1, n_layer=4)` builds one in the
manner of timm; `VisionConfig` holds every setting, and the Vim presets (with the digits task's
Vim) are registered in the model registry (registry.py). The position embedding is kept as the
patch grid (1, M, D) plus the class token's own (1, 1, D), so that `resize_pos_embed` can
interpolate the grid bicubically when the weights were made for another image size (the class
token's is kept); `VisionMamba.load_state_dict` does that by itself."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import is_plain
from ..modules.bimamba import BiMamba
from .. import ops
from . import registry
from .encoder import EncoderConfig, MambaEncoder
from .scan_orders import ScanOrder, grid_order, with_token


@dataclass
class VisionConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    d_model: int = 192
    n_layer: int = 24
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    scan: str = "raster"  # "raster" (Vim) or "cross" (row- and column-major paths, each both ways)
    pool: str = "cls"  # "cls": the middle class token (Vim); "mean": the mean of the patch tokens
    rms_norm: bool = True
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    divide_out: bool = True
    drop_path_rate: float = 0.0  # stochastic depth (timm's drop_path_rate), linear over the layers

    @property
    def grid(self) -> tuple[int, int]:
        h, w = _pair(self.img_size)
        return h // self.patch_size, w // self.patch_size

    def check(self) -> None:
        for name in ("patch_size", "in_chans", "num_classes", "d_model", "n_layer", "d_state", "d_conv", "expand"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for side in _pair(self.img_size):
            if isinstance(side, bool) or not isinstance(side, int) or side < 1:
                raise ValueError(f"img_size must be a positive int or (height, width), got {self.img_size!r}")
            if side % self.patch_size:
                raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.scan not in ("raster", "cross"):
            raise ValueError(f"scan must be 'raster' or 'cross', got {self.scan!r}")
        if self.pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")

    def encoder_config(self) -> EncoderConfig:
        return EncoderConfig(d_model=self.d_model, n_layer=self.n_layer, d_state=self.d_state, d_conv=self.d_conv,
                             expand=self.expand, n_paths=2 if self.scan == "cross" else 1, rms_norm=self.rms_norm,
                             norm_eps=self.norm_eps, residual_in_fp32=self.residual_in_fp32,
                             divide_out=self.divide_out, drop_path_rate=self.drop_path_rate)


# Vim's models: patch 16, 24 layers, d_state 16, expand 2, RMSNorm, fp32 residual, middle class
# token, bimamba v2 with the output halved. Parameters at 224 px, 1000 classes: 7M, 26M, 98M.
PRESETS = {
    "vim_tiny": VisionConfig(d_model=192),
    "vim_small": VisionConfig(d_model=384),
    "vim_base": VisionConfig(d_model=768),
}
# the digits task's Vim (tasks/digits.py): scikit-learn's 8x8 grey digits, 10 classes, patch 2 (a
# 4x4 grid of 16 patch tokens plus the class token), 44K parameters
DIGITS = VisionConfig(img_size=8, patch_size=2, in_chans=1, num_classes=10, d_model=32, n_layer=4, d_state=8)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, (H/p)*(W/p), D) patch tokens in raster order."""

    def __init__(self, img_size: tuple[int, int], patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected images (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(f"image size {tuple(x.shape[2:])} does not match the model's img_size {self.img_size}; "
                             f"create the model with img_size={tuple(x.shape[2:])} (position embeddings are "
                             f"interpolated when its weights are loaded)")
        if x.is_cuda and is_plain(self.proj, nn.Conv2d):  # a wrapped proj (LoRA, hooks) is called
            return self.as_gemm(x)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, M, D)

    def as_gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The same patch projection as one GEMM over the flattened patches (kernel = stride, so
        the conv is exactly that). On the H200 cuDNN's conv took 4.1 ms for 64 images of 1024 px
        under bf16 autocast; the copy into patch rows and the GEMM take a fraction of it. The copy
        casts as it goes (one pass over the pixels instead of a cast and a copy), on CUDA in a
        Triton kernel that reads and writes whole rows (`ops.patchify`)."""
        p = self.patch_size
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        # the pixels copied once into patch rows, cast to the GEMM's dtype on the way
        patches = ops.patchify(x, p, dtype)  # (B, M, C*p*p)
        return F.linear(patches, self.proj.weight.reshape(self.proj.out_channels, -1), self.proj.bias)  # (B, M, D)


class VisionMamba(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        gh, gw = cfg.grid
        self.num_patches = gh * gw
        self.cls_position = self.num_patches // 2  # the class token's place in the sequence (Vim)
        self.patch_embed = PatchEmbed(_pair(cfg.img_size), cfg.patch_size, cfg.in_chans, cfg.d_model)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches, cfg.d_model))  # the patch grid, raster
        self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.encoder = MambaEncoder(cfg.encoder_config())
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        self.order: ScanOrder = with_token(grid_order(cfg.scan, gh, gw), self.cls_position)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """Truncated N(0, 0.02) for the embeddings and the head (zero bias); every BiMamba's
        out_proj rescaled by 1/sqrt(n_layer), as for prenorm residual stacks."""
        for p in (self.cls_token, self.pos_embed, self.cls_pos_embed, self.head.weight):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.zeros_(self.head.bias)
        for m in self.modules():
            if isinstance(m, BiMamba):
                m.out_proj.weight.div_(math.sqrt(self.cfg.n_layer))

    def tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, C, H, W) -> (tokens (B, M+1, D) with the class token at cls_position,
        position embeddings (1, M+1, D) in the same layout)."""
        patches = self.patch_embed(x)  # (B, M, D)
        c = self.cls_position
        cls = self.cls_token.expand(patches.shape[0], -1, -1).to(patches.dtype)  # (B, 1, D)
        tokens = torch.cat([patches[:, :c], cls, patches[:, c:]], dim=1)  # (B, M+1, D)
        pos = torch.cat([self.pos_embed[:, :c], self.cls_pos_embed, self.pos_embed[:, c:]], dim=1)  # (1, M+1, D)
        return tokens, pos

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normed tokens (B, M+1, D), class token at cls_position."""
        tokens, pos = self.tokens(x)
        return self.encoder(tokens, pos, self.order)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, M+1, D) -> logits (B, num_classes), or the pooled (B, D) with pre_logits."""
        if self.cfg.pool == "cls":
            pooled = features[:, self.cls_position]  # (B, D)
        else:
            c = self.cls_position
            pooled = torch.cat([features[:, :c], features[:, c + 1:]], dim=1).mean(1)  # (B, D)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> logits (B, num_classes). With the class token pooled, the
        encoder's final add and norm run on that token alone."""
        if self.cfg.pool == "cls":
            tokens, pos = self.tokens(x)
            return self.head(self.encoder(tokens, pos, self.order, keep=self.cls_position)[:, 0])
        return self.forward_head(self.forward_features(x))

    # ---- what timm's scripts and optimizers ask of a model -------------------------------
    @property
    def num_classes(self) -> int:
        return self.head.out_features

    @property
    def num_features(self) -> int:
        return self.cfg.d_model

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh head for `num_classes` (timm's fine-tuning entry); global_pool 'token' pools
        the class token, 'avg' the mean of the patch tokens."""
        if global_pool is not None:
            pools = {"token": "cls", "avg": "mean"}
            if global_pool not in pools:
                raise ValueError(f"global_pool must be 'token' or 'avg', got {global_pool!r}")
            self.cfg = replace(self.cfg, pool=pools[global_pool])
        self.cfg = replace(self.cfg, num_classes=num_classes)
        self.cfg.check()
        like = self.cls_token  # the head's device and dtype (a wrapped head may have no .weight)
        self.head = nn.Linear(self.cfg.d_model, num_classes, device=like.device, dtype=like.dtype)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """The parameters that timm's optimizer factory leaves out of weight decay."""
        return {"cls_token", "pos_embed", "cls_pos_embed"}

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As nn.Module's, but a pos_embed made for another image size is interpolated to this
        model's patch grid first (see resize_pos_embed)."""
        state_dict = resize_state_dict(state_dict, self.cfg.grid)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int],
                     old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """pos_embed (1, gh*gw, D) over a patch grid in raster order -> (1, new_h*new_w, D),
    bicubic over the 2-D grid. old_grid defaults to the square grid of that many patches."""
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, M, D), got {tuple(pos_embed.shape)}")
    m, dim = pos_embed.shape[1:]
    if old_grid is None:
        side = math.isqrt(m)
        if side * side != m:
            raise ValueError(f"pos_embed has {m} positions, not a square grid: pass old_grid=(h, w)")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != m:
        raise ValueError(f"old_grid {old_grid} has {old_grid[0] * old_grid[1]} cells, pos_embed has {m}")
    new_grid = tuple(new_grid)
    if new_grid == tuple(old_grid):
        return pos_embed
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
    grid = F.interpolate(grid.float(), size=new_grid, mode="bicubic", align_corners=False)  # (1, D, h', w')
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)


def resize_state_dict(state_dict: dict, new_grid: tuple[int, int], old_grid: tuple[int, int] | None = None) -> dict:
    """A copy of state_dict with its `pos_embed` resized to new_grid (the class token's
    position embedding and every other entry are kept)."""
    state_dict = dict(state_dict)
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.shape[1] != new_grid[0] * new_grid[1]:
        state_dict["pos_embed"] = resize_pos_embed(pos, new_grid, old_grid)
    return state_dict


def vision_builder(preset: VisionConfig) -> Callable[..., VisionMamba]:
    """The registry's builder of a Vim preset: (**VisionConfig overrides) -> VisionMamba."""
    def build(**overrides) -> VisionMamba:
        known = {f.name for f in fields(VisionConfig)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown VisionConfig field(s) {sorted(unknown)}; known: {sorted(known)}")
        return VisionMamba(replace(preset, **overrides))
    return build


for _name, _preset in {**PRESETS, "vim_digits": DIGITS}.items():
    registry.register_model(_name, vision_builder(_preset))


def create_model(name: str, num_classes: int = 1000, img_size: int | tuple[int, int] = 224, in_chans: int = 3,
                 **overrides) -> VisionMamba:
    """A preset (vim_tiny, vim_small, vim_base) with any VisionConfig field overridden: the
    registry's `create_model` (mambakit.create_model) for the Vim presets, with timm's defaults."""
    if name not in PRESETS:
        raise ValueError(f"unknown vision model {name!r}; choose one of {', '.join(PRESETS)}")
    return registry.create_model(name, num_classes=num_classes, img_size=img_size, in_chans=in_chans, **overrides)


def config_dict(cfg: VisionConfig) -> dict:
    return asdict(cfg)


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) != 2:
            raise ValueError(f"img_size must be an int or (height, width), got {v!r}")
        return int(v[0]), int(v[1])
    return v, v
