"""The order-k Markov baseline: p(base | the k tokens before it), counted on the training split
with add-one smoothing. It is printed beside the model's held-out bits per base, scored on
exactly the same targets (A, C, G, T), so that a model has to beat k-mer statistics, not only
the 2 bits of the uniform rate. Its context may reach back before a window's start (the model's
may not): the comparison favours the baseline. `sample` draws sequences from it: the negatives
of `--task dna-classify`, with the genome's (k+1)-mer statistics in expectation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tokenizer import N_BASES, SEP_ID, VOCAB_SIZE


def contexts(tokens: np.ndarray, order: int) -> np.ndarray:
    """The context code of every position (T,) int64: the `order` tokens before it as a base-6
    number (the stream is taken to start after `order` separators)."""
    padded = np.concatenate([np.full(order, SEP_ID, dtype=np.int64), tokens.astype(np.int64)])
    code = np.zeros(len(tokens), dtype=np.int64)
    for j in range(order):  # oldest token first
        code = code * VOCAB_SIZE + padded[j:j + len(tokens)]
    return code


@dataclass
class MarkovModel:
    order: int
    log2_probs: np.ndarray  # (6 ** order, 4): log2 p(base | context)

    @classmethod
    def fit(cls, tokens: np.ndarray, order: int, alpha: float = 1.0) -> "MarkovModel":
        """Counts on a token stream (T,): every position whose token is a base."""
        if isinstance(order, bool) or not isinstance(order, int) or not 0 <= order <= 8:
            raise ValueError(f"the Markov order must be an int in [0, 8], got {order!r}")
        is_base = tokens < N_BASES
        ctx = contexts(tokens, order)[is_base]
        counts = np.bincount(ctx * N_BASES + tokens[is_base], minlength=VOCAB_SIZE ** order * N_BASES)
        counts = counts.reshape(-1, N_BASES).astype(np.float64) + alpha
        return cls(order, np.log2(counts / counts.sum(1, keepdims=True)))

    def bits(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """-log2 p(tokens[t] | context) at the given positions of the stream, whose tokens must be bases."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (tokens[positions] >= N_BASES).any():
            raise ValueError("Markov bits are scored on bases (A, C, G, T) only")
        ctx = contexts(tokens, self.order)[positions]
        return -self.log2_probs[ctx, tokens[positions]]

    def sample(self, starts: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
        """(n, k) seed contexts of tokens -> (n, length) sequences that begin with them and go on
        drawn from the model."""
        n, k = starts.shape
        if k < self.order:
            raise ValueError(f"sampling an order-{self.order} model needs seed contexts of >= {self.order} tokens, got {k}")
        out = np.empty((n, length), dtype=np.uint8)
        out[:, :min(k, length)] = starts[:, :length]
        cum = np.cumsum(np.exp2(self.log2_probs), axis=1)  # (contexts, 4)
        cum[:, -1] = 1.0
        n_contexts = VOCAB_SIZE ** self.order
        ctx = np.zeros(n, dtype=np.int64)  # (n,) the code of the `order` tokens before t
        for j in range(k - self.order, min(k, length)):
            ctx = ctx * VOCAB_SIZE + out[:, j]
        for t in range(k, length):  # one step of every row at once: the loop is over positions
            u = rng.random(n)[:, None]
            out[:, t] = (u > cum[ctx]).sum(1)
            ctx = (ctx * VOCAB_SIZE + out[:, t]) % n_contexts
        return out
