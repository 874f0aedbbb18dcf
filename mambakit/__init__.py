"""mambakit: Mamba selective state-space models in PyTorch, on any device, with no compiler."""

__version__ = "0.1.0"

from .config import PRESETS, MambaConfig
from .models.lm import LMCache, MambaLM
from .modules.block import Block
from .modules.mamba import Mamba, MambaState
from .modules.norm import RMSNorm
from .tokenizer import ByteTokenizer

__all__ = ["MambaConfig", "PRESETS", "MambaLM", "LMCache", "Mamba", "MambaState", "Block", "RMSNorm",
           "ByteTokenizer", "__version__"]
