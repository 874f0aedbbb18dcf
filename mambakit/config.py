"""`MambaConfig`: the shape of a Mamba language model, its presets, and conversion
to and from the official (`mamba_ssm`) and Hugging Face (`MambaForCausalLM`,
`Mamba2ForCausalLM`) configs, for Mamba-1 (layer="mamba") and Mamba-2 (layer="mamba2")."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

MAX_D_STATE = 256
LAYERS = ("mamba", "s4d", "mamba2")
# upper bounds far above any real model, so that a corrupt config fails with a message here,
# not later in an allocation of terabytes
MAX_SIZES = {"d_state": MAX_D_STATE, "d_model": 2**20, "n_layer": 2**14, "vocab_size": 2**31 - 1, "d_conv": 2**12, "expand": 2**8,
             "pad_vocab_size_multiple": 2**20, "dt_rank": 2**20, "headdim": 2**16, "ngroups": 2**16,
             "chunk_size": 2**20}
BOOL_FIELDS = ("conv_bias", "bias", "rms_norm", "residual_in_fp32", "tie_embeddings", "rescale_prenorm_residual",
               "gate")
# the names of MambaConfig's fields in the Hugging Face and the official config.json, where they differ
HF_NAMES = {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "d_state": "state_size", "d_conv": "conv_kernel",
            "dt_rank": "time_step_rank", "dt_min": "time_step_min", "dt_max": "time_step_max",
            "dt_init_floor": "time_step_floor", "dt_scale": "time_step_scale", "conv_bias": "use_conv_bias",
            "bias": "use_bias", "norm_epsilon": "layer_norm_epsilon", "tie_embeddings": "tie_word_embeddings"}
OFFICIAL_NAMES = {name: f"ssm_cfg.{name}" for name in ("d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max",
                                                       "dt_init_floor", "dt_scale", "conv_bias", "bias")}
# the same for Mamba-2: transformers' Mamba2Config and the official ssm_cfg of a Mamba2 mixer
HF2_NAMES = {**HF_NAMES, "headdim": "head_dim", "ngroups": "n_groups"}
OFFICIAL2_NAMES = {**OFFICIAL_NAMES, **{name: f"ssm_cfg.{name}" for name in ("headdim", "ngroups", "chunk_size")}}


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
    layer: str = "mamba"  # the mixer: "mamba" (selective, S6), "s4d" (diagonal LTI, S4D-Lin) or "mamba2" (SSD)
    gate: bool = True  # the SiLU(z) gate branch of the mixer (the paper's Table 1 "without gate": False)
    # Mamba-2 (layer="mamba2") only: heads of headdim channels, B/C shared by ngroups groups, the
    # SSD's chunk length
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256

    def __post_init__(self) -> None:
        self._check_sizes()
        for name in BOOL_FIELDS:  # exactly True or False: "false" or 0 would pass as a truth value
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MambaConfig.{name} must be a bool (true or false), got {_show(getattr(self, name))}")
        for name in ("dt_min", "dt_max", "dt_init_floor", "dt_scale", "norm_epsilon", "initializer_range"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"MambaConfig.{name} must be a finite positive number, got {_show(value)}")
        if self.dt_min > self.dt_max:
            raise ValueError(f"MambaConfig.dt_min ({_show(self.dt_min)}) must be <= dt_max ({_show(self.dt_max)})")
        if not isinstance(self.layer, str) or self.layer not in LAYERS:
            raise ValueError(f"MambaConfig.layer must be one of {LAYERS}, got {_show(self.layer)}")
        if self.layer == "s4d" and self.d_state % 2:
            raise ValueError(f"MambaConfig.d_state must be even for layer='s4d' (d_state/2 complex modes), "
                             f"got {self.d_state}")
        if self.layer == "mamba2":
            if self.d_inner % self.headdim:
                raise ValueError(f"MambaConfig.headdim ({self.headdim}) must divide d_inner = expand * d_model "
                                 f"= {self.d_inner} for layer='mamba2'")
            if (self.d_inner // self.headdim) % self.ngroups:
                raise ValueError(f"MambaConfig.ngroups ({self.ngroups}) must divide the number of heads "
                                 f"{self.d_inner // self.headdim} (d_inner / headdim) for layer='mamba2'")
            if not self.gate:
                raise ValueError("MambaConfig.gate must be true for layer='mamba2' (its norm is gated)")

    def _check_sizes(self) -> None:
        """Every size a positive int (not a bool) up to its MAX_SIZES bound; dt_rank may be "auto"."""
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple",
                     "headdim", "ngroups", "chunk_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {_show(value)}")
            if value > MAX_SIZES[name]:
                raise ValueError(f"MambaConfig.{name} must be <= {MAX_SIZES[name]}, got {value}")
        if self.dt_rank != "auto":
            if not _is_int(self.dt_rank) or self.dt_rank < 1:
                raise ValueError(f"MambaConfig.dt_rank must be 'auto' or a positive int, got {_show(self.dt_rank)}")
            if self.dt_rank > MAX_SIZES["dt_rank"]:
                raise ValueError(f"MambaConfig.dt_rank must be <= {MAX_SIZES['dt_rank']}, got {self.dt_rank}")

    def _check_standard_mixer(self, fmt: str) -> None:
        """The official and Hugging Face formats hold gated Mamba-1 mixers and Mamba-2 mixers only."""
        if self.layer not in ("mamba", "mamba2") or not self.gate:
            raise ValueError(f"the {fmt} format holds gated Mamba (layer='mamba') and Mamba-2 (layer='mamba2') "
                             f"mixers only (layer={self.layer!r}, gate={self.gate} given); save in the mambakit format")

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
        if not isinstance(d, dict):
            raise ValueError(f"a MambaConfig must be made from a dict of fields, got {type(d).__name__}")
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
        if self.layer == "mamba2":
            return self._to_official_mamba2()
        ssm_cfg = {  # the keyword arguments of mamba_ssm's Mamba (Mamba1) mixer
            "d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
            "dt_rank": self.dt_rank, "dt_min": self.dt_min, "dt_max": self.dt_max,
            "dt_init_floor": self.dt_init_floor, "dt_scale": self.dt_scale,
            "conv_bias": self.conv_bias, "bias": self.bias,
        }
        # Only the fields of mamba_ssm 1.2's MambaConfig, so that 1.2 and 2.x both read it: 2.x's
        # d_intermediate, attn_layer_idx, attn_cfg and ssm_cfg.layer default to 0, [], {} and
        # "Mamba1" (a pure Mamba-1 model), and 1.2's MambaConfig(**config) refuses them.
        return {
            "d_model": self.d_model, "n_layer": self.n_layer, "vocab_size": self.vocab_size, "ssm_cfg": ssm_cfg,
            "rms_norm": self.rms_norm, "residual_in_fp32": self.residual_in_fp32,
            "fused_add_norm": True, "pad_vocab_size_multiple": self.pad_vocab_size_multiple,
            "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def from_official(cls, d: dict[str, Any]) -> "MambaConfig":
        """The config of mamba_ssm's config.json; every field is type-checked and named when wrong."""
        read = _Fields(d, "official config")
        ssm_cfg = _Fields(read.get("ssm_cfg", dict, default={}), "official config ssm_cfg")
        layer = ssm_cfg.get("layer", str, default="Mamba1")
        if layer not in ("Mamba1", "Mamba2"):
            raise ValueError(f"official config has ssm_cfg.layer={layer!r}; mambakit reads Mamba1 and Mamba2 "
                             f"models only")
        if read.get("attn_layer_idx", list, default=[]):
            raise ValueError("official config has attention layers (attn_layer_idx); mambakit reads pure Mamba models only")
        if read.get("d_intermediate", "count", default=0):
            raise ValueError("official config has d_intermediate > 0 (MLP layers); mambakit reads pure Mamba models only")
        if layer == "Mamba2":
            return cls._from_official_mamba2(read, ssm_cfg)
        allowed = {"layer", "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init_floor",
                   "dt_scale", "conv_bias", "bias"}
        ignored = {"dt_init", "dt_limit", "use_fast_path"}
        unknown = sorted(set(ssm_cfg.d) - allowed - ignored)
        if unknown:
            raise ValueError(f"official config ssm_cfg has unsupported keys {unknown}")
        kinds = {"d_state": "size", "d_conv": "size", "expand": "size", "dt_rank": "rank", "conv_bias": bool,
                 "bias": bool, "dt_min": "number", "dt_max": "number", "dt_init_floor": "number", "dt_scale": "number"}
        return _made(
            cls, OFFICIAL_NAMES, "official config",
            d_model=read.get("d_model", "size"), n_layer=read.get("n_layer", "size"),
            vocab_size=read.get("vocab_size", "size"),
            rms_norm=read.get("rms_norm", bool, default=True),
            residual_in_fp32=read.get("residual_in_fp32", bool, default=True),
            pad_vocab_size_multiple=read.get("pad_vocab_size_multiple", "size", default=8),
            tie_embeddings=read.get("tie_embeddings", bool, default=True),
            **{k: ssm_cfg.get(k, kind) for k, kind in kinds.items() if k in ssm_cfg.d},
        )

    # ---- the Hugging Face MambaConfig ----------------------------------------------------
    def to_hf(self) -> dict[str, Any]:
        """The config.json of a Hugging Face MambaForCausalLM with the same outputs. The
        embedding is stored at its padded size, so vocab_size is the padded one.
        rescale_prenorm_residual is written false: transformers (up to 5.x at least) applies it
        to out_proj at every from_pretrained, loaded weights included, so true would divide the
        saved out_proj by sqrt(n_layer) once more. It changes only a fresh init, which a
        checkpoint's weights replace."""
        self._check_standard_mixer("Hugging Face Mamba")
        if not self.rms_norm:
            raise ValueError("the Hugging Face Mamba format supports RMSNorm only (rms_norm=False given)")
        if self.layer == "mamba2":
            return self._to_hf_mamba2()
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
            "rescale_prenorm_residual": False,
            "tie_word_embeddings": self.tie_embeddings, "use_cache": True,
        }

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "MambaConfig":
        """The config of a Hugging Face MambaForCausalLM's config.json; every field is
        type-checked and named when wrong."""
        read = _Fields(d, "Hugging Face config")
        model_type = read.get("model_type", str, default="mamba")
        if model_type == "mamba2":
            return cls._from_hf_mamba2(read)
        if model_type != "mamba":
            raise ValueError(f"Hugging Face config has model_type={model_type!r}; mambakit reads 'mamba' "
                             f"(MambaForCausalLM) and 'mamba2' (Mamba2ForCausalLM) only")
        hidden = read.get("hidden_size", "size")
        expand = read.get("expand", "size", default=2)
        intermediate = read.get("intermediate_size", "size", default=expand * hidden)
        if intermediate != expand * hidden:
            raise ValueError(
                f"Hugging Face config: intermediate_size={intermediate} != expand*hidden_size={expand * hidden}")
        act = read.get("hidden_act", str, default="silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"Hugging Face config: hidden_act={act!r} is not supported (only silu)")
        return _made(
            cls, HF_NAMES, "Hugging Face config",
            d_model=hidden, n_layer=read.get("num_hidden_layers", "size"), vocab_size=read.get("vocab_size", "size"),
            d_state=read.get("state_size", "size", default=16), d_conv=read.get("conv_kernel", "size", default=4),
            expand=expand, dt_rank=read.get("time_step_rank", "rank", default="auto"),
            dt_min=read.get("time_step_min", "number", default=0.001),
            dt_max=read.get("time_step_max", "number", default=0.1),
            dt_init_floor=read.get("time_step_floor", "number", default=1e-4),
            dt_scale=read.get("time_step_scale", "number", default=1.0),
            conv_bias=read.get("use_conv_bias", bool, default=True), bias=read.get("use_bias", bool, default=False),
            rms_norm=True, norm_epsilon=read.get("layer_norm_epsilon", "number", default=1e-5),
            residual_in_fp32=read.get("residual_in_fp32", bool, default=True),
            pad_vocab_size_multiple=1,  # HF stores the embedding at its final size
            tie_embeddings=read.get("tie_word_embeddings", bool, default=True),
            initializer_range=read.get("initializer_range", "number", default=0.02),
            rescale_prenorm_residual=read.get("rescale_prenorm_residual", bool, default=True),
        )

    # ---- Mamba-2 in the official and Hugging Face configs --------------------------------
    def _to_official_mamba2(self) -> dict[str, Any]:
        """mamba_ssm 2.x's config.json of a pure Mamba-2 model: ssm_cfg holds the keyword
        arguments of its Mamba2 mixer, whose gated norm multiplies by the gate before normalising
        (norm_before_gate=False, its default and ours)."""
        ssm_cfg = {
            "layer": "Mamba2", "d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand,
            "headdim": self.headdim, "ngroups": self.ngroups, "chunk_size": self.chunk_size,
            "dt_min": self.dt_min, "dt_max": self.dt_max, "dt_init_floor": self.dt_init_floor,
            "conv_bias": self.conv_bias, "bias": self.bias,
        }
        return {
            "d_model": self.d_model, "d_intermediate": 0, "n_layer": self.n_layer, "vocab_size": self.vocab_size,
            "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": self.rms_norm,
            "residual_in_fp32": self.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple, "tie_embeddings": self.tie_embeddings,
        }

    @classmethod
    def _from_official_mamba2(cls, read: "_Fields", ssm_cfg: "_Fields") -> "MambaConfig":
        """A config.json whose ssm_cfg.layer is "Mamba2"; absent keys take the official Mamba2
        mixer's defaults (d_state 128, headdim 64, ngroups 1, chunk_size 256, ...)."""
        unknown = sorted(set(ssm_cfg.d) - set(OFFICIAL2_SSM_KINDS) - {"layer"} - set(OFFICIAL2_FIXED)
                         - OFFICIAL2_IGNORED)
        if unknown:
            raise ValueError(f"official config ssm_cfg has keys that a Mamba2 mixer does not take or mambakit "
                             f"does not support: {unknown}")
        fields = {k: ssm_cfg.get(k, kind) for k, kind in OFFICIAL2_SSM_KINDS.items() if k in ssm_cfg.d}
        d_model = read.get("d_model", "size")
        d_inner = fields.get("expand", 2) * d_model
        for key, default in OFFICIAL2_FIXED.items():
            value = _special_floats(ssm_cfg.d.get(key, default))
            if key == "d_ssm" and value is not None and value != d_inner:
                raise ValueError(f"official config: ssm_cfg.d_ssm={_show(value)} (an SSM on part of the channels) is "
                                 f"not supported; mambakit's Mamba-2 runs the SSM on all expand * d_model = {d_inner}")
            if key != "d_ssm" and not _same_value(value, default):
                raise ValueError(f"official config: ssm_cfg.{key}={_show(value)} is not supported; mambakit's "
                                 f"Mamba-2 has {key}={_show(default)}")
        return _made(
            cls, OFFICIAL2_NAMES, "official config", layer="mamba2",
            d_model=d_model, n_layer=read.get("n_layer", "size"), vocab_size=read.get("vocab_size", "size"),
            rms_norm=read.get("rms_norm", bool, default=True),
            residual_in_fp32=read.get("residual_in_fp32", bool, default=True),
            pad_vocab_size_multiple=read.get("pad_vocab_size_multiple", "size", default=8),
            tie_embeddings=read.get("tie_embeddings", bool, default=True),
            **{"d_state": 128, **fields},  # the official Mamba2's d_state, not Mamba-1's 16
        )

    def _to_hf_mamba2(self) -> dict[str, Any]:
        """The config.json of a transformers Mamba2ForCausalLM with the same outputs. As for
        Mamba-1, vocab_size is the padded one and rescale_prenorm_residual is false. The token
        ids are null: MambaConfig does not know them (transformers' defaults would make token 2
        an end of sequence). time_step_limit (0, inf) is written with a bare Infinity, which
        every transformers version reads."""
        return {
            "architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2",
            "vocab_size": self.padded_vocab_size, "hidden_size": self.d_model, "num_hidden_layers": self.n_layer,
            "state_size": self.d_state, "num_heads": self.d_inner // self.headdim, "head_dim": self.headdim,
            "n_groups": self.ngroups, "expand": self.expand, "conv_kernel": self.d_conv,
            "chunk_size": self.chunk_size, "use_bias": self.bias, "use_conv_bias": self.conv_bias,
            "hidden_act": "silu", "layer_norm_epsilon": self.norm_epsilon, "residual_in_fp32": self.residual_in_fp32,
            "initializer_range": self.initializer_range, "rescale_prenorm_residual": False,
            "time_step_min": self.dt_min, "time_step_max": self.dt_max, "time_step_floor": self.dt_init_floor,
            "time_step_limit": [0.0, math.inf], "tie_word_embeddings": self.tie_embeddings,
            "pad_token_id": None, "bos_token_id": None, "eos_token_id": None, "use_cache": True,
        }

    @classmethod
    def _from_hf_mamba2(cls, read: "_Fields") -> "MambaConfig":
        """The config of a transformers Mamba2ForCausalLM's config.json (model_type "mamba2");
        absent fields take transformers' Mamba2Config defaults. A field that would make
        transformers compute something mambakit cannot (a clamp of Δ, another activation, an
        unknown field) is a ValueError naming it."""
        unknown = sorted(set(read.d) - HF2_READ - HF2_IGNORED - HF_GENERIC_FIELDS)
        if unknown:
            raise ValueError(f"Hugging Face config has fields that mambakit's Mamba-2 cannot represent: {unknown}")
        act = read.get("hidden_act", str, default="silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"Hugging Face config: hidden_act={act!r} is not supported (only silu)")
        limit = _special_floats(read.get("time_step_limit", list, default=[0.0, math.inf]))
        if not _same_value(limit, [0.0, math.inf]):
            raise ValueError(f"Hugging Face config: time_step_limit={_show(limit)} is not supported; mambakit's "
                             f"Mamba-2 does not clamp the time step (only [0.0, Infinity])")
        hidden, expand = read.get("hidden_size", "size"), read.get("expand", "size", default=2)
        heads, head_dim = read.get("num_heads", "size", default=128), read.get("head_dim", "size", default=64)
        if heads * head_dim != expand * hidden:
            raise ValueError(f"Hugging Face config: num_heads * head_dim = {heads} * {head_dim} must equal "
                             f"expand * hidden_size = {expand} * {hidden}")
        return _made(
            cls, HF2_NAMES, "Hugging Face config", layer="mamba2",
            d_model=hidden, n_layer=read.get("num_hidden_layers", "size"), vocab_size=read.get("vocab_size", "size"),
            d_state=read.get("state_size", "size", default=128), d_conv=read.get("conv_kernel", "size", default=4),
            expand=expand, headdim=head_dim, ngroups=read.get("n_groups", "size", default=8),
            chunk_size=read.get("chunk_size", "size", default=256),
            dt_min=read.get("time_step_min", "number", default=0.001),
            dt_max=read.get("time_step_max", "number", default=0.1),
            dt_init_floor=read.get("time_step_floor", "number", default=1e-4),
            conv_bias=read.get("use_conv_bias", bool, default=True), bias=read.get("use_bias", bool, default=False),
            rms_norm=True, norm_epsilon=read.get("layer_norm_epsilon", "number", default=1e-5),
            residual_in_fp32=read.get("residual_in_fp32", bool, default=True),
            pad_vocab_size_multiple=1,  # HF stores the embedding at its final size
            tie_embeddings=read.get("tie_word_embeddings", bool, default=False),
            initializer_range=read.get("initializer_range", "number", default=0.1),
            rescale_prenorm_residual=read.get("rescale_prenorm_residual", bool, default=False),
        )


# The official Mamba2 mixer's ssm_cfg: the keys read (with their kinds), those that must keep
# the value mambakit's mixer has, and those that change only a fresh init or the kernels chosen
OFFICIAL2_SSM_KINDS = {"d_state": "size", "d_conv": "size", "expand": "size", "headdim": "size", "ngroups": "size",
                       "chunk_size": "size", "dt_min": "number", "dt_max": "number", "dt_init_floor": "number",
                       "conv_bias": bool, "bias": bool}
OFFICIAL2_FIXED = {"d_ssm": None, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False,
                   "dt_limit": [0.0, math.inf]}
OFFICIAL2_IGNORED = {"A_init_range", "conv_init", "use_mem_eff_path", "sequence_parallel"}
# transformers' Mamba2Config: the fields read, and those that do not change what transformers
# computes: time_step_rank, time_step_scale and time_step_init_scheme are Mamba-1's, and the
# rms_norm, norm_before_gate and intermediate_size of older versions never changed what its
# Mamba2 model computes (always RMSNorm, the gate applied before the norm, expand * hidden_size
# channels)
HF2_READ = {"model_type", "vocab_size", "hidden_size", "num_hidden_layers", "state_size", "num_heads", "head_dim",
            "n_groups", "expand", "conv_kernel", "chunk_size", "use_bias", "use_conv_bias", "hidden_act",
            "layer_norm_epsilon", "residual_in_fp32", "initializer_range", "rescale_prenorm_residual",
            "time_step_min", "time_step_max", "time_step_floor", "time_step_limit", "tie_word_embeddings"}
HF2_IGNORED = {"time_step_rank", "time_step_scale", "time_step_init_scheme", "rms_norm", "norm_before_gate",
               "intermediate_size", "use_cache"}
# what every transformers config may hold besides its model's fields: names, versions, token
# ids, output switches and the generation defaults that older versions kept in config.json
HF_GENERIC_FIELDS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path", "_commit_hash",
    "_attn_implementation_autoset", "pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id",
    "decoder_start_token_id", "return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "use_return_dict", "id2label", "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "chunk_size_feed_forward", "is_decoder", "is_encoder_decoder", "add_cross_attention",
    "tie_encoder_decoder", "cross_attention_hidden_size", "pruned_heads", "max_length", "min_length", "do_sample",
    "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p",
    "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens",
}
_SPECIAL_FLOATS = {"Infinity": math.inf, "-Infinity": -math.inf, "NaN": math.nan}


def _special_floats(value: Any) -> Any:
    """A JSON value with transformers 5's encoding of non-finite floats ({"__float__": "Infinity"})
    decoded, inside lists too; anything else as it is."""
    if isinstance(value, dict) and set(value) == {"__float__"} and isinstance(value["__float__"], str) \
            and value["__float__"] in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[value["__float__"]]
    if isinstance(value, (list, tuple)):
        return [_special_floats(v) for v in value]
    return value


def _same_value(value: Any, expected: Any) -> bool:
    """value == expected, for JSON values: a bool is not an int, a list of numbers equals the
    tuple of the same numbers."""
    if isinstance(expected, bool) or expected is None:
        return value is expected
    if isinstance(expected, (list, tuple)):
        return (isinstance(value, (list, tuple)) and len(value) == len(expected)
                and all(_is_int(v) or isinstance(v, float) for v in value)
                and all(v == e for v, e in zip(value, expected)))
    return value == expected


def _made(cls: type, names: dict[str, str], where: str, **fields: Any) -> "MambaConfig":
    """cls(**fields), with MambaConfig's errors speaking of the fields by their names in the
    foreign config (`hidden_size (MambaConfig.d_model) must be ...`)."""
    try:
        return cls(**fields)
    except ValueError as err:
        message = re.sub(r"MambaConfig\.(\w+)", lambda m: f"{names.get(m.group(1), m.group(1))} (MambaConfig.{m.group(1)})",
                         str(err))
        raise ValueError(f"{where}: {message}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_REQUIRED = object()


class _Fields:
    """Reads the fields of a foreign config (a JSON object), each checked for its kind, so that
    a wrong one is a ValueError naming it rather than a KeyError, a truth value taken from a
    string ("false" is true), or arithmetic on a list. Kinds: bool, str, list, dict; "size" (an
    int >= 1), "count" (an int >= 0), "rank" (a size or "auto"), "number" (a finite int or float).
    MambaConfig then checks the ranges."""

    def __init__(self, d: Any, where: str):
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be a JSON object, got {type(d).__name__}")
        self.d, self.where = d, where

    def get(self, key: str, kind: Any, default: Any = _REQUIRED) -> Any:
        if key not in self.d:
            if default is _REQUIRED:
                raise ValueError(f"{self.where} is missing the field {key!r}")
            return default
        value = self.d[key]
        if value is None and kind in (dict, list):  # e.g. "ssm_cfg": null
            return default
        if not _is_kind(value, kind):
            want = {"size": "an int >= 1", "count": "an int >= 0", "rank": "'auto' or an int >= 1",
                    "number": "a finite number"}.get(kind) or f"a {getattr(kind, '__name__', kind)}"
            raise ValueError(f"{self.where}: {key} must be {want}, got {_show(value)}")
        return value


def _is_kind(value: Any, kind: Any) -> bool:
    if kind == "size":
        return _is_int(value) and value >= 1
    if kind == "count":
        return _is_int(value) and value >= 0
    if kind == "rank":
        return value == "auto" or (_is_int(value) and value >= 1)
    if kind == "number":
        return _is_number(value)
    return isinstance(value, kind)


def _is_number(value: Any) -> bool:
    """An int or a finite float (not a bool; an int of any size, which math.isfinite cannot take)."""
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _show(value: Any, limit: int = 60) -> str:
    """repr(value), shortened: a config's wrong value may be a megabyte-long string."""
    text = repr(value) if not _is_int(value) or abs(value) < 10**limit else f"an int of {len(str(abs(value)))} digits"
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
    # Mamba-2 (SSD) with the official shapes: d_state 128, heads of 64 channels, one group
    "mamba2-tiny": MambaConfig(d_model=128, n_layer=4, vocab_size=256, layer="mamba2", d_state=16, headdim=32),
    "mamba2-130m": MambaConfig(d_model=768, n_layer=24, layer="mamba2", d_state=128, pad_vocab_size_multiple=16),
    "mamba2-370m": MambaConfig(d_model=1024, n_layer=48, layer="mamba2", d_state=128, pad_vocab_size_multiple=16),
    "mamba2-780m": MambaConfig(d_model=1536, n_layer=48, layer="mamba2", d_state=128, pad_vocab_size_multiple=16),
    "mamba2-1.3b": MambaConfig(d_model=2048, n_layer=48, layer="mamba2", d_state=128, pad_vocab_size_multiple=16),
    "mamba2-2.7b": MambaConfig(d_model=2560, n_layer=64, layer="mamba2", d_state=128, pad_vocab_size_multiple=16),
}
