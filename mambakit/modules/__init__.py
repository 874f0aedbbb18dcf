from .block import Block
from .mamba import Mamba, MambaState
from .norm import LayerNorm, RMSNorm

__all__ = ["Mamba", "MambaState", "Block", "RMSNorm", "LayerNorm"]
