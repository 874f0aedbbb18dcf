"""The checkpoints of a `mambakit train` run.

out_dir/ckpt-<step>/ holds the model (safetensors, loadable by `mambakit generate --model
out_dir/ckpt-<step>` or `--model out_dir`) and trainer.pt (optimizer, step, RNG states). Each
is written to a temporary directory and renamed, then out_dir/latest is switched atomically,
so a crash leaves the previous checkpoint intact. The trainer writes them every save_every
steps, at the end and on SIGINT/SIGTERM. `--resume` continues exactly: the batch of step k
depends only on (seed, k)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import atomic_write, load_pretrained
from ..models.lm import MambaLM
from .train_config import TrainConfig


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint that out_dir/latest points to, or None when the run has none yet."""
    pointer = out_dir / "latest"
    if not pointer.is_file():
        return None
    path = out_dir / pointer.read_text().strip()
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


def save_checkpoint(out_dir: Path, model: MambaLM, optimizer, step: int, cfg: TrainConfig,
                    states: tuple[dict, dict] | None = None) -> Path:
    """Writes ckpt-<step> (through a temporary directory and a rename) and switches `latest`."""
    model_sd, optim_sd = states if states is not None else full_state(model, optimizer)
    final = out_dir / f"ckpt-{step:07d}"
    tmp = out_dir / f".tmp-ckpt-{step:07d}-{os.getpid()}"
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
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write(out_dir / "latest", lambda p: Path(p).write_text(final.name + "\n"))
    for old in out_dir.glob("ckpt-*"):  # keep the newest checkpoint only
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: MambaLM, optimizer) -> int:
    """Loads a checkpoint into a model that may be sharded (FSDP2) and its optimizer; returns its step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    try:
        loaded = load_pretrained(MambaLM, path, device="cpu")
        state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 (any corruption is reported the same way)
        raise ValueError(f"the checkpoint {path} cannot be read ({type(err).__name__}: {err})") from None
    if loaded.config != model.config:
        raise ValueError(f"the checkpoint {path} holds a model with config {loaded.config}, not {model.config}")
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, loaded.state_dict(), options=options)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)
    torch.set_rng_state(state["rng_cpu"])
    if state.get("rng_cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return int(state["step"])
