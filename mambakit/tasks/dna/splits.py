"""Genomes as token streams: tokenized records, held-out splits, and the windows a model trains on.

Held-out splits never share a base (`held_out_split`):
- several files (strains): whole files are held out: --valid names them, by default the last
  file in sorted order (train on three strains, validate on the fourth);
- one file of several records: whole records from the end, until the held-out part holds at
  least `valid_fraction` of the bases (at least one record stays in training);
- one record: its last `valid_fraction` of bases.

Windows and records (`Stream`): a split's records are laid end to end, each followed by one
separator token (|, tokenizer.SEP_ID). A window is drawn anywhere in that stream, so it may span
the end of one record and the start of the next, but only across a separator, never joining two
records' bases directly; no loss or score is counted where the target is the separator.
Reverse-complement augmentation (`reverse_complement` on a window) reads the other strand: the
records in reverse order, each complemented, with the separators where they were."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fasta import read_records
from .tokenizer import N_BASES, N_ID, SEP_ID, check_mostly_bases, encode, reverse_complement


@dataclass
class Sequence:
    """A tokenized record, or the part of one from `start` on (a tail held out)."""
    source: str
    name: str
    ids: np.ndarray  # (L,) uint8
    start: int = 0  # the offset of ids[0] in the record

    @property
    def interval(self) -> tuple[str, str, int, int]:
        """(file, record, first base, end): where these bases are, to check that splits are disjoint."""
        return (self.source, self.name, self.start, self.start + len(self.ids))


@dataclass
class Genomes:
    sequences: list[Sequence]
    n_ambiguous: int  # IUPAC ambiguity codes mapped to N
    backend: str = "auto"

    @property
    def n_bases(self) -> int:
        return sum(len(s.ids) for s in self.sequences)

    @property
    def files(self) -> list[str]:
        return sorted({s.source for s in self.sequences})


def load_genomes(paths, backend: str = "auto") -> Genomes:
    """Files or directories of FASTA/FASTQ -> their tokenized records. A file whose bases are
    not DNA is a ValueError naming it and the record."""
    sequences, n_ambiguous = [], 0
    by_file: dict[str, list[int]] = {}
    for rec in read_records(paths, backend):
        if not rec.seq:
            continue
        encoded = encode(rec.seq, where=f"{rec.source}: record {rec.name!r}")
        sequences.append(Sequence(rec.source, rec.name, encoded.ids))
        counts = by_file.setdefault(rec.source, [0, 0])
        counts[0] += len(encoded.ids)
        counts[1] += encoded.n_ambiguous
        n_ambiguous += encoded.n_ambiguous
    for source, (n_letters, n_amb) in by_file.items():
        check_mostly_bases(n_letters, n_amb, source)
    return Genomes(sequences, n_ambiguous, backend)


@dataclass
class Split:
    train: list[Sequence]
    valid: list[Sequence]
    unit: str  # "file", "record" or "tail": what was held out


def held_out_split(sequences: list[Sequence], valid: list[str] | None = None,
                   valid_fraction: float = 0.1) -> Split:
    """Training and held-out sequences that share no base (the rules in the module doc).
    `valid`: files to hold out, by path, file name or name without suffixes (several files only)."""
    if not 0 < valid_fraction < 1:
        raise ValueError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    if not sequences:
        raise ValueError("no sequence to split")
    files = sorted({s.source for s in sequences})
    if len(files) > 1:
        held = _match_files(files, valid) if valid else files[-1:]
        if len(held) == len(files):
            raise ValueError(f"--valid holds out every file ({', '.join(held)}); leave at least one to train on")
        return Split([s for s in sequences if s.source not in held], [s for s in sequences if s.source in held], "file")
    if valid:
        raise ValueError(f"--valid names files to hold out, but all the data is one file ({files[0]})")
    if len(sequences) > 1:
        total, n_valid, k = sum(len(s.ids) for s in sequences), 0, len(sequences)
        while k > 1 and n_valid < valid_fraction * total:
            k -= 1
            n_valid += len(sequences[k].ids)
        return Split(sequences[:k], sequences[k:], "record")
    seq = sequences[0]
    cut = len(seq.ids) - max(1, int(round(valid_fraction * len(seq.ids))))
    if cut < 1:
        raise ValueError(f"{seq.source}: record {seq.name!r} has {len(seq.ids)} bases, too few to hold some out")
    return Split([Sequence(seq.source, seq.name, seq.ids[:cut], seq.start)],
                 [Sequence(seq.source, seq.name, seq.ids[cut:], seq.start + cut)], "tail")


def _match_files(files: list[str], names: list[str]) -> list[str]:
    held = []
    for name in names:
        hits = [f for f in files if name in (f, Path(f).name, _stem(f))]
        if not hits:
            raise ValueError(f"--valid {name!r} is none of the files: {', '.join(Path(f).name for f in files)}")
        held += [f for f in hits if f not in held]
    return held


def _stem(path: str) -> str:
    """The file name without its suffixes (NTUH-K2044.fna.xz -> NTUH-K2044)."""
    name = Path(path).name
    return name.split(".", 1)[0] if "." in name else name


def overlaps(split: Split) -> list[tuple]:
    """Pairs of (train, held-out) intervals that share bases; empty for a sound split."""
    out = []
    for a in (s.interval for s in split.train):
        for b in (s.interval for s in split.valid):
            if a[:2] == b[:2] and a[2] < b[3] and b[2] < a[3]:
                out.append((a, b))
    return out


# ---- streams and windows -----------------------------------------------------------------

@dataclass
class Stream:
    """A split's sequences laid end to end, each followed by the separator."""
    tokens: np.ndarray  # (T,) uint8
    bounds: list[tuple[int, int]] = field(default_factory=list)  # each sequence's [start, end) in tokens

    @classmethod
    def of(cls, sequences: list[Sequence]) -> "Stream":
        if not sequences:
            raise ValueError("no sequence to lay out")
        parts, bounds, at = [], [], 0
        for s in sequences:
            parts += [s.ids, np.array([SEP_ID], dtype=np.uint8)]
            bounds.append((at, at + len(s.ids)))
            at += len(s.ids) + 1
        return cls(np.concatenate(parts), bounds)

    def __len__(self) -> int:
        return len(self.tokens)

    def n_windows_ok(self, seq_len: int) -> bool:
        return len(self.tokens) >= seq_len + 1

    def windows(self, starts: np.ndarray, seq_len: int) -> np.ndarray:
        """(n,) start positions -> the windows tokens[s : s + seq_len + 1], (n, seq_len + 1) uint8."""
        starts = np.asarray(starts, dtype=np.int64)
        if starts.size and (starts.min() < 0 or starts.max() + seq_len + 1 > len(self.tokens)):
            raise ValueError(f"window starts must be in [0, {len(self.tokens) - seq_len - 1}]")
        return self.tokens[starts[:, None] + np.arange(seq_len + 1)]

    def random_starts(self, rng: np.random.Generator, n: int, seq_len: int) -> np.ndarray:
        self.check_length(seq_len)
        return rng.integers(0, len(self.tokens) - seq_len, size=n)

    def even_starts(self, n: int, seq_len: int) -> np.ndarray:
        """n starts spread evenly over the stream (the held-out windows: the same every time)."""
        self.check_length(seq_len)
        return np.linspace(0, len(self.tokens) - seq_len - 1, n).round().astype(np.int64)

    def check_length(self, seq_len: int, what: str = "this split") -> None:
        if not self.n_windows_ok(seq_len):
            raise ValueError(f"{what} has {len(self.tokens)} tokens, fewer than --seq-len + 1 = {seq_len + 1}")


def augment_reverse_complement(windows: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Each window (n, L) replaced by its reverse complement with probability p (the other strand)."""
    flip = rng.random(windows.shape[0]) < p  # (n,)
    out = windows.copy()
    out[flip] = reverse_complement(windows[flip])
    return out


IGNORE_INDEX = -100  # a target that adds no loss (cross_entropy's default)


def inputs_targets(windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows (n, L + 1) -> (inputs (n, L) uint8, targets (n, L) int64), the targets that are the
    separator set to IGNORE_INDEX (a record's end is not predicted)."""
    inputs = windows[:, :-1]
    targets = windows[:, 1:].astype(np.int64)
    targets[targets == SEP_ID] = IGNORE_INDEX
    return inputs, targets


def scored(targets: np.ndarray) -> np.ndarray:
    """The targets that bits per base counts: A, C, G and T (not N, not the separator)."""
    return (targets >= 0) & (targets < N_BASES)


__all__ = ["Genomes", "IGNORE_INDEX", "N_ID", "Sequence", "Split", "Stream", "augment_reverse_complement",
           "held_out_split", "inputs_targets", "load_genomes", "overlaps", "scored"]
