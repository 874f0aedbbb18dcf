from .lm import LMCache, MambaLM

__all__ = ["MambaLM", "LMCache"]
