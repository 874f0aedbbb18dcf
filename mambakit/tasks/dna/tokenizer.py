"""The DNA character tokenizer: one token per base.

    id   0  1  2  3  4  5
    sym  A  C  G  T  N  |        (| separates records laid end to end: splits.py)

Lowercase (soft-masked) bases are the same tokens as uppercase ones, U (RNA) is T, and the other
IUPAC ambiguity codes (R Y S W K M B D H V) become N and are counted. Any other character (a
protein's E F I L P Q ..., a gap '-', a digit) is a ValueError that names the record and the
character. The ids are ordered so that the complement is 3 - id on the bases: A<->T, C<->G, with
N and | their own complements (COMPLEMENT).

decode(encode(s)) == s.upper() for a sequence of A, C, G, T, N (upper or lower case)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SYMBOLS = "ACGTN|"
VOCAB_SIZE = len(SYMBOLS)
N_BASES = 4  # the ids 0..3 are A, C, G, T
N_ID = SYMBOLS.index("N")
SEP_ID = SYMBOLS.index("|")
COMPLEMENT = np.array([3, 2, 1, 0, N_ID, SEP_ID], dtype=np.uint8)  # id -> its complement's id
AMBIGUOUS = "RYSWKMBDHV"  # IUPAC codes of two or more bases (N is a token of its own)
# a sequence whose letters are more than this fraction ambiguity codes is not taken for DNA: a
# protein written with only the letters that IUPAC shares with amino acids would pass the
# character check (an assembly has a handful of ambiguity codes in millions of bases)
MAX_AMBIGUOUS_FRACTION = 0.05
_INVALID = 255


def _lookup_tables() -> tuple[np.ndarray, np.ndarray]:
    """(byte -> token id, or _INVALID), (byte -> whether it is an ambiguity code mapped to N)."""
    ids = np.full(256, _INVALID, dtype=np.uint8)
    ambiguous = np.zeros(256, dtype=bool)
    for sym, i in (("A", 0), ("C", 1), ("G", 2), ("T", 3), ("U", 3), ("N", N_ID)):
        ids[ord(sym)] = ids[ord(sym.lower())] = i
    for sym in AMBIGUOUS:
        ids[ord(sym)] = ids[ord(sym.lower())] = N_ID
        ambiguous[ord(sym)] = ambiguous[ord(sym.lower())] = True
    return ids, ambiguous


_IDS, _AMBIGUOUS = _lookup_tables()


@dataclass
class Encoded:
    ids: np.ndarray  # (L,) uint8 token ids
    n_ambiguous: int  # IUPAC ambiguity codes mapped to N


def encode(seq: bytes | str, where: str = "the sequence") -> Encoded:
    """A sequence of bases (bytes or str, no line breaks) -> its token ids and the number of
    ambiguity codes mapped to N. `where` names the record in errors."""
    raw = seq.encode("latin-1", "replace") if isinstance(seq, str) else bytes(seq)
    codes = np.frombuffer(raw, dtype=np.uint8)  # (L,)
    ids = _IDS[codes]
    bad = np.flatnonzero(ids == _INVALID)
    if bad.size:
        char = raw[bad[0]:bad[0] + 1].decode("latin-1")
        raise ValueError(f"{where} is not DNA: it holds {bad.size} character(s) that are no nucleotide code, "
                         f"the first {char!r} at position {bad[0]} (a protein FASTA?); DNA is A, C, G, T, N and "
                         f"the IUPAC codes {AMBIGUOUS}")
    n_ambiguous = int(_AMBIGUOUS[codes].sum())
    return Encoded(ids, n_ambiguous)


def check_mostly_bases(n_letters: int, n_ambiguous: int, where: str) -> None:
    """A ValueError when more than MAX_AMBIGUOUS_FRACTION of `n_letters` are ambiguity codes."""
    if n_letters and n_ambiguous > MAX_AMBIGUOUS_FRACTION * n_letters:
        raise ValueError(f"{where} is not DNA: {n_ambiguous} of its {n_letters} letters "
                         f"({n_ambiguous / n_letters:.0%}) are IUPAC ambiguity codes ({AMBIGUOUS}), which a "
                         f"genome has only a few of (a protein FASTA?)")


def decode(ids: np.ndarray) -> str:
    """Token ids -> the string of their symbols (A C G T N |)."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
        raise ValueError(f"token ids must be in [0, {VOCAB_SIZE}), got {ids.min()}..{ids.max()}")
    return np.frombuffer(SYMBOLS.encode(), dtype=np.uint8)[ids.astype(np.int64)].tobytes().decode()


def reverse_complement(ids: np.ndarray) -> np.ndarray:
    """The reverse complement of token ids (..., L) along the last axis: the other strand, read
    5' to 3'. Involutive: reverse_complement(reverse_complement(x)) == x."""
    return COMPLEMENT[np.asarray(ids)[..., ::-1]]
