"""mambakit: Mamba selective state-space models in PyTorch, on any device, with no compiler."""

from importlib.metadata import PackageNotFoundError, version

from .config import PRESETS, MambaConfig
from .generation import LMCache, SamplingOptions, generate, stream
from .models import AutoModel, Mamba2LM, MambaLM, VisionConfig, VisionMamba, create_model, list_models, register_model
from .modules import Block, Mamba, MambaState, RMSNorm
from .tokenizer import ByteTokenizer
from .training import TrainConfig, train

try:
    __version__ = version("mambakit")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = [
    "AutoModel",
    "Block",
    "ByteTokenizer",
    "LMCache",
    "Mamba",
    "Mamba2LM",
    "MambaConfig",
    "MambaLM",
    "MambaState",
    "PRESETS",
    "RMSNorm",
    "SamplingOptions",
    "TrainConfig",
    "VisionConfig",
    "VisionMamba",
    "__version__",
    "create_model",
    "generate",
    "list_models",
    "register_model",
    "stream",
    "train",
]
