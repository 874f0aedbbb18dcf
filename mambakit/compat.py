"""Drop-in replacements for the official kernels' Python entry points, so that research code
written against `mamba_ssm` / `causal_conv1d` (the Vim repository, for example) switches by
changing one import:

    from mambakit.compat import selective_scan_fn, causal_conv1d_fn, causal_conv1d_update, selective_state_update

and `patch_transformers()`, which makes transformers' `MambaForCausalLM` call mambakit's
kernels instead of its slow torch fallback. The signatures and return conventions are the
official ones; each function dispatches like `mambakit.ops` (Triton on CUDA, torch elsewhere)."""

from __future__ import annotations

import torch

from . import ops


def _activation(activation):
    if activation in (None, False):
        return None
    if activation in (True, "silu", "swish"):
        return "silu"
    raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False):
    """mamba_ssm.ops.selective_scan_interface.selective_scan_fn: returns out, or (out, last_state)."""
    if isinstance(B, torch.Tensor) and B.ndim == 2:
        raise ValueError("selective_scan_fn: B of shape (D, N) (non-selective B) is not supported; "
                         "pass B as (batch, N, L) or (batch, G, N, L)")
    if isinstance(C, torch.Tensor) and C.ndim == 2:
        raise ValueError("selective_scan_fn: C of shape (D, N) (non-selective C) is not supported; "
                         "pass C as (batch, N, L) or (batch, G, N, L)")
    result = ops.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                return_final_state=return_last_state)
    return result


def causal_conv1d_fn(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
                     final_states_out=None, activation=None):
    """causal_conv1d.causal_conv1d_fn: x (batch, dim, L), weight (dim, width);
    returns out, or (out, final_states) with final_states (batch, dim, width-1)."""
    if seq_idx is not None:
        raise ValueError("causal_conv1d_fn: seq_idx is not supported; pack sequences with cu_seqlens in "
                         "mambakit.ops instead")
    result = ops.causal_conv1d(x, weight, bias, _activation(activation), initial_state=initial_states,
                               return_final_state=return_final_states or final_states_out is not None)
    if final_states_out is not None:
        out, final = result
        final_states_out.copy_(final)
        return (out, final_states_out) if return_final_states else out
    return result


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None, cache_seqlens=None,
                         conv_state_indices=None):
    """causal_conv1d.causal_conv1d_update: x (batch, dim) or (batch, dim, seqlen); conv_state
    (batch, dim, state_len >= width-1) holds the last inputs and is updated in place."""
    if cache_seqlens is not None or conv_state_indices is not None:
        raise ValueError("causal_conv1d_update: cache_seqlens / conv_state_indices are not supported")
    act = _activation(activation)
    squeeze = x.ndim == 2
    xs = x[..., None] if squeeze else x  # (batch, dim, seqlen)
    width = weight.shape[1]
    if conv_state.ndim != 3 or conv_state.shape[:2] != xs.shape[:2] or conv_state.shape[2] < width - 1:
        raise ValueError(f"causal_conv1d_update: conv_state must be (batch, dim, >= width-1) = "
                         f"({xs.shape[0]}, {xs.shape[1]}, >= {width - 1}), got {tuple(conv_state.shape)}")
    state_len = conv_state.shape[2]
    if state_len == width - 1:  # mambakit's own layout: the step ops, token by token
        outs = [ops.causal_conv1d_update(xs[..., t], conv_state, weight, bias, act) for t in range(xs.shape[2])]
        out = torch.stack(outs, dim=-1)
    else:
        out, _ = ops.causal_conv1d(xs, weight, bias, act, initial_state=conv_state[..., state_len - (width - 1):],
                                   return_final_state=True)
        conv_state.copy_(torch.cat([conv_state, xs.to(conv_state.dtype)], dim=-1)[..., -state_len:])
    return out[..., 0] if squeeze else out


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """mamba_ssm.ops.triton.selective_state_update.selective_state_update (Mamba-1 shapes):
    state (batch, dim, N) is updated in place; returns out (batch, dim)."""
    return ops.selective_state_update(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


# ---- transformers --------------------------------------------------------------------------

_PATCHES = {  # name in transformers.models.mamba.modeling_mamba -> replacement
    "mamba_selective_scan": lambda hidden_states, dt, A, B, C, D=None, z=None, delta_bias=None,
    delta_softplus=False, return_last_state=False, **_: selective_scan_fn(
        hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
        return_last_state=return_last_state),
    "selective_scan_fn": selective_scan_fn,
    "causal_conv1d_fn": lambda hidden_states, weight, bias=None, activation=None, **_: causal_conv1d_fn(
        hidden_states, weight, bias, activation=activation),
    "causal_conv1d_update": lambda hidden_states, conv_state, weight, bias=None, activation=None, **_:
    causal_conv1d_update(hidden_states, conv_state, weight, bias, activation),
    "mamba_selective_state_update": lambda state, hidden_states, dt, A, B, C, D=None, dt_bias=None,
    dt_softplus=False, z=None, **_: selective_state_update(state, hidden_states, dt, A, B, C, D=D, z=z,
                                                           dt_bias=dt_bias, dt_softplus=dt_softplus),
    "selective_state_update": selective_state_update,
}
_originals: dict[str, object] = {}


def patch_transformers() -> list[str]:
    """Makes transformers' Mamba models call mambakit's kernels. Returns the names replaced.
    `unpatch_transformers()` restores the originals."""
    try:
        from transformers.models.mamba import modeling_mamba
    except ImportError as err:
        raise ImportError("patch_transformers() needs the transformers package") from err
    replaced = []
    for name, fn in _PATCHES.items():
        current = getattr(modeling_mamba, name, None)
        if current is None:
            continue
        _originals.setdefault(name, current)
        setattr(modeling_mamba, name, fn)
        replaced.append(name)
    if not replaced:
        raise RuntimeError("patch_transformers(): this transformers version exposes none of the Mamba kernel "
                           f"entry points mambakit knows ({sorted(_PATCHES)})")
    return replaced


def unpatch_transformers() -> None:
    from transformers.models.mamba import modeling_mamba
    for name, fn in _originals.items():
        setattr(modeling_mamba, name, fn)
    _originals.clear()
