"""The models: the language model (lm.py: MambaLM), Vision Mamba (vision.py) and their parts,
and the registry that builds any of them by name (registry.py: create_model, list_models,
register_model). Importing this package registers every built-in preset, and where timm is
installed the Vim presets as timm models too (timm_models.py)."""

from importlib.util import find_spec

from ..generation import LMCache
from .lm import CausalLMOutput, MambaLM
from .registry import create_model, list_models, register_model
from .vision import VisionConfig, VisionMamba

if find_spec("timm") is not None:
    from . import timm_models

    timm_models.register()

__all__ = ["CausalLMOutput", "LMCache", "MambaLM", "VisionConfig", "VisionMamba", "create_model", "list_models", "register_model"]
