"""Layers: the mixers (Mamba, S4D, the bidirectional BiMamba), the residual block and the norms.
They import only `mambakit.ops` (and `mambakit.config`)."""

from .block import Block
from .mamba import Mamba
from .norm import LayerNorm, RMSNorm
from .s4d import S4D
from .state import MambaState, is_plain

__all__ = ["Block", "LayerNorm", "Mamba", "MambaState", "RMSNorm", "S4D", "is_plain"]
