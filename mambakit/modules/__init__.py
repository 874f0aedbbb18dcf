from .block import Block
from .mamba import Mamba, MambaState
from .norm import LayerNorm, RMSNorm
from .s4d import S4D

__all__ = ["Mamba", "MambaState", "S4D", "Block", "RMSNorm", "LayerNorm"]
