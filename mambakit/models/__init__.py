"""The models: the language model (lm.py: MambaLM; mamba2_lm.py: Mamba2LM, the same with Mamba-2
mixers; auto.py: AutoModel, the class a checkpoint asks for), Vision Mamba (vision.py) and their parts,
and the registry that builds any of them by name (registry.py: create_model, list_models,
register_model). Importing this package registers every built-in preset, and where timm is
installed the Vim presets as timm models too (timm_models.py)."""

from importlib.util import find_spec

from ..generation import LMCache
from .auto import AutoModel
from .lm import CausalLMOutput, MambaLM
from .mamba2_lm import Mamba2LM
from .registry import create_model, list_models, register_model
from .vision import VisionConfig, VisionMamba
from . import dna  # noqa: F401,E402 - registers the DNA presets

if find_spec("timm") is not None:
    from . import timm_models

    timm_models.register()

__all__ = ["AutoModel", "CausalLMOutput", "LMCache", "Mamba2LM", "MambaLM", "VisionConfig", "VisionMamba", "create_model", "list_models", "register_model"]
