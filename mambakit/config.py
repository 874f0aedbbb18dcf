"""`MambaConfig`: the shape of a Mamba language model, its presets, and conversion
to and from the official (`mamba_ssm`) and Hugging Face (`MambaForCausalLM`,
`Mamba2ForCausalLM`) configs, for Mamba-1 (layer="mamba") and Mamba-2 (layer="mamba2").

Hybrids: attention layers among the Mamba layers (`attn_layer_idx`, `attn_cfg`: the official
`MambaLMHeadModel`'s fields, resolved and checked by `AttentionConfig`) and a gated MLP after
every mixer (`d_intermediate`), or a mixture of experts in some layers (`moe_layer_idx`, Jamba).
They convert to and from the official hybrid config.json and transformers' `JambaForCausalLM`
(Mamba-1) and `BambaForCausalLM` (Mamba-2) configs."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

MAX_D_STATE = 256
LAYERS = ("mamba", "s4d", "mamba2")
# upper bounds far above any real model, so that a corrupt config fails with a message here,
# not later in an allocation of terabytes
MAX_SIZES = {"d_state": MAX_D_STATE, "d_model": 2**20, "n_layer": 2**14, "vocab_size": 2**31 - 1, "d_conv": 2**12, "expand": 2**8,
             "pad_vocab_size_multiple": 2**20, "dt_rank": 2**20, "headdim": 2**16, "ngroups": 2**16,
             "chunk_size": 2**20, "d_intermediate": 2**24, "num_experts": 2**12, "num_experts_per_tok": 2**12}
BOOL_FIELDS = ("conv_bias", "bias", "rms_norm", "residual_in_fp32", "tie_embeddings", "rescale_prenorm_residual",
               "gate", "inner_norms")
OFFICIAL_MLP_MULTIPLE = 128  # the official GatedMLP rounds its hidden width up to a multiple of this
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
    # Hybrids, as the official MambaLMHeadModel: the layers in attn_layer_idx are causal
    # attention (attn_cfg: the official MHA's keyword arguments, see AttentionConfig), the others
    # the mixer of `layer`; with d_intermediate > 0 every layer also has a gated MLP of that
    # width after its mixer (a second norm, `norm2`, and `mlp`)
    # (from the command line, where every field is one flag: attn_layer_idx and moe_layer_idx as
    # text, "3,7" or a pattern of a/m letters such as "mmam"; attn_cfg as its JSON text)
    d_intermediate: int = 0
    attn_layer_idx: list[int] | str = field(default_factory=list)
    attn_cfg: dict[str, Any] | str = field(default_factory=dict)
    # Jamba: the MLP of the layers in moe_layer_idx is a mixture of num_experts gated MLPs, each
    # token sent to the num_experts_per_tok most likely; inner_norms RMS-normalises the Mamba-1
    # mixer's dt, B and C after x_proj
    num_experts: int = 1
    num_experts_per_tok: int = 1
    moe_layer_idx: list[int] | str = field(default_factory=list)
    inner_norms: bool = False

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
        self._check_hybrid()

    def _check_hybrid(self) -> None:
        """The hybrid fields: layer indices in range and distinct (kept sorted), attn_cfg that
        AttentionConfig resolves (kept resolved, every key written), the experts' counts, and
        the fields that need an MLP."""
        self.attn_layer_idx = layer_indices("MambaConfig.attn_layer_idx", self.attn_layer_idx, self.n_layer)
        self.moe_layer_idx = layer_indices("MambaConfig.moe_layer_idx", self.moe_layer_idx, self.n_layer)
        if isinstance(self.attn_cfg, str):  # the command line's JSON text
            try:
                self.attn_cfg = json.loads(self.attn_cfg)
            except (ValueError, RecursionError):
                raise ValueError(f"MambaConfig.attn_cfg must be a dict or its JSON text, got "
                                 f"{_show(self.attn_cfg)}") from None
        if not isinstance(self.attn_cfg, dict):
            raise ValueError(f"MambaConfig.attn_cfg must be a dict of the attention's settings, got "
                             f"{_show(self.attn_cfg)}")
        if self.attn_layer_idx or self.attn_cfg:  # kept resolved: equal settings compare equal
            self.attn_cfg = dataclasses.asdict(AttentionConfig.resolve(self.attn_cfg, self.d_model))
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"MambaConfig.num_experts_per_tok ({self.num_experts_per_tok}) must be <= "
                             f"num_experts ({self.num_experts})")
        if self.moe_layer_idx and (self.num_experts < 2 or not self.d_intermediate):
            raise ValueError(f"MambaConfig.moe_layer_idx needs num_experts >= 2 and d_intermediate > 0 (the experts' "
                             f"width), got num_experts={self.num_experts}, d_intermediate={self.d_intermediate}")
        if self.inner_norms and self.layer != "mamba":
            raise ValueError(f"MambaConfig.inner_norms (Jamba's dt/B/C norms) is for layer='mamba' only, "
                             f"got layer={self.layer!r}")

    def _check_sizes(self) -> None:
        """Every size a positive int (not a bool) up to its MAX_SIZES bound; dt_rank may be "auto"."""
        for name in ("d_model", "n_layer", "vocab_size", "d_state", "d_conv", "expand", "pad_vocab_size_multiple",
                     "headdim", "ngroups", "chunk_size", "d_intermediate", "num_experts", "num_experts_per_tok"):
            value = getattr(self, name)
            lowest = 0 if name == "d_intermediate" else 1
            if not _is_int(value) or value < lowest:
                what = "an int >= 0" if lowest == 0 else "a positive int"
                raise ValueError(f"MambaConfig.{name} must be {what}, got {_show(value)}")
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

    # ---- hybrids -------------------------------------------------------------------------
    @property
    def is_hybrid(self) -> bool:
        """Whether the model has anything besides Mamba blocks: attention layers, MLPs, or
        Jamba's inner norms."""
        return bool(self.attn_layer_idx) or self.d_intermediate > 0 or self.inner_norms

    @property
    def attention(self) -> "AttentionConfig | None":
        """attn_cfg resolved (the official MHA's defaults filled in), or None without attention layers."""
        return AttentionConfig.resolve(self.attn_cfg, self.d_model) if self.attn_layer_idx else None

    @property
    def layer_types(self) -> list[str]:
        """Each layer's mixer: "attention" at attn_layer_idx, `layer` elsewhere."""
        attn = set(self.attn_layer_idx)
        return ["attention" if i in attn else self.layer for i in range(self.n_layer)]

    @property
    def layer_pattern(self) -> str:
        """The layers as one letter each: "a" for attention, "m" for the SSM mixer (as
        parse_attn_layers reads them)."""
        return "".join("a" if kind == "attention" else "m" for kind in self.layer_types)

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
        if self.is_hybrid:
            return self._to_official_hybrid()
        if self.layer == "mamba2":
            return self._to_official_mamba2()
        ssm_cfg = self._official_mamba1_ssm_cfg()  # the keyword arguments of mamba_ssm's Mamba (Mamba1) mixer
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
        hybrid = _official_hybrid_fields(read)
        if layer == "Mamba2":
            return cls._from_official_mamba2(read, ssm_cfg, hybrid)
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
            **{k: ssm_cfg.get(k, kind) for k, kind in kinds.items() if k in ssm_cfg.d}, **hybrid,
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
        if self.is_hybrid:
            return _to_hf_jamba(self) if self.layer == "mamba" else _to_hf_bamba(self)
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
        if model_type in ("jamba", "bamba"):
            return (_from_hf_jamba if model_type == "jamba" else _from_hf_bamba)(cls, read)
        if model_type != "mamba":
            raise ValueError(f"Hugging Face config has model_type={model_type!r}; mambakit reads 'mamba' "
                             f"(MambaForCausalLM), 'mamba2' (Mamba2ForCausalLM), 'jamba' (JambaForCausalLM) and "
                             f"'bamba' (BambaForCausalLM)")
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

    def _to_official_hybrid(self) -> dict[str, Any]:
        """mamba_ssm 2.x's config.json of a hybrid: MHA mixers at attn_layer_idx (attn_cfg
        written whole, every MHA keyword argument at its value here) and a GatedMLP of
        d_intermediate channels in every block. The official format has no mixture of experts,
        inner norms or sliding window, and its GatedMLP rounds its width up to a multiple of 128."""
        if self.moe_layer_idx or self.inner_norms:
            raise ValueError("the official mamba_ssm format has no mixture of experts (moe_layer_idx) or inner "
                             "norms (inner_norms, Jamba's); save in the mambakit or hf (Jamba) format")
        if self.d_intermediate % OFFICIAL_MLP_MULTIPLE:
            raise ValueError(f"the official mamba_ssm format rounds d_intermediate up to a multiple of "
                             f"{OFFICIAL_MLP_MULTIPLE}, so d_intermediate={self.d_intermediate} cannot be written")
        attention = self.attention
        if attention is not None and attention.window_size is not None:
            raise ValueError(f"the official mamba_ssm MHA has no sliding window (attn_cfg.window_size="
                             f"{attention.window_size} given); save in the mambakit format")
        if self.layer == "mamba2":
            ssm_cfg = self._to_official_mamba2()["ssm_cfg"]
        else:
            ssm_cfg = {"layer": "Mamba1", **self._official_mamba1_ssm_cfg()}
        return {
            "d_model": self.d_model, "d_intermediate": self.d_intermediate, "n_layer": self.n_layer,
            "vocab_size": self.vocab_size, "ssm_cfg": ssm_cfg, "attn_layer_idx": list(self.attn_layer_idx),
            "attn_cfg": {} if attention is None else attention.to_official(), "rms_norm": self.rms_norm,
            "residual_in_fp32": self.residual_in_fp32, "fused_add_norm": True,
            "pad_vocab_size_multiple": self.pad_vocab_size_multiple, "tie_embeddings": self.tie_embeddings,
        }

    def _official_mamba1_ssm_cfg(self) -> dict[str, Any]:
        return {"d_state": self.d_state, "d_conv": self.d_conv, "expand": self.expand, "dt_rank": self.dt_rank,
                "dt_min": self.dt_min, "dt_max": self.dt_max, "dt_init_floor": self.dt_init_floor,
                "dt_scale": self.dt_scale, "conv_bias": self.conv_bias, "bias": self.bias}

    @classmethod
    def _from_official_mamba2(cls, read: "_Fields", ssm_cfg: "_Fields", hybrid: dict | None = None
                              ) -> "MambaConfig":
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
            **(hybrid or {}),
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
        _check_hf_fields(read, HF2_READ | HF2_IGNORED, "Mamba-2")
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


# ---- hybrids: the attention's settings and the layer indices ---------------------------------

# attn_cfg's keys (the official MHA's keyword arguments, and window_size, mambakit's) and their
# kinds; None is allowed where the official MHA takes it
ATTN_CFG_KINDS = {"num_heads": "size", "num_heads_kv": "size", "head_dim": "size", "qkv_proj_bias": bool,
                  "out_proj_bias": bool, "softmax_scale": "number", "causal": bool, "d_conv": "count",
                  "rotary_emb_dim": "count", "rotary_emb_base": "number", "rotary_emb_interleaved": bool,
                  "window_size": "size", "mlp_dim": "count"}
ATTN_CFG_NULLABLE = {"num_heads_kv", "head_dim", "softmax_scale", "window_size"}
MAX_ATTN = {"num_heads": 2**16, "num_heads_kv": 2**16, "head_dim": 2**16, "d_conv": 2**12, "window_size": 2**40}


@dataclass(frozen=True)
class AttentionConfig:
    """The attention mixer's settings: attn_cfg with the official MHA's defaults filled in
    (num_heads_kv = num_heads, head_dim = d_model / num_heads, biases on, no rotary, no conv).
    mambakit's attention is always causal; window_size (mambakit's, not the official MHA's) lets
    each query see its window_size most recent tokens, itself included."""
    num_heads: int
    num_heads_kv: int
    head_dim: int
    qkv_proj_bias: bool = True
    out_proj_bias: bool = True
    softmax_scale: float | None = None
    d_conv: int = 0  # > 0: a causal depthwise conv (no activation) over q, k and v, as the official MHA's
    rotary_emb_dim: int = 0  # the leading channels of each head that the rotary embedding turns
    rotary_emb_base: float = 10000.0
    rotary_emb_interleaved: bool = False
    window_size: int | None = None

    @property
    def qkv_dim(self) -> int:
        return self.head_dim * (self.num_heads + 2 * self.num_heads_kv)

    @classmethod
    def resolve(cls, attn_cfg: dict, d_model: int) -> "AttentionConfig":
        """attn_cfg checked and resolved; a ValueError names `MambaConfig.attn_cfg.<key>`."""
        if not isinstance(attn_cfg, dict):
            raise ValueError(f"MambaConfig.attn_cfg must be a dict, got {_show(attn_cfg)}")
        unknown = sorted(set(attn_cfg) - set(ATTN_CFG_KINDS), key=str)
        if unknown:
            raise ValueError(f"MambaConfig.attn_cfg has unknown keys {unknown}; known: {sorted(ATTN_CFG_KINDS)}")
        read = _Fields(attn_cfg, "MambaConfig.attn_cfg")
        values = {}
        for key, kind in ATTN_CFG_KINDS.items():
            if key in attn_cfg and attn_cfg[key] is None and key in ATTN_CFG_NULLABLE:
                continue
            if key in attn_cfg:
                values[key] = read.get(key, kind)
                if key in MAX_ATTN and values[key] > MAX_ATTN[key]:
                    raise ValueError(f"MambaConfig.attn_cfg.{key} must be <= {MAX_ATTN[key]}, got {values[key]}")
        if "num_heads" not in values:
            raise ValueError("MambaConfig.attn_cfg.num_heads is required for attention layers (attn_layer_idx)")
        if values.get("causal", True) is not True:
            raise ValueError("MambaConfig.attn_cfg.causal must be true: a language model's attention is causal")
        if values.get("mlp_dim", 0):
            raise ValueError(f"MambaConfig.attn_cfg.mlp_dim={values['mlp_dim']} (an MLP inside the MHA) is not "
                             f"supported; use d_intermediate for an MLP after each mixer")
        heads = values["num_heads"]
        kv_heads = values.get("num_heads_kv", heads)
        if heads % kv_heads:
            raise ValueError(f"MambaConfig.attn_cfg.num_heads_kv ({kv_heads}) must divide num_heads ({heads})")
        head_dim = values.get("head_dim")
        if head_dim is None:
            if d_model % heads:
                raise ValueError(f"MambaConfig.attn_cfg.num_heads ({heads}) must divide d_model ({d_model}) when "
                                 f"head_dim is not given")
            head_dim = d_model // heads
        rotary = values.get("rotary_emb_dim", 0)
        if rotary % 2 or rotary > head_dim:
            raise ValueError(f"MambaConfig.attn_cfg.rotary_emb_dim ({rotary}) must be even and <= head_dim "
                             f"({head_dim})")
        if values.get("rotary_emb_base", 1.0) <= 0 or values.get("softmax_scale", 1.0) <= 0:
            raise ValueError("MambaConfig.attn_cfg.rotary_emb_base and softmax_scale must be > 0")
        return cls(num_heads=heads, num_heads_kv=kv_heads, head_dim=head_dim,
                   qkv_proj_bias=values.get("qkv_proj_bias", True), out_proj_bias=values.get("out_proj_bias", True),
                   softmax_scale=None if values.get("softmax_scale") is None else float(values["softmax_scale"]),
                   d_conv=values.get("d_conv", 0), rotary_emb_dim=rotary,
                   rotary_emb_base=float(values.get("rotary_emb_base", 10000.0)),
                   rotary_emb_interleaved=values.get("rotary_emb_interleaved", False),
                   window_size=values.get("window_size"))

    def to_official(self) -> dict[str, Any]:
        """The official MHA's keyword arguments (every one written: its defaults differ from
        what a hybrid wants, causal=False above all)."""
        cfg = {"num_heads": self.num_heads, "num_heads_kv": self.num_heads_kv, "head_dim": self.head_dim,
               "qkv_proj_bias": self.qkv_proj_bias, "out_proj_bias": self.out_proj_bias, "causal": True,
               "d_conv": self.d_conv, "rotary_emb_dim": self.rotary_emb_dim, "rotary_emb_base": self.rotary_emb_base,
               "rotary_emb_interleaved": self.rotary_emb_interleaved}
        if self.softmax_scale is not None:
            cfg["softmax_scale"] = self.softmax_scale
        return cfg


def layer_indices(label: str, value: Any, n_layer: int) -> list[int]:
    """A list (or tuple) of distinct layer indices in [0, n_layer), sorted; or its text
    (parse_attn_layers: "3,7" or a pattern such as "mmam"). A ValueError starting with `label`
    (the field, "MambaConfig.attn_layer_idx", or the flag) otherwise."""
    if isinstance(value, str):
        try:
            value = parse_attn_layers(value, n_layer)
        except ValueError as err:
            raise ValueError(f"{label}: {err}") from None
    if not isinstance(value, (list, tuple)) or not all(_is_int(i) for i in value):
        raise ValueError(f"{label} must be a list of layer indices (ints), got {_show(value)}")
    bad = [i for i in value if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"{label} holds {_show(bad[0])}, outside the layers 0..{n_layer - 1} "
                         f"(-{n_layer}..-1 from the end; n_layer={n_layer})")
    if len(set(value)) != len(value):
        raise ValueError(f"{label} names a layer twice: {_show(list(value))}")
    return sorted(value)


def parse_attn_layers(text: str, n_layer: int) -> list[int]:
    """The attention layers of `--attn-layers`: comma-separated indices ("3,7", negative ones
    counting from the end) or a pattern of one letter per layer ("mmam": a = attention, m = the
    SSM mixer), as MambaConfig.layer_pattern writes it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"attention layers must be indices such as '3,7' or a pattern such as 'mmam', got {text!r}")
    text = text.strip()
    if set(text.lower()) <= {"a", "m"}:
        if len(text) != n_layer:
            raise ValueError(f"the layer pattern {text!r} has {len(text)} letters, the model has {n_layer} layers")
        return [i for i, c in enumerate(text.lower()) if c == "a"]
    try:
        indices = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"attention layers must be indices such as '3,7' or a pattern of a/m letters, got "
                         f"{text!r}") from None
    return [i + n_layer if -n_layer <= i < 0 else i for i in indices]  # one further back stays out of range


def _official_hybrid_fields(read: "_Fields") -> dict[str, Any]:
    """The hybrid fields of an official config.json: attn_layer_idx, attn_cfg (whose causal the
    official MHA defaults to false) and d_intermediate, rounded up to a multiple of 128 as the
    official GatedMLP rounds its width."""
    attn_layer_idx = read.get("attn_layer_idx", list, default=[])
    attn_cfg = read.get("attn_cfg", dict, default={})
    if attn_layer_idx and attn_cfg.get("causal") is not True:
        raise ValueError(f"official config: attn_cfg.causal must be true for a language model (the official MHA "
                         f"is not causal without it), got {_show(attn_cfg.get('causal'))}")
    d_intermediate = read.get("d_intermediate", "count", default=0)
    d_intermediate = -(-d_intermediate // OFFICIAL_MLP_MULTIPLE) * OFFICIAL_MLP_MULTIPLE
    return {"attn_layer_idx": attn_layer_idx, "attn_cfg": dict(attn_cfg), "d_intermediate": d_intermediate}


# ---- hybrids in transformers: JambaForCausalLM (Mamba-1) and BambaForCausalLM (Mamba-2) --------

# MambaConfig's fields by their names in transformers' JambaConfig and BambaConfig (for errors)
JAMBA_NAMES = {"d_model": "hidden_size", "n_layer": "num_hidden_layers", "d_state": "mamba_d_state",
               "d_conv": "mamba_d_conv", "expand": "mamba_expand", "dt_rank": "mamba_dt_rank",
               "conv_bias": "mamba_conv_bias", "bias": "mamba_proj_bias", "norm_epsilon": "rms_norm_eps",
               "d_intermediate": "intermediate_size", "tie_embeddings": "tie_word_embeddings",
               "num_experts_per_tok": "num_experts_per_tok", "attn_cfg": "num_attention_heads"}
BAMBA_NAMES = {**JAMBA_NAMES, "headdim": "mamba_d_head", "ngroups": "mamba_n_groups",
               "chunk_size": "mamba_chunk_size", "attn_layer_idx": "attn_layer_indices"}
JAMBA_READ = {"model_type", "vocab_size", "tie_word_embeddings", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
              "initializer_range", "rms_norm_eps", "num_experts_per_tok", "num_experts", "expert_layer_period",
              "expert_layer_offset", "attn_layer_period", "attn_layer_offset", "mamba_d_state", "mamba_d_conv",
              "mamba_expand", "mamba_dt_rank", "mamba_conv_bias", "mamba_proj_bias", "sliding_window"}
BAMBA_READ = {"model_type", "vocab_size", "tie_word_embeddings", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
              "initializer_range", "rms_norm_eps", "attn_layer_indices", "mamba_n_heads", "mamba_d_head",
              "mamba_n_groups", "mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_chunk_size",
              "mamba_conv_bias", "mamba_proj_bias", "time_step_limit", "rope_parameters", "rope_theta",
              "partial_rotary_factor", "attention_bias", "mlp_bias"}
# fields that change neither the logits nor the weights' layout: kernels chosen, training-only
# terms (dropout, the router's auxiliary loss, Bamba's z-loss), lengths and logits kept in generation
HYBRID_HF_IGNORED = {"use_mamba_kernels", "use_mambapy", "use_associative_scan", "output_router_logits",
                     "router_aux_loss_coef", "max_position_embeddings", "attention_dropout", "use_cache",
                     "num_logits_to_keep", "n_ctx", "calc_logits_for_entire_prompt", "z_loss_coefficient",
                     "time_step_min", "time_step_max", "time_step_floor"}


def _check_hf_fields(read: _Fields, known: set[str], what: str) -> None:
    """No field mambakit's `what` cannot represent (beyond `known` and transformers' generic
    ones), and the SiLU activation."""
    unknown = sorted(set(read.d) - known - HF_GENERIC_FIELDS)
    if unknown:
        raise ValueError(f"Hugging Face config has fields that mambakit's {what} cannot represent: {unknown}")
    act = read.get("hidden_act", str, default="silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"Hugging Face config: hidden_act={act!r} is not supported (only silu)")


def _hf_attn_cfg(read: _Fields, hidden: int, bias: bool, rotary_factor: float = 0.0) -> dict[str, Any]:
    """The attention of transformers' Jamba / Bamba layers as attn_cfg: separate q, k, v, o
    projections (fused here into in_proj), head_dim = hidden_size / heads unless given, rotary
    on the leading rotary_factor of each head (Bamba's partial rotary; Jamba has none)."""
    heads = read.get("num_attention_heads", "size", default=32)
    kv_heads = heads if read.d.get("num_key_value_heads") is None else read.get("num_key_value_heads", "size")
    head_dim = None if read.d.get("head_dim") is None else read.get("head_dim", "size")
    if head_dim is None and hidden % heads == 0:
        head_dim = hidden // heads
    if head_dim is None:
        raise ValueError(f"Hugging Face config: num_attention_heads ({heads}) must divide hidden_size ({hidden})")
    return {"num_heads": heads, "num_heads_kv": kv_heads, "head_dim": head_dim, "qkv_proj_bias": bias,
            "out_proj_bias": bias, "rotary_emb_dim": int(head_dim * rotary_factor)}


def _periodic_layers(read: _Fields, prefix: str, n_layer: int, period: int, offset: int) -> list[int]:
    """Jamba's layers at `offset` in every `period` (attention, experts)."""
    period = read.get(f"{prefix}_period", "size", default=period)
    offset = read.get(f"{prefix}_offset", "count", default=offset)
    if offset >= period:
        raise ValueError(f"Hugging Face config: {prefix}_offset ({offset}) must be < {prefix}_period ({period})")
    return [i for i in range(n_layer) if i % period == offset]


def _as_periodic(name: str, indices: list[int], n_layer: int) -> tuple[int, int]:
    """(period, offset) with exactly `indices` among range(n_layer), as Jamba's config writes
    its attention and expert layers; a ValueError naming the field when there is none."""
    if not indices:
        return n_layer + 1, n_layer
    if len(indices) == 1:
        return n_layer, indices[0]
    period = indices[1] - indices[0]
    offset = indices[0] % period
    if [i for i in range(n_layer) if i % period == offset] != list(indices):
        raise ValueError(f"the Hugging Face Jamba format places layers periodically; MambaConfig.{name}="
                         f"{indices} is not one layer in every k; save in the mambakit format")
    return period, offset


def _check_hf_attention(config: "MambaConfig", fmt: str, rotary: bool) -> AttentionConfig | None:
    """What transformers' attention computes: q, k, v, o with one bias setting, head_dim *
    heads = hidden size, the default softmax scale, no sliding window or qkv conv, and the
    rotary embedding of Bamba (half-split, not interleaved) or none (Jamba)."""
    attention = config.attention
    if attention is None:
        return None
    problems = []
    if attention.head_dim * attention.num_heads != config.d_model:
        problems.append(f"head_dim * num_heads = {attention.head_dim * attention.num_heads} != d_model")
    if attention.qkv_proj_bias != attention.out_proj_bias:
        problems.append("qkv_proj_bias != out_proj_bias")
    if attention.softmax_scale is not None or attention.window_size is not None or attention.d_conv:
        problems.append("softmax_scale, window_size and d_conv must be unset")
    if not rotary and attention.rotary_emb_dim:
        problems.append(f"rotary_emb_dim={attention.rotary_emb_dim} (Jamba's attention has no positions)")
    if rotary and attention.rotary_emb_interleaved:
        problems.append("rotary_emb_interleaved=true")
    if problems:
        raise ValueError(f"the Hugging Face {fmt} format cannot hold this attention (MambaConfig.attn_cfg: "
                         f"{'; '.join(problems)}); save in the mambakit format")
    return attention


def _hf_hybrid_common(config: "MambaConfig", fmt: str) -> dict[str, Any]:
    if not config.d_intermediate:
        raise ValueError(f"the Hugging Face {fmt} format has an MLP in every layer: MambaConfig.d_intermediate "
                         f"must be > 0; save in the mambakit format")
    attention = _check_hf_attention(config, fmt, rotary=fmt == "Bamba")
    heads = (attention.num_heads, attention.num_heads_kv) if attention else (1, 1)
    return {"vocab_size": config.padded_vocab_size, "hidden_size": config.d_model,
            "intermediate_size": config.d_intermediate, "num_hidden_layers": config.n_layer,
            "num_attention_heads": heads[0], "num_key_value_heads": heads[1], "hidden_act": "silu",
            "initializer_range": config.initializer_range, "rms_norm_eps": config.norm_epsilon,
            "tie_word_embeddings": config.tie_embeddings, "mamba_d_state": config.d_state,
            "mamba_d_conv": config.d_conv, "mamba_expand": config.expand, "mamba_conv_bias": config.conv_bias,
            "mamba_proj_bias": config.bias, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
            "use_cache": True}


def _to_hf_jamba(config: "MambaConfig") -> dict[str, Any]:
    """The config.json of a transformers JambaForCausalLM with the same outputs: Mamba-1 mixers
    with inner norms, attention without positions at periodic layers, an MLP in every layer and
    a mixture of experts at periodic layers."""
    if not config.inner_norms:
        raise ValueError("the Hugging Face Jamba format normalises dt, B and C in every Mamba mixer: "
                         "MambaConfig.inner_norms must be true; save in the mambakit format")
    raw = _hf_hybrid_common(config, "Jamba")
    attn_period, attn_offset = _as_periodic("attn_layer_idx", config.attn_layer_idx, config.n_layer)
    moe = bool(config.moe_layer_idx)
    expert_period, expert_offset = _as_periodic("moe_layer_idx", config.moe_layer_idx, config.n_layer)
    return {"architectures": ["JambaForCausalLM"], "model_type": "jamba", **raw,
            "attn_layer_period": attn_period, "attn_layer_offset": attn_offset,
            "num_experts": config.num_experts if moe else 1,
            "num_experts_per_tok": config.num_experts_per_tok if moe else 1,
            "expert_layer_period": expert_period, "expert_layer_offset": expert_offset,
            "mamba_dt_rank": config.resolved_dt_rank}


def _to_hf_bamba(config: "MambaConfig") -> dict[str, Any]:
    """The config.json of a transformers BambaForCausalLM with the same outputs: Mamba-2 mixers,
    attention with a partial rotary embedding at attn_layer_indices, an MLP in every layer."""
    if config.moe_layer_idx:
        raise ValueError("the Hugging Face Bamba format has no mixture of experts (MambaConfig.moe_layer_idx); "
                         "save in the mambakit format")
    raw = _hf_hybrid_common(config, "Bamba")
    attention = config.attention
    rope = {"rope_type": "default", "rope_theta": attention.rotary_emb_base if attention else 10000.0,
            "partial_rotary_factor": attention.rotary_emb_dim / attention.head_dim if attention else 0.5}
    return {"architectures": ["BambaForCausalLM"], "model_type": "bamba", **raw,
            "attn_layer_indices": list(config.attn_layer_idx), "mamba_n_heads": config.d_inner // config.headdim,
            "mamba_d_head": config.headdim, "mamba_n_groups": config.ngroups, "mamba_chunk_size": config.chunk_size,
            "time_step_limit": [0.0, math.inf], "rope_parameters": rope,
            "attention_bias": attention.qkv_proj_bias if attention else False, "mlp_bias": False}


def _from_hf_jamba(cls: type, read: _Fields) -> "MambaConfig":
    """A transformers JambaForCausalLM's config.json (absent fields take JambaConfig's defaults)."""
    _check_hf_fields(read, JAMBA_READ | HYBRID_HF_IGNORED, "hybrids")
    if read.d.get("sliding_window") is not None:
        raise ValueError(f"Hugging Face config: sliding_window={_show(read.d['sliding_window'])} is not supported "
                         f"(transformers' Jamba attends to every earlier token)")
    hidden, n_layer = read.get("hidden_size", "size", default=4096), read.get("num_hidden_layers", "size", default=32)
    attn_layer_idx = _periodic_layers(read, "attn_layer", n_layer, 8, 4)
    experts = read.get("num_experts", "size", default=16)
    moe_layer_idx = _periodic_layers(read, "expert_layer", n_layer, 2, 1) if experts > 1 else []
    return _made(
        cls, JAMBA_NAMES, "Hugging Face config", layer="mamba", inner_norms=True,
        d_model=hidden, n_layer=n_layer, vocab_size=read.get("vocab_size", "size", default=65536),
        d_state=read.get("mamba_d_state", "size", default=16), d_conv=read.get("mamba_d_conv", "size", default=4),
        expand=read.get("mamba_expand", "size", default=2), dt_rank=read.get("mamba_dt_rank", "rank", default="auto"),
        conv_bias=read.get("mamba_conv_bias", bool, default=True),
        bias=read.get("mamba_proj_bias", bool, default=False),
        rms_norm=True, norm_epsilon=read.get("rms_norm_eps", "number", default=1e-6), residual_in_fp32=False,
        pad_vocab_size_multiple=1, tie_embeddings=read.get("tie_word_embeddings", bool, default=False),
        initializer_range=read.get("initializer_range", "number", default=0.02), rescale_prenorm_residual=False,
        d_intermediate=read.get("intermediate_size", "size", default=14336), attn_layer_idx=attn_layer_idx,
        attn_cfg=_hf_attn_cfg(read, hidden, bias=False) if attn_layer_idx else {},
        num_experts=experts,
        num_experts_per_tok=read.get("num_experts_per_tok", "size", default=2) if experts > 1 else 1,
        moe_layer_idx=moe_layer_idx,
    )


def _from_hf_bamba(cls: type, read: _Fields) -> "MambaConfig":
    """A transformers BambaForCausalLM's config.json (absent fields take BambaConfig's defaults)."""
    _check_hf_fields(read, BAMBA_READ | HYBRID_HF_IGNORED, "hybrids")
    limit = _special_floats(read.get("time_step_limit", list, default=[0.0, math.inf]))
    if not _same_value(limit, [0.0, math.inf]):
        raise ValueError(f"Hugging Face config: time_step_limit={_show(limit)} is not supported; mambakit's "
                         f"Mamba-2 does not clamp the time step (only [0.0, Infinity])")
    if read.get("mlp_bias", bool, default=False):
        raise ValueError("Hugging Face config: mlp_bias=true is not supported (mambakit's MLP has no biases)")
    rope = read.get("rope_parameters", dict, default={})
    rope_type = rope.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"Hugging Face config: rope_parameters.rope_type={_show(rope_type)} is not supported "
                         f"(only the default rotary embedding)")
    theta = rope.get("rope_theta", read.get("rope_theta", "number", default=10000.0))
    factor = rope.get("partial_rotary_factor", read.get("partial_rotary_factor", "number", default=0.5))
    if not _is_number(theta) or theta <= 0 or not _is_number(factor) or not 0 <= factor <= 1:
        raise ValueError(f"Hugging Face config: rope_theta ({_show(theta)}) must be > 0 and partial_rotary_factor "
                         f"({_show(factor)}) in [0, 1]")
    hidden, n_layer = read.get("hidden_size", "size", default=4096), read.get("num_hidden_layers", "size", default=32)
    expand, heads = read.get("mamba_expand", "size", default=2), read.get("mamba_n_heads", "size", default=128)
    d_head = read.get("mamba_d_head", "rank", default="auto")
    d_head = expand * hidden // heads if d_head == "auto" else d_head
    if heads * d_head != expand * hidden:
        raise ValueError(f"Hugging Face config: mamba_n_heads * mamba_d_head = {heads} * {d_head} must equal "
                         f"mamba_expand * hidden_size = {expand} * {hidden}")
    attn_layer_idx = read.get("attn_layer_indices", list, default=[]) or []
    attn_cfg = {}
    if attn_layer_idx:
        attn_cfg = _hf_attn_cfg(read, hidden, read.get("attention_bias", bool, default=False), factor)
        attn_cfg["rotary_emb_base"] = theta
    return _made(
        cls, BAMBA_NAMES, "Hugging Face config", layer="mamba2",
        d_model=hidden, n_layer=n_layer, vocab_size=read.get("vocab_size", "size", default=128000),
        d_state=read.get("mamba_d_state", "size", default=256), d_conv=read.get("mamba_d_conv", "size", default=4),
        expand=expand, headdim=d_head, ngroups=read.get("mamba_n_groups", "size", default=1),
        chunk_size=read.get("mamba_chunk_size", "size", default=256),
        conv_bias=read.get("mamba_conv_bias", bool, default=True),
        bias=read.get("mamba_proj_bias", bool, default=False),
        rms_norm=True, norm_epsilon=read.get("rms_norm_eps", "number", default=1e-5), residual_in_fp32=False,
        pad_vocab_size_multiple=1, tie_embeddings=read.get("tie_word_embeddings", bool, default=False),
        initializer_range=read.get("initializer_range", "number", default=0.02), rescale_prenorm_residual=False,
        d_intermediate=read.get("intermediate_size", "size", default=14336), attn_layer_idx=attn_layer_idx,
        attn_cfg=attn_cfg,
    )


def _mamba2attn_heads(num_heads: int, head_dim: int) -> dict[str, Any]:
    """attn_cfg in the manner of the official mamba2attn models' attention (their 2.7b: 30 heads
    of 128), at another head count: the rotary embedding on half of each head, a causal conv of
    width 4 over q, k and v, no biases."""
    return {"num_heads": num_heads, "head_dim": head_dim, "rotary_emb_dim": head_dim // 2, "d_conv": 4,
            "qkv_proj_bias": False, "out_proj_bias": False, "causal": True}


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
    # hybrids: Mamba-2 layers with a few attention layers (heads of 64 channels, 32 in tiny) and
    # no MLP, as the official mamba2attn models (whose 2.7b has 6 attention layers of 64)
    "hybrid-tiny": MambaConfig(d_model=128, n_layer=4, vocab_size=256, layer="mamba2", d_state=16, headdim=32,
                               attn_layer_idx=[2], attn_cfg=_mamba2attn_heads(4, 32)),
    "hybrid-130m": MambaConfig(d_model=768, n_layer=24, layer="mamba2", d_state=128, pad_vocab_size_multiple=16,
                               attn_layer_idx=[6, 12, 18], attn_cfg=_mamba2attn_heads(12, 64)),
}
