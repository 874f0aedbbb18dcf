"""Packed variable-length sequences (`cu_seqlens`) for backends without native support:
run the scan once per sequence, each from its own initial state, and re-pack the outputs."""

from __future__ import annotations

import torch


def split_varlen(scan_fn, u, delta, B, C, z, initial_state, cu_seqlens, return_final_state, **kwargs):
    """u, delta, z: (1, D, L); B, C: (1, [G,] N, L); initial_state: (S, D, N) or None.
    Returns y (1, D, L) [, final_state (S, D, N)], with the state restarting at each offset."""
    offsets = cu_seqlens.tolist()
    ys, finals = [], []
    for s, (start, end) in enumerate(zip(offsets, offsets[1:])):
        y, final = scan_fn(
            u[..., start:end], delta[..., start:end], B=B[..., start:end], C=C[..., start:end],
            z=None if z is None else z[..., start:end],
            initial_state=None if initial_state is None else initial_state[s:s + 1],
            return_final_state=True, **kwargs)
        ys.append(y)
        finals.append(final)
    y = torch.cat(ys, dim=-1)  # (1, D, L)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y


def split_varlen_conv(conv_fn, x, weight, bias, activation, initial_state, return_final_state, cu_seqlens):
    """The same for the causal conv: x (1, D, L); initial_state (S, D, K-1) or None."""
    offsets = cu_seqlens.tolist()
    ys, finals = [], []
    for s, (start, end) in enumerate(zip(offsets, offsets[1:])):
        y, final = conv_fn(x[..., start:end], weight, bias, activation,
                           None if initial_state is None else initial_state[s:s + 1], True)
        ys.append(y)
        finals.append(final)
    y = torch.cat(ys, dim=-1)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y


def split_varlen_ssd(ssd_fn, x, dt, B, C, z, initial_state, cu_seqlens, return_final_state, **kwargs):
    """The same for the SSD scan, time on dim 1: x, z (1, L, H, P); dt (1, L, H); B, C (1, L, G, N);
    initial_state (S, H, P, N) or None. Returns y (1, L, H, P) [, final_state (S, H, P, N)]."""
    offsets = cu_seqlens.tolist()
    ys, finals = [], []
    for s, (start, end) in enumerate(zip(offsets, offsets[1:])):
        y, final = ssd_fn(
            x[:, start:end], dt[:, start:end], B=B[:, start:end], C=C[:, start:end],
            z=None if z is None else z[:, start:end],
            initial_state=None if initial_state is None else initial_state[s:s + 1],
            return_final_state=True, **kwargs)
        ys.append(y)
        finals.append(final)
    y = torch.cat(ys, dim=1)  # (1, L, H, P)
    return (y, torch.cat(finals, dim=0)) if return_final_state else y
