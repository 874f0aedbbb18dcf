"""Locating a checkpoint: a local directory (or a `mambakit train` run directory), or a hub id
whose snapshot is already in the local Hugging Face cache. Nothing is ever downloaded.

A name read from a file and joined to a directory (an index's shard, a run's `latest`, the
cache's refs) is data, not a path: it must be a plain file name that stays inside its
directory, so that a checkpoint cannot make the loader read `../outside` or `/etc/passwd`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from .files import interrupted_save


def resolve_directory(name_or_path: str | Path) -> Path:
    """A local directory, or the snapshot of a hub id already in the local Hugging Face cache.
    Nothing is downloaded. A directory that a killed save left renamed away is read from
    where that save left it (the next save puts it back)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        latest = path / "latest"  # a `mambakit train` run directory: its newest checkpoint
        if not (path / "config.json").is_file() and latest.is_file():
            return child_path(path, _read_pointer(latest), source=latest)
        return path
    if path.exists():
        raise ValueError(f"{str(name_or_path)!r} is a file; from_pretrained needs a checkpoint directory")
    old = interrupted_save(path)
    if old is not None:
        warnings.warn(f"{path} is missing: a save into it was interrupted; reading the previous checkpoint from "
                      f"{old} (the next save_pretrained into {path} puts it back)", stacklevel=3)
        return old
    if not _may_be_hub_id(name_or_path):
        raise FileNotFoundError(f"no checkpoint directory {str(name_or_path)!r}: "
                                f"{os.path.abspath(path)} does not exist")
    return _hub_snapshot(name_or_path)


def _may_be_hub_id(name_or_path: str | Path) -> bool:
    """Whether a name that is no local path may be a hub id ("org/name" or "name"): a str that
    the hub accepts as a repository id. "./run", "../run", "/abs/run", "~/run", "a/b/c" and a
    pathlib.Path are paths, whose absence is all there is to say."""
    if not isinstance(name_or_path, str):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return False
    return True


def child_path(directory: Path, name: Any, source: Path) -> Path:
    """directory/name for a name read from the file `source`, or a ValueError naming `source`:
    the name must be a plain file name (no separator, not `..`, not absolute), and the path
    must resolve inside the directory (inside the cache's repository folder for a snapshot of
    the Hugging Face cache, whose files are links to its blobs)."""
    if not isinstance(name, str) or not _is_plain_name(name):
        raise ValueError(f"{source} names {name!r}; only a plain file name inside {directory} is accepted")
    path = directory / name
    real, home = os.path.realpath(path), Path(os.path.realpath(directory))
    roots = [str(home)]
    if home.parent.name == "snapshots" and home.parent.parent.name.startswith("models--"):
        roots.append(str(home.parent.parent))
    if not any(os.path.commonpath([real, root]) == root for root in roots):
        raise ValueError(f"{source} names {name!r}, which resolves to {real}, outside {directory}")
    return path


def _is_plain_name(name: str) -> bool:
    separators = {os.sep, os.altsep or os.sep, "/", "\\", "\0"}
    return (name not in ("", ".", "..") and not any(s in name for s in separators) and not os.path.isabs(name)
            and os.path.basename(name) == name)


def _read_pointer(path: Path) -> str:
    try:
        return path.read_text()[:4096].strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: {err})") from None


def _hub_snapshot(repo_id: str | Path) -> Path:
    """The snapshot directory of a hub id in the local cache. Its refs file names the snapshot:
    that name must be one of the repository's snapshots."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.file_download import repo_folder_name
    try:
        snapshot = Path(snapshot_download(repo_id=str(repo_id), local_files_only=True))
    except Exception as err:  # not in the cache, or not a valid repo id
        raise FileNotFoundError(
            f"{str(repo_id)!r} is neither a local directory ({os.path.abspath(repo_id)} does not exist) nor a model "
            f"in the local Hugging Face cache ({constants.HF_HUB_CACHE}). mambakit never downloads: if it is a "
            f"hub id, fetch it first (`hf download {repo_id}`); else pass the path of a checkpoint directory. "
            f"({type(err).__name__})"
        ) from None
    snapshots = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=str(repo_id), repo_type="model") / "snapshots"
    refs = snapshots.parent / "refs"
    if os.path.normpath(snapshot.parent) != os.path.normpath(snapshots):
        raise ValueError(f"{refs} names the snapshot {snapshot}, which is not in {snapshots}")
    return child_path(snapshots, snapshot.name, source=refs)
