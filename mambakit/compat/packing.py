"""The official kernels' `seq_idx` (batch, L): which packed sequence each token belongs to. A
sequence is a run of equal ids along L; the state (the conv's past inputs, the SSM state) restarts
where the id changes. mambakit's ops take packed sequences as `cu_seqlens` offsets over one row,
so the batch rows are laid end to end and every row start and every id change becomes an offset.

The official SSD carries `initial_states[b]` into row b's first sequence only when that sequence's
id is 0 (its state passing starts from id 0), and returns as final state the state at the end of
each row. For the non-decreasing ids that packers produce this is exactly "each run is its own
sequence"; both are what `Packing` encodes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    """The sequences of a (batch, L) seq_idx, with the rows laid end to end."""
    batch: int
    length: int
    cu_seqlens: Tensor  # (S+1,) int32 offsets into batch * L
    row_first: Tensor  # (batch,) int64: the index of each row's first sequence
    row_last: Tensor  # (batch,) int64: the index of each row's last sequence
    starts_at_zero: Tensor  # (batch,) bool: the row's first id is 0, so it continues the initial state

    @property
    def n_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def one_per_row(self) -> bool:
        return self.n_seqs == self.batch

    def flatten(self, t: Tensor | None) -> Tensor | None:
        """(batch, L, ...) time-major -> (1, batch * L, ...)."""
        return None if t is None else t.reshape(1, self.batch * self.length, *t.shape[2:])

    def unflatten(self, t: Tensor) -> Tensor:
        """(1, batch * L, ...) -> (batch, L, ...)."""
        return t.reshape(self.batch, self.length, *t.shape[2:])

    def initial_states(self, states: Tensor) -> Tensor:
        """Per-row initial states (batch, ...) -> per-sequence (S, ...): each row's own for its first
        sequence where that starts with id 0, zeros everywhere else."""
        keep = self.starts_at_zero.to(states.device)
        rows = states * keep.view(-1, *([1] * (states.ndim - 1))).to(states.dtype)
        if self.one_per_row:
            return rows
        out = states.new_zeros(self.n_seqs, *states.shape[1:])
        return out.index_put((self.row_first.to(states.device),), rows)


def pack_seq_idx(seq_idx, batch: int, length: int, caller: str) -> Packing:
    """Checks seq_idx (an integer tensor of shape (batch, L)) and returns its Packing."""
    if not isinstance(seq_idx, Tensor):
        raise TypeError(f"{caller}: seq_idx must be an int32 torch.Tensor of shape (batch, L), "
                        f"got {type(seq_idx).__name__}")
    if seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex or seq_idx.dtype == torch.bool:
        raise TypeError(f"{caller}: seq_idx must hold integers (int32), got {seq_idx.dtype}")
    if tuple(seq_idx.shape) != (batch, length):
        raise ValueError(f"{caller}: seq_idx must have shape (batch, L) = ({batch}, {length}), "
                         f"got {tuple(seq_idx.shape)}")
    starts = torch.ones(batch, length, dtype=torch.bool, device=seq_idx.device)  # a sequence starts here
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    offsets = starts.flatten().nonzero().flatten()  # (S,) in batch * L
    end = torch.tensor([batch * length], dtype=offsets.dtype, device=offsets.device)
    per_row = starts.sum(dim=1).cpu()  # (batch,)
    row_last = per_row.cumsum(0) - 1
    return Packing(batch, length, torch.cat([offsets, end]).to(torch.int32), row_last - per_row + 1, row_last,
                   (seq_idx[:, 0] == 0).cpu())


def single_sequences(batch: int, length: int, device) -> Packing:
    """The Packing of rows that each hold one sequence (no seq_idx): id 0 everywhere."""
    return pack_seq_idx(torch.zeros(batch, length, dtype=torch.int32, device=device), batch, length, "")
