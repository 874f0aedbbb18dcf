"""`MambaConfig`: the shape of a Mamba language model, its presets, and conversion
to and from the official (`mamba_ssm`) and Hugging Face (`MambaForCausalLM`) configs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

MAX_D_STATE = 256
LAYERS = ("mamba", "s4d")


@dataclass
class MambaConfig:
    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | str = "auto"  # "auto" = ceil(d_model / 16)
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    conv_bias: bool = True
    bias: bool = False  # bias of in_proj / out_proj
    rms_norm: bool = True  # RMSNorm, else LayerNorm
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    initializer_range: float = 0.02
    rescale_prenorm_residual: bool = True
    layer: str = "mamba"  # the mixer: "mamba" (selective, S6) or "s4d" (diagonal LTI, S4D-Lin)
    gate: bool = True  # the SiLU(z) gate branch of the mixer (the paper's Table 1 "without gate": False)

    def __post_init__(self) -> None:
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
        if self.d_state > MAX_D_STATE:
            raise ValueError(f"MambaConfig.d_state must be <= {MAX_D_STATE}, got {self.d_state}")
        if self.dt_rank != "auto":
            if isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int) or self.dt_rank < 1:
                raise ValueError(f"MambaConfig.dt_rank must be 'auto' or a positive int, got {self.dt_rank!r}")
        for name in ("dt_min", "dt_max", "dt_init_floor", "dt_scale", "norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"MambaConfig.{name} must be a finite positive number, got {value!r}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"MambaConfig.dt_min ({self.dt_min}) must be <= dt_max ({self.dt_max})")
        if self.layer not in LAYERS:
            raise ValueError(f"MambaConfig.layer must be one of {LAYERS}, got {self.layer!r}")
        if not isinstance(self.gate, bool):
            raise ValueError(f"MambaConfig.gate must be a bool, got {self.gate!r}")
        if self.layer == "s4d" and self.d_state % 2:
            raise ValueError(f"MambaConfig.d_state must be even for layer='s4d' (d_state/2 complex modes), "
                             f"got {self.d_state}")

    def _check_standard_mixer(self, fmt: str) -> None:
        """The official and Hugging Face formats hold gated Mamba mixers only."""
        if self.layer != "mamba" or not self.gate:
            raise ValueError(f"the {fmt} format holds gated Mamba mixers only "
                             f"(layer={self.layer!r}, gate={self.gate} given); save in the mambakit format")

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def resolved_dt_rank(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return (self.vocab_size + m - 1) // m * m

    # ---- presets -------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "MambaConfig":
        """The config of a preset of PRESETS with any field overridden."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MambaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MambaConfig fields: {unknown}")
        return cls(**d)

    # ---- the official mamba_ssm config.json ---------------------------------------------
    def to_official(self) -> dict[str, Any]:
        self._check_standard_mixer("official mamba_ssm")
        if self.norm_epsilon != 1e-5:  # mamba_ssm's config has no epsilon; its models use 1e-5
            raise ValueError(f"the official mamba_ssm format supports norm_epsilon=1e-5 only "
                             f"(norm_epsilon={self.norm_epsilon} given)")
        ssm_cfg = {
            "layer": "Mamba1", "d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
            "dt_rank": self.dt_rank, "dt_min": self.dt_min, "dt_max": self.dt_max,
            "dt_init_floor": self.dt_init_floor, "dt_scale": self.dt_scale,
            "conv_bias": self.conv_bias, "bias": self.bias,
        }
        return {
            "d_model": self.d_model, "d_intermediate": 0, "n_layer": self.n_layer,
            "vocab_size": self.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
            "rms_norm": self.rms_norm, "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True, "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> "MambaConfig":
        ssm_cfg = dict(d.get("ssm_cfg") or {})
        layer = ssm_cfg.pop("layer", "Mamba1")
        if layer != "Mamba1":
            raise ValueError(f"official config has ssm_cfg.layer={layer!r}; mambakit reads Mamba1 models only")
        if d.get("attn_layer_idx"):
            raise ValueError("official config has attention layers (attn_layer_idx); mambakit reads pure Mamba models only")
        if d.get("d_intermediate", 0):
            raise ValueError("official config has d_intermediate > 0 (MLP layers); mambakit reads pure Mamba models only")
        allowed = {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor",
                   "dt_scale", "conv_bias", "bias"}
        ignored = {"dt_init", "dt_limit", "use_fast_path"}
        unknown = sorted(set(ssm_cfg) - allowed - ignored)
        if unknown:
            raise ValueError(f"official config ssm_cfg has unsupported keys {unknown}")
        return cls(
            d_model=d["d_model"], n_layer=d["n_layer"], vocab_size=d["vocab_size"],
            rms_norm=d.get("rms_norm", True), residual_in_fp32=d.get("residual_in_fp32", True),
            pad_vocab_size_multiple=d.get("pad_vocab_size_multiple", 8),
            tie_embeddings=d.get("tie_embeddings", True),
            **{k: v for k, v in ssm_cfg.items() if k in allowed},
        )

    # ---- the Hugging Face MambaConfig ----------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        self._check_standard_mixer("Hugging Face Mamba")
        if not self.rms_norm:
            raise ValueError("the Hugging Face Mamba format supports RMSNorm only (rms_norm=False given)")
        return {
            "architectures": ["MambaForCausalLM"], "model_type": "mamba",
            "vocab_size": self.padded_vocab_size, "hidden_size": self.d_model,
            "state_size": self.d_state, "num_hidden_layers": self.n_layer,
            "layer_norm_epsilon": self.norm_epsilon, "expand": self.expand,
            "intermediate_size": self.d_inner, "conv_kernel": self.d_conv,
            "use_bias": self.bias, "use_conv_bias": self.conv_bias, "hidden_act": "silu",
            "initializer_range": self.initializer_range, "residual_in_fp32": self.residual_in_fp32,
            "time_step_rank": self.resolved_dt_rank, "time_step_scale": self.dt_scale,
            "time_step_min": self.dt_min, "time_step_max": self.dt_max,
            "time_step_init_scheme": "random", "time_step_floor": self.dt_init_floor,
            "rescale_prenorm_residual": self.rescale_prenorm_residual,
            "tie_word_embeddings": self.tie_embeddings, "use_cache": True,
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "MambaConfig":
        if d.get("model_type", "mamba") != "mamba":
            raise ValueError(f"Hugging Face config has model_type={d.get('model_type')!r}; expected 'mamba'")
        hidden = d["hidden_size"]
        expand = d.get("expand", 2)
        if "intermediate_size" in d and d["intermediate_size"] != expand * hidden:
            raise ValueError(
                f"Hugging Face config: intermediate_size={d['intermediate_size']} != expand*hidden_size={expand * hidden}")
        if d.get("hidden_act", "silu") not in ("silu", "swish"):
            raise ValueError(f"Hugging Face config: hidden_act={d['hidden_act']!r} is not supported (only silu)")
        rank = d.get("time_step_rank", "auto")
        return cls(
            d_model=hidden, n_layer=d["num_hidden_layers"], vocab_size=d["vocab_size"],
            d_state=d.get("state_size", 16), d_conv=d.get("conv_kernel", 4), expand=expand,
            dt_rank=rank, dt_min=d.get("time_step_min", 0.001), dt_max=d.get("time_step_max", 0.1),
            dt_init_floor=d.get("time_step_floor", 1e-4), dt_scale=d.get("time_step_scale", 1.0),
            conv_bias=d.get("use_conv_bias", True), bias=d.get("use_bias", False),
            rms_norm=True, norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            residual_in_fp32=d.get("residual_in_fp32", True),
            pad_vocab_size_multiple=1,  # HF stores the embedding at its final size
            tie_embeddings=d.get("tie_word_embeddings", True),
            initializer_range=d.get("initializer_range", 0.02),
            rescale_prenorm_residual=d.get("rescale_prenorm_residual", True),
        )


# the language-model presets (`mambakit.PRESETS`, `mambakit train --preset`); models/lm.py registers
# each of them in the model registry, so that `mambakit.create_model(name)` builds it
PRESETS: dict[str, MambaConfig] = {
    # byte-level vocabulary (256) so the CLI runs with no tokenizer download
    "tiny": MambaConfig(d_model=128, n_layer=4, vocab_size=256, d_state=16),
    "130m": MambaConfig(d_model=768, n_layer=24),
    "370m": MambaConfig(d_model=1024, n_layer=48),
    "790m": MambaConfig(d_model=1536, n_layer=48),
    "1.4b": MambaConfig(d_model=2048, n_layer=48),
    "2.8b": MambaConfig(d_model=2560, n_layer=64),
}
