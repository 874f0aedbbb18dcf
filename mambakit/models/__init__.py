from .lm import LMCache, MambaLM

__all__ = ["MambaLM", "LMCache"]

from .vision import VisionConfig, VisionMamba, create_model

__all__ += ["VisionConfig", "VisionMamba", "create_model"]
