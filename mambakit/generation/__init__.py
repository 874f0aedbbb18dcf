"""Generation: prompts packed for a varlen prefill (prompts.py), the recurrent cache
(cache.py), sampling (sampling.py), stop strings (stopping.py), the decode loop (loop.py:
`stream`, `generate`), the fast decoders that replace a model's step on CUDA (cuda_graph.py)
and CPU (cpu_decode.py), and the `generate` method the models inherit (mixin.py), which also
takes transformers' options (do_sample, max_length, a generation_config: conventions.py).

This layer sits below the models: it takes a model duck-typed and never imports one."""

from .cache import LMCache, architecture_of
from .cpu_decode import CpuDecoder, cpu_decoder, supports_cpu_decoder
from .cuda_graph import GraphedDecoder, graphed_decoder
from .loop import generate, stream
from .mixin import GenerationMixin
from .prompts import PackedPrompts, pack_prompts
from .sampling import SamplingOptions, process_logits, sample_next
from .stopping import StopStrings

__all__ = ["CpuDecoder", "GenerationMixin", "GraphedDecoder", "LMCache", "PackedPrompts", "SamplingOptions",
           "StopStrings", "architecture_of", "cpu_decoder", "generate", "graphed_decoder", "pack_prompts",
           "process_logits", "sample_next", "stream", "supports_cpu_decoder"]
