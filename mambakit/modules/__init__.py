"""Layers: the mixers (Mamba, Mamba2, S4D, the bidirectional BiMamba, and causal Attention for
hybrids), the residual block, the MLPs of hybrid blocks (GatedMLP, Jamba's MixtureOfExperts) and
the norms. They import only `mambakit.ops` (and `mambakit.config`)."""

from .attention import Attention, AttentionState, KVHistory
from .block import Block
from .mamba import Mamba
from .mamba2 import Mamba2
from .mlp import GatedMLP, MixtureOfExperts
from .norm import GatedRMSNorm, LayerNorm, RMSNorm
from .normed_x_proj import NormedXProj
from .s4d import S4D
from .state import MambaState, is_plain

__all__ = ["Attention", "AttentionState", "Block", "GatedMLP", "GatedRMSNorm", "KVHistory", "LayerNorm", "Mamba",
           "Mamba2", "MambaState", "MixtureOfExperts", "NormedXProj", "RMSNorm", "S4D", "is_plain"]
