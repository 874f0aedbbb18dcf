"""The checkpoints of a `mambakit train` run.

out_dir/ckpt-<step>/ holds the model (safetensors, loadable by `mambakit generate --model
out_dir/ckpt-<step>` or `--model out_dir`), trainer.pt (optimizer, step, RNG states, the
TrainConfig as a dict) and, for a run on a token file of `mambakit prepare`, its tokenizer's
files (which `generate` decodes with). Each is written to a temporary directory and renamed, then
out_dir/latest is switched atomically, so a crash leaves the previous checkpoint intact; a
state that is not finite is never written. The trainer writes them every save_every steps, at
the end and on SIGINT/SIGTERM. `--resume` continues exactly: the batch of step k depends only
on (seed, k).

Reading is safe on files from elsewhere: `latest` must name a ckpt-<digits> directory of the
run, and trainer.pt is read with torch.load(weights_only=True), which builds tensors and plain
containers only and runs no code."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import shutil
from pathlib import Path

import torch

from ..checkpoint import atomic_write, load_pretrained
from ..models.lm import MambaLM
from .train_config import TrainConfig

CHECKPOINT_NAME = re.compile(r"ckpt-\d+")
TMP_PREFIX = ".tmp-ckpt-"
# what trainer.pt must hold, and the type of each
TRAINER_STATE = {"step": int, "optimizer": dict, "train_config": dict, "rng_cpu": torch.Tensor}


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint that out_dir/latest points to, or None when the run has none yet. A
    `latest` naming anything but a ckpt-<digits> directory of out_dir is a ValueError."""
    pointer = Path(out_dir) / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        return None
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{pointer} cannot be read ({type(err).__name__}: {err})") from None
    if not CHECKPOINT_NAME.fullmatch(name):
        raise ValueError(f"{pointer} must name a ckpt-<step> directory of {out_dir}, got {name[:80]!r}")
    path = Path(out_dir) / name
    if path.is_symlink():
        raise ValueError(f"{pointer} points to {path}, a symbolic link; a checkpoint must be a directory of the run")
    if not (path / "trainer.pt").is_file():
        raise ValueError(f"{pointer} points to {path}, which holds no complete checkpoint")
    return path


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: MambaLM, optimizer) -> tuple[dict, dict]:
    """The whole model and optimizer state, unsharded, on CPU, keyed by parameter name: the
    same format for one process, DDP and FSDP2 (every rank must call it under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return (get_model_state_dict(model, options=_full_options()),
            get_optimizer_state_dict(model, optimizer, options=_full_options()))


def first_nonfinite(state, prefix: str = "") -> str | None:
    """The name of the first floating-point tensor in a nested state (dicts, lists) holding a
    NaN or an infinity, or None when all are finite. An FSDP2 shard is checked on this rank."""
    if isinstance(state, torch.Tensor):
        state = state.to_local() if hasattr(state, "to_local") else state
        return prefix if state.is_floating_point() and not torch.isfinite(state).all() else None
    if isinstance(state, dict):
        items = state.items()
    elif isinstance(state, (list, tuple)):
        items = enumerate(state)
    else:
        return None
    for key, value in items:
        bad = first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if bad is not None:
            return bad
    return None


def save_checkpoint(out_dir: Path, model: MambaLM, optimizer, step: int, cfg: TrainConfig,
                    states: tuple[dict, dict] | None = None, tokenizer: dict[str, bytes] | None = None) -> Path:
    """Writes ckpt-<step> (through a temporary directory and a rename), with the tokenizer's
    files (tokenizer.tokenizer_files) when given, switches `latest`, then removes the older
    checkpoints. A model or optimizer state that is not finite is a ValueError, and nothing is
    written or removed."""
    model_sd, optim_sd = states if states is not None else full_state(model, optimizer)
    bad = first_nonfinite(model_sd) or first_nonfinite(optim_sd, "optimizer")
    if bad is not None:
        raise ValueError(f"step {step}: {bad} is not finite; no checkpoint written, "
                         f"{Path(out_dir) / 'latest'} keeps the last good one")
    final = out_dir / f"ckpt-{step:07d}"
    if final.exists() and _pointed_to(out_dir) == final.name:
        raise ValueError(f"{final} is the run's latest checkpoint already; it is not written again")
    tmp = out_dir / f"{TMP_PREFIX}{step:07d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    plain = MambaLM(model.config, device="meta")  # an unsharded copy to write in the usual format
    plain.load_state_dict(model_sd, assign=True)
    plain.save_pretrained(tmp)
    state = {"step": step, "optimizer": optim_sd, "train_config": dataclasses.asdict(cfg),
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(state, tmp / "trainer.pt")
    for name, data in (tokenizer or {}).items():
        (tmp / name).write_bytes(data)
    _fsync_files(tmp)
    if final.exists():  # a leftover of a run that stopped before switching `latest` to it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(out_dir / "latest", lambda p: Path(p).write_text(final.name + "\n"))
    for old in out_dir.glob("ckpt-*"):  # keep the newest checkpoint only
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _pointed_to(out_dir: Path) -> str | None:
    try:
        return (Path(out_dir) / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _fsync_files(directory: Path) -> None:
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def remove_stale_temporaries(out_dir: Path) -> None:
    """Removes the temporary checkpoint directories that killed runs left in out_dir (those of
    processes that no longer run)."""
    for tmp in Path(out_dir).glob(TMP_PREFIX + "*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if tmp.is_dir() and not tmp.is_symlink() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process writes no checkpoint yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def read_trainer_state(path: Path) -> dict:
    """trainer.pt of the checkpoint directory `path`, read without running code (weights_only),
    with its keys checked. Anything else is a ValueError naming the file."""
    file = Path(path) / "trainer.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:  # a crafted file: it would build or call something else than data
            raise ValueError(f"{file} is not a trainer state that loads safely: it would call {found.group(1)}, "
                             f"which torch.load(weights_only=True) refuses") from None
        raise ValueError(f"{file} cannot be read (UnpicklingError: not a torch file of tensors and plain data)") \
            from None
    except Exception as err:  # noqa: BLE001 (any corruption is reported the same way)
        raise ValueError(f"{file} cannot be read ({type(err).__name__}: {_first_line(err)})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file} is not a trainer state (a {type(state).__name__}, not a dict)")
    missing = [key for key in TRAINER_STATE if key not in state]
    if missing:
        raise ValueError(f"{file} is not a complete trainer state: it lacks {', '.join(missing)}")
    for key, kind in TRAINER_STATE.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise ValueError(f"{file}: its {key} is a {type(state[key]).__name__}, not a {kind.__name__}")
    if state["step"] < 0 or not {"state", "param_groups"} <= set(state["optimizer"]):
        raise ValueError(f"{file}: its step or optimizer state is malformed")
    return state


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:300]


def load_checkpoint(path: Path, model: MambaLM, optimizer, state: dict | None = None) -> int:
    """Loads a checkpoint into a model that may be sharded (FSDP2) and its optimizer; returns its
    step. `state` is its trainer.pt when already read (read_trainer_state)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    state = read_trainer_state(path) if state is None else state
    try:
        loaded = load_pretrained(MambaLM, path, device="cpu")
    except Exception as err:  # noqa: BLE001 (any corruption is reported the same way)
        raise ValueError(f"the checkpoint {path} cannot be read ({type(err).__name__}: {_first_line(err)})") from None
    if loaded.config != model.config:
        raise ValueError(f"the checkpoint {path} holds a model with config {loaded.config}, not {model.config}")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, loaded.state_dict(), options=options)
    try:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
        torch.set_rng_state(state["rng_cpu"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise ValueError(f"{path / 'trainer.pt'}: its optimizer or RNG state does not fit this run "
                         f"({type(err).__name__}: {_first_line(err)})") from None
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])
