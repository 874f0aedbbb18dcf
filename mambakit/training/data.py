"""Training data: a token stream split into train and validation, and deterministic batches.

- The default corpus needs no download: the running Python's standard-library source files
  (found through `sysconfig`). Each file goes to train or validation by a hash of its path
  relative to the library root, so the split does not change between runs or machines.
- `--data PATH`: a text file, a directory of text files, or a pre-tokenized `.bin` (uint16) /
  `.npy` (uint16 or uint32) read through a memory map (90 % train, 10 % validation).
- `--max-corpus-bytes N` bounds what is read, in all: text files are read in order until N
  bytes (the last one only in part), a token file's first N bytes are used.
- Text is tokenized by the byte tokenizer: ids 0..255, and EOS_ID = 256 between documents.
- A token file made by `mambakit prepare` has its tokenizer beside it (`tokenizer_sidecar`):
  the Corpus names it, and the run stores it with every checkpoint.
- The batch for step k depends only on (seed, k): a resumed run sees the same batches.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

EOS_ID = 256
BYTE_VOCAB = 257  # 256 bytes + EOS
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h", ".toml", ".yaml", ".yml"}


@dataclass
class Corpus:
    train: np.ndarray  # (T,) token ids
    val: np.ndarray
    name: str
    vocab_size: int
    tokenizer_dir: Path | None = None  # the tokenizer that made the tokens (None: bytes, or unknown)

    def unigram_bits_per_token(self) -> float:
        """The entropy of the validation tokens' unigram distribution: what a model must beat."""
        counts = np.bincount(self.val, minlength=self.vocab_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum())


def _is_val(key: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def _bytes_to_tokens(chunks: list[bytes]) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype=np.uint16)
    parts = []
    for chunk in chunks:
        parts.append(np.frombuffer(chunk, dtype=np.uint8).astype(np.uint16))
        parts.append(np.array([EOS_ID], dtype=np.uint16))
    return np.concatenate(parts)


def _text_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(data: str | Path | None = None, val_fraction: float = 0.1, max_bytes: int | None = None) -> Corpus:
    """The default standard-library corpus, or `data` (see the module docstring). Raises
    FileNotFoundError for a missing path and ValueError for an empty or unreadable corpus."""
    if data is None:
        root = stdlib_root()
        files = [p for p in sorted(root.rglob("*.py")) if "site-packages" not in p.parts]
        return _from_files(files, root, val_fraction, max_bytes, f"python stdlib ({root})")
    path = Path(data).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--data {str(data)!r}: no such file or directory")
    if path.is_dir():
        files = _text_files(path)
        if not files:
            raise ValueError(f"--data {str(data)!r}: no text files ({', '.join(sorted(TEXT_SUFFIXES))}) in the directory")
        return _from_files(files, path, val_fraction, max_bytes, str(path))
    if path.suffix in (".bin", ".npy"):
        return _from_array(path, val_fraction, max_bytes)
    return _from_files([path], path.parent, val_fraction, max_bytes, str(path), split_inside=True)


def _from_files(files, root, val_fraction, max_bytes, name, split_inside=False) -> Corpus:
    train, val, total = [], [], 0
    for f in files:
        if max_bytes is not None and total >= max_bytes:
            break
        try:
            raw = _read_bytes(f, None if max_bytes is None else max_bytes - total)
        except OSError:
            continue  # unreadable files of the standard library (permissions) are skipped
        if not raw:
            continue
        total += len(raw)
        if split_inside:  # one file: its last val_fraction is validation
            cut = int(len(raw) * (1 - val_fraction))
            train.append(raw[:cut])
            val.append(raw[cut:])
        else:
            (val if _is_val(str(f.relative_to(root)), val_fraction) else train).append(raw)
    if (not train or not val) and not split_inside and total:
        # too few files for the split by path hash to fill both sides: split inside each file
        return _from_files(files, root, val_fraction, max_bytes, name, split_inside=True)
    if not train or not val or sum(map(len, train)) < 2 or sum(map(len, val)) < 2:
        raise ValueError(f"--data {name}: the corpus is empty or too small to split into train and validation")
    return Corpus(_bytes_to_tokens(train), _bytes_to_tokens(val), name, BYTE_VOCAB)


def _read_bytes(path: Path, limit: int | None) -> bytes:
    """The file's bytes, or its first `limit` bytes (the rest is never read)."""
    with open(path, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def tokenizer_sidecar(token_file: str | Path) -> Path:
    """The directory beside a token file where `mambakit prepare` keeps the tokenizer that made
    it (its files, and prepared.json recording the token file it belongs to)."""
    token_file = Path(token_file)
    return token_file.with_name(token_file.name + ".tokenizer")


SIDECAR_RECORD = "prepared.json"  # in the sidecar: {"tokens": N, "token_file": NAME, "tokenizer": SPEC}


def _sidecar_for(path: Path, n_tokens: int) -> Path | None:
    """The token file's tokenizer sidecar, when there is one and it records this file (its
    number of tokens); one that records another is ignored with a warning."""
    sidecar = tokenizer_sidecar(path)
    if not sidecar.is_dir():
        return None
    try:
        recorded = json.loads((sidecar / SIDECAR_RECORD).read_text())["tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if recorded != n_tokens:
        print(f"[mambakit] warning: {sidecar} does not record {path.name} ({n_tokens} tokens; it records "
              f"{recorded}); the run stores no tokenizer", file=sys.stderr)
        return None
    return sidecar


def _from_array(path: Path, val_fraction: float, max_bytes: int | None = None) -> Corpus:
    if path.suffix == ".npy":
        tokens = np.load(path, mmap_mode="r")
        if tokens.dtype not in (np.uint16, np.uint32) or tokens.ndim != 1:
            raise ValueError(f"--data {path}: a .npy corpus must be a 1-D uint16 or uint32 array, got "
                             f"{tokens.ndim}-D {tokens.dtype}")
    else:
        if path.stat().st_size % 2:
            raise ValueError(f"--data {path}: a .bin corpus holds uint16 tokens, but its size is odd")
        tokens = np.memmap(path, dtype=np.uint16, mode="r")
    sidecar = _sidecar_for(path, len(tokens))
    if max_bytes is not None:
        tokens = tokens[:max_bytes // tokens.dtype.itemsize]
    if len(tokens) < 4:
        raise ValueError(f"--data {path}: the corpus is empty or too small to split into train and validation")
    cut = int(len(tokens) * (1 - val_fraction))
    vocab = int(tokens.max()) + 1
    return Corpus(tokens[:cut], tokens[cut:], str(path), vocab, sidecar)


def batch_at(tokens: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int,
             device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The (inputs, targets) of step `step`: batch_size random windows of seq_len + 1 tokens,
    drawn from a generator seeded by (seed, step) alone. (B, L) int64 each."""
    if len(tokens) < seq_len + 1:
        raise ValueError(f"the corpus split has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len, (batch_size,), generator=g).tolist()
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    x = torch.from_numpy(rows)
    return x[:, :-1].to(device), x[:, 1:].to(device)
