"""Layers: the mixers (Mamba, Mamba2, S4D, the bidirectional BiMamba), the residual block and the norms.
They import only `mambakit.ops` (and `mambakit.config`)."""

from .block import Block
from .mamba import Mamba
from .mamba2 import Mamba2
from .norm import GatedRMSNorm, LayerNorm, RMSNorm
from .s4d import S4D
from .state import MambaState, is_plain

__all__ = ["Block", "GatedRMSNorm", "LayerNorm", "Mamba", "Mamba2", "MambaState", "RMSNorm", "S4D", "is_plain"]
