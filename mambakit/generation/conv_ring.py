"""The planned CPU decoders' conv state: a ring of K slots laid out (B, K, D), so that a step
writes one slot instead of shifting a (B, D, K-1) tensor. Shared by the Mamba-1 and Mamba-2
layer plans (cpu_decode.py, cpu_decode_mamba2.py), which set `K`, `ring`, `slots`, `next_slot`
and `ssm` and get `load` / `store` from here."""

from __future__ import annotations


class ConvRingState:
    def load(self, state) -> None:
        """Takes a MambaState (conv (B, D, K-1), ssm) into the plan's buffers."""
        K = self.K
        self.ring[:, :K - 1].copy_(state.conv.transpose(1, 2))  # oldest first
        self.next_slot = K - 1
        self.ssm.copy_(state.ssm)

    def store(self, state) -> None:
        """Writes the plan's buffers back into a MambaState."""
        K, p = self.K, self.next_slot
        for j in range(K - 1):  # the state holds the last K-1 inputs, oldest first
            state.conv[:, :, j].copy_(self.slots[(p + 1 + j) % K])
        state.ssm.copy_(self.ssm)
