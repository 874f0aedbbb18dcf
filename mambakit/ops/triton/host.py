"""Host-side integer helpers for the kernel launchers. `triton.cdiv` and
`triton.next_power_of_2` are JIT functions, and calling one from Python costs about 10 µs
(argument unwrapping); these plain versions cost nanoseconds, which matters when a decode
or prefill is bound by launch overhead."""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def as_dtype(t, dtype):
    """t in `dtype`, without a call where it already is (`.to()` costs a few µs even when it does nothing)."""
    return t if t.dtype == dtype else t.to(dtype)
