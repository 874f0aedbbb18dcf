"""DNA models: the causal MambaLM at the DNA vocabulary (the registry's "mamba_dna"), and a
sequence classifier over three backbones.

DNA tokens are A C G T N | (ids 0..5; mambakit.tasks.dna.tokenizer), whose complements are
DNA_COMPLEMENT. The classifier (`DNAClassifier`) reads a window of tokens (B, L) and gives
class logits (B, num_classes) from the mean of its last hidden states over the window:

- "causal": Mamba blocks (the LM's layer), each position sees the ones before it;
- "bidirectional": BiMamba blocks (Vim's layer), each position sees the whole window;
- "rc": RC-equivariant BiMamba blocks (modules/rc_mamba.py): the embedding, every block and the
  norms commute with the reverse complement, and the pooled features are those of the forward
  half plus the channel-reversed ones of the reverse half, so that the logits of a window and of
  its reverse complement are equal (RC-invariant), by construction, at any weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..config import MambaConfig
from ..modules.bimamba import BiMamba
from ..modules.block import Block
from ..modules.mamba import Mamba
from ..modules.norm import RMSNorm
from ..modules.rc_mamba import RCBiMamba, RCRMSNorm
from .lm import lm_builder
from .registry import register_model

DNA_VOCAB_SIZE = 6  # A C G T N |
DNA_COMPLEMENT = (3, 2, 1, 0, 4, 5)  # A<->T, C<->G; N and | their own complements
BACKBONES = ("causal", "bidirectional", "rc")

# the causal LM of `mambakit train --task dna`: 6 tokens, RMSNorm, tied embeddings; the task
# overrides the sizes from its flags
DNA_LM = MambaConfig(d_model=128, n_layer=4, vocab_size=DNA_VOCAB_SIZE, d_state=16)


@dataclass
class DNAClassifierConfig:
    backbone: str = "rc"  # "causal" | "bidirectional" | "rc"
    num_classes: int = 2
    d_model: int = 64  # for "rc": both strands' halves together
    n_layer: int = 2
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    vocab_size: int = DNA_VOCAB_SIZE
    complement: tuple[int, ...] = DNA_COMPLEMENT  # token id -> its complement's id ("rc" only)
    norm_eps: float = 1e-5

    def check(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        for name in ("num_classes", "d_model", "n_layer", "d_state", "d_conv", "expand", "vocab_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DNAClassifierConfig.{name} must be an int >= 1, got {v!r}")
        if self.backbone == "rc" and self.d_model % 2:
            raise ValueError(f"the rc backbone splits d_model in two strands: it must be even, got {self.d_model}")
        comp = list(self.complement)
        if sorted(comp) != list(range(self.vocab_size)) or any(comp[comp[i]] != i for i in range(self.vocab_size)):
            raise ValueError(f"complement must be an involution of the {self.vocab_size} token ids, got {comp}")


class RCEmbedding(nn.Module):
    """Token ids (B, L) -> (B, L, 2d) RC-equivariantly: E[x] for the forward half and the
    channel-reversed E[complement(x)] for the reverse half, with one table E (V, d)."""

    def __init__(self, vocab_size: int, d_model: int, complement: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab_size, d_model // 2) * 0.02)
        self.register_buffer("complement", torch.tensor(complement, dtype=torch.long), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        forward_half = self.weight[ids]  # (B, L, d)
        reverse_half = self.weight[self.complement[ids]].flip(-1)  # (B, L, d)
        return torch.cat([forward_half, reverse_half], dim=-1)


def rc_ids(ids: torch.Tensor, complement: tuple[int, ...] = DNA_COMPLEMENT) -> torch.Tensor:
    """The reverse complement of token ids (B, L)."""
    return torch.tensor(complement, dtype=torch.long, device=ids.device)[ids.long().flip(-1)]


class DNAClassifier(nn.Module):
    def __init__(self, cfg: DNAClassifierConfig):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        rc = cfg.backbone == "rc"
        d = cfg.d_model
        self.embedding = RCEmbedding(cfg.vocab_size, d, cfg.complement) if rc else nn.Embedding(cfg.vocab_size, d)
        if not rc:
            nn.init.normal_(self.embedding.weight, std=0.02)  # as the LM's (RCEmbedding's too)
        self.layers = nn.ModuleList(Block(d, self._mixer(i), self._norm()) for i in range(cfg.n_layer))
        self.norm_f = self._norm()
        self.head = nn.Linear(d // 2 if rc else d, cfg.num_classes)

    def _mixer(self, i: int) -> nn.Module:
        cfg = self.cfg
        sizes = dict(d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand, layer_idx=i)
        if cfg.backbone == "causal":
            return Mamba(cfg.d_model, **sizes)
        if cfg.backbone == "bidirectional":
            return BiMamba(cfg.d_model, **sizes)
        return RCBiMamba(cfg.d_model, **sizes)

    def _norm(self) -> nn.Module:
        return (RCRMSNorm if self.cfg.backbone == "rc" else RMSNorm)(self.cfg.d_model, eps=self.cfg.norm_eps)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> the normed last hidden states (B, L, d_model)."""
        if ids.ndim != 2 or ids.dtype.is_floating_point:
            raise ValueError(f"DNAClassifier expects integer token ids of shape (B, L), got {tuple(ids.shape)} "
                             f"{ids.dtype}")
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        hidden, residual = self.embedding(ids.long()), None  # (B, L, d)
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        residual = hidden if residual is None else residual + hidden
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> class logits (B, num_classes)."""
        pooled = self.hidden_states(ids).mean(1)  # (B, d)
        if self.cfg.backbone == "rc":  # the two strands' views of each feature, added: RC-invariant
            half = pooled.shape[-1] // 2
            pooled = pooled[:, :half] + pooled[:, half:].flip(-1)  # (B, d / 2)
        return self.head(pooled)


def classifier_builder(backbone: str):
    """The registry's builder of a DNAClassifier with `backbone`: (**config overrides) -> model."""
    def build(**overrides) -> DNAClassifier:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(DNAClassifierConfig)}
        if unknown:
            raise ValueError(f"unknown DNAClassifierConfig field(s): {', '.join(sorted(unknown))}")
        return DNAClassifier(DNAClassifierConfig(**{"backbone": backbone, **overrides}))
    return build


dna_lm = lm_builder(DNA_LM)  # (device=None, dtype=None, **MambaConfig overrides) -> MambaLM
register_model("mamba_dna", dna_lm)
