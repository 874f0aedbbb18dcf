"""Locating a checkpoint: a local directory (or a `mambakit train` run directory), or a hub id
whose snapshot is already in the local Hugging Face cache. Nothing is ever downloaded."""

from __future__ import annotations

from pathlib import Path


def resolve_directory(name_or_path: str | Path) -> Path:
    """A local directory, or the snapshot of a hub id already in the local Hugging Face cache.
    Nothing is downloaded."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        latest = path / "latest"  # a `mambakit train` run directory: its newest checkpoint
        if not (path / "config.json").is_file() and latest.is_file():
            return path / latest.read_text().strip()
        return path
    if path.exists():
        raise ValueError(f"{str(name_or_path)!r} is a file; from_pretrained needs a checkpoint directory")
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(repo_id=str(name_or_path), local_files_only=True))
    except Exception as err:  # not in the cache, or not a valid repo id
        raise FileNotFoundError(
            f"{str(name_or_path)!r} is neither a local directory nor a model in the local Hugging Face cache "
            f"(looked in {Path(name_or_path).expanduser().resolve()} and {constants.HF_HUB_CACHE}). mambakit never "
            f"downloads; fetch it first (e.g. `hf download {name_or_path}`) or pass a directory. ({type(err).__name__})"
        ) from None
