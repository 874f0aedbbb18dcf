"""Drop-in replacements for the official kernels' Python entry points, so that code written
against `mamba_ssm` / `causal_conv1d` (the Vim repository, transformers' Mamba models) switches
by changing one import:

    from mambakit.compat import (selective_scan_fn, selective_state_update, mamba_chunk_scan_combined,
                                 mamba_split_conv1d_scan_combined, causal_conv1d_fn, causal_conv1d_update)

and `patch_transformers()`, which makes transformers' Mamba, Mamba-2 and hybrid models (Bamba,
NemotronH, FalconH1, Zamba2, GraniteMoeHybrid, Jamba, FalconMamba) call them instead of their
slow torch fallbacks. The signatures and return conventions are the official ones; each function
dispatches like `mambakit.ops` (Triton on CUDA, torch elsewhere).

    conv.py          causal_conv1d_fn (seq_idx), causal_conv1d_update (circular buffer, state indices)
    mamba1.py        selective_scan_fn
    state_update.py  selective_state_update: Mamba-1's (batch, dim, N) and the headed (batch, H, P, N) step
    mamba2.py        mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    kv_attention.py  flash_attn's flash_attn_with_kvcache over SDPA (the official MHA's decoding step)
    packing.py       seq_idx -> the sequences laid end to end (cu_seqlens), shared by conv and SSD
    patch.py         patch_transformers / unpatch_transformers
"""

from .conv import causal_conv1d_fn, causal_conv1d_update
from .kv_attention import flash_attn_with_kvcache
from .mamba1 import selective_scan_fn
from .mamba2 import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
from .patch import patch_transformers, unpatch_transformers
from .state_update import selective_state_update

__all__ = [
    "causal_conv1d_fn", "causal_conv1d_update", "flash_attn_with_kvcache", "mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined",
    "patch_transformers", "selective_scan_fn", "selective_state_update", "unpatch_transformers",
]
