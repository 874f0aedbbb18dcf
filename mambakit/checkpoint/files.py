"""Atomic files and directories. Every file mambakit writes (weights, configs, caches, training
states, token files) goes to a temporary file in the same directory and is then renamed over
the target, so a crash leaves the old file or the complete new one, never a partial one.

A checkpoint is several files (config.json and the weights) that must change together, so
`write_directory` switches a whole directory. What a kill at any instant leaves at the target
path, by case:

- The target holds no checkpoint yet (missing, empty, or without its marker file config.json):
  the files are written in place, the marker last. The directory is a checkpoint once the
  marker is there, and a complete one: nothing to lose, nothing half-made that loads.
- The target holds a checkpoint: the new one is written into a temporary sibling
  `.NAME.tmp-XXXXXXXX` (same filesystem), then two renames switch them: target ->
  `.NAME.old-XXXXXXXX`, `.NAME.tmp-XXXXXXXX` -> target; then the old one is removed. Before the
  first rename the target is the old checkpoint, after the second the new one. Between the two
  (an instant) the target path is missing and `.NAME.old-XXXXXXXX` is the complete old
  checkpoint: `interrupted_save(target)` finds it, the loader reads it, and the next save
  renames it back first. So a reader sees the complete old or the complete new checkpoint,
  never a mix (as the old weights under a new config.json would be).
- The target holds a checkpoint but cannot be renamed (a mount point, an unwritable parent,
  the working directory): the new files are written into `.mambakit.tmp-XXXXXXXX` inside it,
  then the marker is removed, the old checkpoint's files are replaced, and the marker comes
  last. A kill during those renames leaves a directory without config.json, which fails to
  load loudly; never a mix.

Every save first removes what killed saves of the same target left (`.NAME.tmp-*`,
`.NAME.old-*`, temporary files inside it). One process writes a given target at a time."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

_SUFFIX = r"[a-z0-9_]{8}"  # tempfile's random names
_INNER_STAGING = ".mambakit.tmp-"


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Calls write(tmp_path) for a temporary file next to `path`, then renames it over `path`,
    so `path` is either the old file or the complete new one, never a partial one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it owner-only; a checkpoint is shared like any file
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """`obj` as indented JSON with sorted keys, written atomically (see atomic_write)."""
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    atomic_write(path, write)


# ---- whole directories -----------------------------------------------------------------------

def write_directory(target: str | Path, write: Callable[[Path], None], owned: Callable[[Path], set[str]],
                    marker: str = "config.json") -> None:
    """Writes a directory of files as a whole (see the module's docstring for what a kill
    leaves). write(directory) writes the new files into the directory it is given, `marker`
    last. owned(directory) names the files that belong to a checkpoint there (present or not),
    which the new ones replace; every other entry of an existing target (a tokenizer, a
    README, a subdirectory) is kept. A symbolic link to a directory is followed."""
    target = Path(os.path.realpath(os.path.abspath(target)))
    target.parent.mkdir(parents=True, exist_ok=True)
    finish_interrupted(target)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file, not a checkpoint directory")
    target.mkdir(exist_ok=True)
    old_files = owned(target) | {marker}
    _unlink(target, _temporary_files(target, old_files))
    if not (target / marker).exists():  # no checkpoint to keep: write in place, the marker last
        _unlink(target, old_files)
        try:
            write(target)
        except BaseException:
            _unlink(target, old_files)  # no half-written checkpoint either
            raise
        _fsync_directory(target)
    elif _can_rename(target):
        _write_and_swap(target, write, old_files, marker)
    else:
        staging = Path(tempfile.mkdtemp(prefix=_INNER_STAGING, dir=target))
        try:
            write(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _switch_in_place(target, staging, set(os.listdir(staging)), old_files, marker)


def interrupted_save(target: str | Path) -> Path | None:
    """When a save was killed between its two renames (the target missing), the old checkpoint
    it left, `.NAME.old-XXXXXXXX`; else None."""
    target = Path(os.path.realpath(os.path.abspath(target)))
    try:
        if os.path.lexists(target) or not target.parent.is_dir():
            return None
        olds = [p for p in _siblings(target, "old") if p.is_dir() and not p.is_symlink()]
        return max(olds, key=lambda p: p.stat().st_mtime_ns) if olds else None
    except OSError:  # an unreadable parent: nothing to find there
        return None


def finish_interrupted(target: Path) -> None:
    """Undoes what killed saves of `target` left around it: a target renamed away is renamed
    back, and the temporary siblings are removed."""
    old = interrupted_save(target)
    if old is not None:
        os.rename(old, target)
    for leftover in _siblings(target, "tmp") + _siblings(target, "old"):
        _remove_path(leftover)
    if target.is_dir() and not target.is_symlink():
        for name in os.listdir(target):
            if name.startswith(_INNER_STAGING):
                _remove_path(target / name)


def _siblings(target: Path, kind: str) -> list[Path]:
    pattern = re.compile(re.escape(f".{target.name}.{kind}-") + _SUFFIX)
    return [target.parent / name for name in os.listdir(target.parent) if pattern.fullmatch(name)]


def _temporary_files(directory: Path, names: set[str]) -> set[str]:
    """The temporary files that killed atomic_writes of `names` left in directory (`.NAME.XXXXXXXX.tmp`)."""
    pattern = re.compile("(?:" + "|".join(re.escape(f".{name}.") for name in names) + ")" + _SUFFIX + r"\.tmp")
    return {name for name in os.listdir(directory) if pattern.fullmatch(name)}


def _can_rename(target: Path) -> bool:
    """Whether the target directory can be switched by renames: not a mount point, in a
    writable parent, and not the working directory (or above it), which would be left behind."""
    cwd = os.path.realpath(os.getcwd())
    return (not os.path.ismount(target) and os.access(target.parent, os.W_OK | os.X_OK)
            and os.path.commonpath([cwd, str(target)]) != str(target))


def _write_and_swap(target: Path, write: Callable[[Path], None], old_files: set[str], marker: str) -> None:
    """Writes into a temporary sibling, carries the target's other entries over, and switches
    the two by renames."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = target.parent / f".{target.name}.old-{staging.name[-8:]}"
    try:
        os.chmod(staging, stat.S_IMODE(target.stat().st_mode))  # mkdtemp made it owner-only
        write(staging)
        written = set(os.listdir(staging))
        _carry(target, staging, old_files)
        _fsync_directory(staging)
        try:
            os.rename(target, old)
        except OSError:  # busy, or not allowed: switch the files instead
            _switch_in_place(target, staging, written, old_files, marker)
            return
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(old, target)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_directory(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def _switch_in_place(target: Path, staging: Path, names: set[str], old_files: set[str], marker: str) -> None:
    """Moves the files `names` from staging into target: the marker is removed first and put
    back last, so that while the old files are replaced the directory is no checkpoint at
    all, rather than a mix of two."""
    try:
        _unlink(target, {marker})
        _unlink(target, old_files - names)
        for name in sorted(names - {marker}) + sorted(names & {marker}):
            os.replace(staging / name, target / name)
        _fsync_directory(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _carry(old: Path, new: Path, old_files: set[str]) -> None:
    """Hard-links (or copies) into `new` every entry of `old` but the old checkpoint's files and
    the names written anew: what stays, such as a tokenizer, is there from the first instant."""
    for entry in os.scandir(old):
        if os.path.lexists(new / entry.name) or (entry.name in old_files and not entry.is_dir(follow_symlinks=False)):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry.path, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        elif entry.is_file():
            _link_or_copy(entry.path, new / entry.name)


def _link_or_copy(src: str, dst: str | Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _unlink(directory: Path, names: set[str]) -> None:
    """Removes the files (or links) `names` from directory; a directory of such a name is no
    file of a checkpoint, and stays."""
    for name in names:
        path = directory / name
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _fsync_directory(path: Path) -> None:
    """Makes a directory's entries (the renames in it) durable; a no-op where the platform
    cannot open a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
