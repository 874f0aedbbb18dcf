"""The models: the language model (lm.py: MambaLM), Vision Mamba (vision.py) and their parts,
and the registry that builds any of them by name (registry.py: create_model, list_models,
register_model). Importing this package registers every built-in preset."""

from ..generation import LMCache
from .lm import MambaLM
from .registry import create_model, list_models, register_model
from .vision import VisionConfig, VisionMamba

__all__ = ["LMCache", "MambaLM", "VisionConfig", "VisionMamba", "create_model", "list_models", "register_model"]
