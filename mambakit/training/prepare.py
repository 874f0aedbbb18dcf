"""`mambakit prepare`: tokenize a text corpus with a Hugging Face tokenizer (from a local
directory or the local cache) into a flat token file that `mambakit train --data` memory-maps:
`.bin` (uint16) or `.npy` (uint16 when the vocabulary fits, else uint32). Documents are
separated by the tokenizer's EOS token when it has one. Written atomically.

The tokenizer's files go beside the token file, into `<out>.tokenizer/` (data.tokenizer_sidecar,
with prepared.json recording the token file), so that a run on the tokens stores its tokenizer
with its checkpoints and `mambakit generate` decodes with it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..checkpoint import atomic_write, atomic_write_json, write_directory
from ..tokenizer import TOKENIZER_FILES, load_tokenizer, tokenizer_files, write_tokenizer_files
from .data import SIDECAR_RECORD, TEXT_SUFFIXES, tokenizer_sidecar


def _documents(data: Path) -> list[Path]:
    if not data.exists():
        raise FileNotFoundError(f"--data {str(data)!r}: no such file or directory")
    if data.is_dir():
        files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"--data {str(data)!r}: no text files in the directory")
        return files
    return [data]


def prepare(tokenizer_spec: str, data: str | Path, out: str | Path, progress: bool = True) -> dict:
    """Tokenizes `data` (a text file or a directory of them) with `tokenizer_spec` (a directory or a hub id
    in the local cache) into the token file `out`; returns what it wrote (files, tokens, dtype, out)."""
    from tqdm import tqdm
    out = Path(out)
    if out.suffix not in (".bin", ".npy"):
        raise ValueError(f"--out must end in .bin or .npy, got {str(out)!r}")
    try:
        tokenizer = load_tokenizer(tokenizer_spec)
    except (FileNotFoundError, ImportError, ValueError) as err:
        raise type(err)(f"--tokenizer {tokenizer_spec!r}: {err}") from None
    files = _documents(Path(data).expanduser())
    eos = tokenizer.eos_token_id
    parts, n_tokens, max_id = [], 0, 0
    for f in tqdm(files, disable=not progress, unit="file", desc="tokenizing"):
        ids = tokenizer.encode(f.read_text(encoding="utf-8", errors="replace"))
        if eos is not None:
            ids = list(ids) + [eos]
        if ids:
            arr = np.asarray(ids, dtype=np.int64)
            parts.append(arr)
            n_tokens += len(arr)
            max_id = max(max_id, int(arr.max()))
    if n_tokens == 0:
        raise ValueError(f"--data {str(data)!r}: the corpus tokenizes to nothing")
    if out.suffix == ".bin" and max_id >= 2**16:
        raise ValueError(f"token ids reach {max_id}, more than a .bin (uint16) holds; write a .npy instead")
    dtype = np.uint16 if max_id < 2**16 else np.uint32
    tokens = np.concatenate(parts).astype(dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        atomic_write(out, lambda tmp: np.save(open(tmp, "wb"), tokens))
    else:
        atomic_write(out, lambda tmp: tokens.tofile(tmp))
    sidecar = _write_sidecar(out, tokenizer, tokenizer_spec, n_tokens)
    return {"files": len(files), "tokens": n_tokens, "dtype": str(np.dtype(dtype)), "out": str(out),
            "tokenizer": None if sidecar is None else str(sidecar)}


def _write_sidecar(out: Path, tokenizer, tokenizer_spec: str, n_tokens: int) -> Path | None:
    """The tokenizer's files beside the token file (as a whole: files.write_directory, with
    prepared.json last), or no sidecar when the tokenizer has no files to copy."""
    sidecar = tokenizer_sidecar(out)
    files = tokenizer_files(tokenizer.directory) if tokenizer.directory is not None else {}
    if not files:
        shutil.rmtree(sidecar, ignore_errors=True)  # a stale one would name the wrong tokenizer
        return None
    record = {"tokens": n_tokens, "token_file": out.name, "tokenizer": str(tokenizer_spec)}

    def write(into: Path) -> None:
        write_tokenizer_files(files, into)
        atomic_write_json(into / SIDECAR_RECORD, record)  # last: it marks a complete sidecar

    write_directory(sidecar, write, owned=lambda _: set(TOKENIZER_FILES), marker=SIDECAR_RECORD)
    return sidecar
