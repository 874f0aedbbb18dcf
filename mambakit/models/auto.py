"""AutoModel: the model class a checkpoint's config.json asks for, as transformers'
AutoModelForCausalLM picks one. A Mamba-2 config (layer "mamba2", transformers' model_type
"mamba2" or "bamba", the official ssm_cfg.layer "Mamba2") gives a Mamba2LM; a Mamba-1 one (or
any other MambaLM mixer of the mambakit format; transformers' "mamba" or "jamba") a MambaLM.
Hybrids (the official attn_layer_idx / attn_cfg / d_intermediate, Jamba, Bamba) are built with
their attention layers and MLPs. Anything else (another model_type, a field mambakit cannot
represent) is a ValueError naming config.json and what it holds."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..checkpoint import load_pretrained, read_config, resolve_directory
from ..config import MambaConfig
from .lm import MambaLM
from .mamba2_lm import Mamba2LM


class AutoModel:
    """Not instantiated: `AutoModel.from_pretrained(path)` returns the model itself."""

    def __init__(self):
        raise TypeError("AutoModel is not instantiated: call AutoModel.from_pretrained(path) or "
                        "AutoModel.class_for(config)")

    @staticmethod
    def class_for(config: MambaConfig) -> type[MambaLM]:
        """The class of the model a config describes."""
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config must be a MambaConfig, got {type(config).__name__}")
        return Mamba2LM if config.layer == "mamba2" else MambaLM

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device=None, dtype=None) -> nn.Module:
        """The model of a checkpoint directory (mambakit, Hugging Face or official format, Mamba-1
        or Mamba-2, pure or hybrid: the official hybrid, transformers' Jamba or Bamba) or of a
        hub id in the local Hugging Face cache, in eval mode; nothing is downloaded."""
        directory = resolve_directory(name_or_path)
        config, _ = read_config(directory)
        return load_pretrained(cls.class_for(config), directory, device=device, dtype=dtype)
