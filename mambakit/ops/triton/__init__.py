"""Fused Triton kernels (GPU; or on CPU under TRITON_INTERPRET=1 for tests)."""
