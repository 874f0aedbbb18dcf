"""Tokenizers: the built-in byte-level one (token id = byte value, no files), and any Hugging
Face tokenizer from a local directory or the local cache, through `tokenizers` (a
tokenizer.json) or `transformers` (AutoTokenizer), whichever is installed. Nothing is
downloaded.

A model's tokenizer travels with it as files (TOKENIZER_FILES) in its checkpoint directory:
`mambakit prepare` keeps the tokenizer's files beside the token file, `mambakit train` copies
them into every checkpoint, and `load_for_model` reads them back (the byte tokenizer when a
checkpoint has none)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_write, resolve_directory

# the files that make a Hugging Face tokenizer, any of them (a checkpoint's tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model")


class ByteTokenizer:
    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """encode / decode / eos_token_id over a `tokenizers.Tokenizer` or a transformers tokenizer."""

    def __init__(self, backend, kind: str, eos_token_id: int | None, directory: Path | None = None):
        self.backend, self.kind, self.eos_token_id = backend, kind, eos_token_id
        self.directory = directory  # where its files are (tokenizer_files), when it was read from files

    def encode(self, text: str) -> list[int]:
        if self.kind == "tokenizers":
            return self.backend.encode(text).ids
        return self.backend.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids])


def load_tokenizer(name_or_path: str | Path) -> HFTokenizer:
    """A directory with tokenizer.json (or other tokenizer files), or a hub id already in the
    local Hugging Face cache. Raises FileNotFoundError or ImportError with what is missing."""
    directory = resolve_directory(name_or_path)
    tokenizer_json = directory / "tokenizer.json"
    try:
        from tokenizers import Tokenizer
    except ImportError:
        Tokenizer = None
    if tokenizer_json.is_file() and Tokenizer is not None:
        tok = Tokenizer.from_file(str(tokenizer_json))
        return HFTokenizer(tok, "tokenizers", _eos_from_files(directory, tok), directory)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError(f"reading the tokenizer in {directory} needs `tokenizers` or `transformers` "
                          f"(pip install tokenizers)") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"no tokenizer in {directory}: {err}") from None
    return HFTokenizer(tok, "transformers", tok.eos_token_id, directory)


def has_tokenizer(directory: str | Path) -> bool:
    directory = Path(directory)
    return any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                   "tokenizer.model"))


def load_for_model(model_dir: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer stored with a checkpoint: `model_dir` is a checkpoint directory, a
    `mambakit train` run directory (its latest checkpoint's, else the run's own copy) or a hub
    id in the local cache. The byte tokenizer when none is stored (a byte-level run)."""
    for directory in (resolve_directory(model_dir), Path(model_dir).expanduser()):
        if directory.is_dir() and has_tokenizer(directory):
            return load_tokenizer(directory)
    return ByteTokenizer()


def tokenizer_files(directory: str | Path) -> dict[str, bytes]:
    """The tokenizer's files in `directory` (those of TOKENIZER_FILES that are there), by name."""
    directory = Path(directory)
    return {name: (directory / name).read_bytes() for name in TOKENIZER_FILES if (directory / name).is_file()}


def write_tokenizer_files(files: dict[str, bytes], directory: str | Path) -> None:
    """Writes `files` (tokenizer_files) into `directory`, each atomically, and removes the other
    TOKENIZER_FILES there: the directory then holds this tokenizer and no stale one (none when
    `files` is empty)."""
    directory = Path(directory)
    for name in TOKENIZER_FILES:
        if name in files:
            atomic_write(directory / name, lambda tmp, data=files[name]: Path(tmp).write_bytes(data))
        else:
            (directory / name).unlink(missing_ok=True)


def _eos_from_files(directory: Path, tok) -> int | None:
    """eos_token from tokenizer_config.json / special_tokens_map.json, as an id."""
    import json
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if isinstance(eos, str) and tok.token_to_id(eos) is not None:
                return tok.token_to_id(eos)
    return None
