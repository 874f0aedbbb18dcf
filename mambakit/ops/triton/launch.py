"""Launching a Triton kernel again without Triton's per-call argument binding.

`kernel[grid](*args, **kw)` binds every argument, works out what the compiled kernel is
specialised on (each tensor's dtype and 16-byte alignment, each int's value class), builds a
cache key from that and looks the kernel up. For the scan's ~50 arguments that costs tens of µs
of host time per launch, and a short forward+backward, (16, 512) for example, is bound by host
time: the backward runs in autograd's device thread, where it costs several times more.

`launch` keys its own cache on the arguments' `signature` (each tensor's dtype and address
modulo 16, every other argument's value), which fixes everything Triton specialises on, and on
a hit calls the compiled kernel's launcher directly. A miss, the interpreter, a launch hook (a
profiler's) or a Triton without the internals used here take Triton's own path."""

from __future__ import annotations

import inspect

import torch

_Tensor = torch.Tensor
_CACHE: dict = {}
_MAX_ENTRIES = 1024

try:  # the internals the direct path calls; absent ones leave only Triton's own path
    from triton import knobs as _knobs

    _hooks = _knobs.runtime
    _current_stream = torch._C._cuda_getCurrentRawStream
    _SUPPORTED = hasattr(_hooks, "launch_enter_hook")
except (ImportError, AttributeError):  # pragma: no cover - depends on the triton build
    _SUPPORTED = False


def signature(values) -> tuple:
    """What a compiled kernel depends on in `values`: each tensor's dtype and its address modulo
    16 (never the tensor itself, so that the cache holds no memory), and any other value with its
    type (True, 1 and 1.0 are equal in Python but compile to different kernels)."""
    return tuple([(v.dtype, v.data_ptr() % 16) if isinstance(v, _Tensor) else (type(v), v) for v in values])


def _hooked(hook) -> bool:
    """Whether a launch hook is set: a function, or a HookChain (Triton 3.5+) with calls in it."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _tail(kernel, n_positional: int) -> tuple[tuple[str, ...], dict]:
    """The kernel's parameters after the positional ones, and their defaults."""
    params = list(inspect.signature(kernel.fn).parameters.values())[n_positional:]
    return tuple(p.name for p in params), {p.name: p.default for p in params if p.default is not p.empty}


def launch(kernel, grid: tuple, args: list, kwargs: dict) -> None:
    """kernel[grid](*args, **kwargs), with Triton's argument binding skipped once this kernel has
    run with arguments of the same `signature` on the current device. `args` are the kernel's
    leading parameters; `kwargs` hold the rest by name (constexprs, later parameters, and launch
    options such as num_warps)."""
    if not _SUPPORTED or not torch.cuda.is_initialized():
        kernel[grid](*args, **kwargs)
        return
    device = torch.cuda.current_device()
    key = (id(kernel), device, signature(args), tuple(kwargs), signature(kwargs.values()))
    entry = _CACHE.get(key)
    if entry is None or _hooked(_hooks.launch_enter_hook) or _hooked(_hooks.launch_exit_hook):
        compiled = kernel[grid](*args, **kwargs)
        if entry is None:
            _remember(key, kernel, compiled, len(args))
        return
    run, function, metadata, names, defaults, _kernel = entry  # the entry holds its kernel: its id stays unique
    rest = [kwargs[n] if n in kwargs else defaults[n] for n in names]
    grid = tuple(grid) + (1,) * (3 - len(grid))
    run(grid[0], grid[1], grid[2], _current_stream(device), function, metadata, None, None, None, *args, *rest)


def _remember(key, kernel, compiled, n_positional: int) -> None:
    """Caches what a direct launch needs; a kernel or a Triton that lacks it is not cached (its
    launches keep taking Triton's path), so nothing here can fail a launch that has been made."""
    try:
        entry = (compiled.run, compiled.function, compiled.packed_metadata) + _tail(kernel, n_positional) + (kernel,)
    except (AttributeError, TypeError, ValueError):
        return
    if len(_CACHE) >= _MAX_ENTRIES:
        _CACHE.clear()
    _CACHE[key] = entry


def clear_cache() -> None:
    _CACHE.clear()
