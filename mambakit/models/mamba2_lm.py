"""Mamba2LM: the language model with Mamba-2 (SSD) mixers, a MambaLM whose config has
layer="mamba2". It adds no computation: it is the class whose `from_pretrained` takes Mamba-2
checkpoints only (mambakit, transformers' Mamba2ForCausalLM or the official mamba_ssm format)
and names the class to use for any other."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_pretrained, read_config, resolve_directory
from ..config import MambaConfig
from .lm import MambaLM


class Mamba2LM(MambaLM):
    def __init__(self, config: MambaConfig, device=None, dtype=None):
        if not isinstance(config, MambaConfig):
            raise TypeError(f"config must be a MambaConfig, got {type(config).__name__}")
        if config.layer != "mamba2":
            raise ValueError(f"Mamba2LM needs a config with layer='mamba2', got layer={config.layer!r}; "
                             f"build a MambaLM for it")
        super().__init__(config, device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, device=None, dtype=None) -> "Mamba2LM":
        """A Mamba-2 checkpoint directory (mambakit, Hugging Face or official format) or a hub id
        in the local Hugging Face cache; nothing is downloaded. Any other model is a ValueError
        naming its config.json."""
        directory = resolve_directory(name_or_path)
        config, _ = read_config(directory)
        if config.layer != "mamba2":
            raise ValueError(f"{directory / 'config.json'} holds a model with layer={config.layer!r}, not Mamba-2; "
                             f"load it with MambaLM.from_pretrained or mambakit.AutoModel.from_pretrained")
        return load_pretrained(cls, directory, device=device, dtype=dtype)
