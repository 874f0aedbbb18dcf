"""`mambakit train`: a single-process trainer for MambaLM (CPU or one GPU).

AdamW (fused on CUDA) with no weight decay on norms, biases, A_log, D and the dt bias; linear
warmup then cosine decay; gradient clipping and accumulation; bf16 autocast on CUDA; optional
activation checkpointing per block and torch.compile. Periodic evaluation gives the validation
loss and bits per token (bits per byte for the byte tokenizer). A tqdm bar shows the loss,
tokens/s and the ETA; metrics go to metrics.jsonl and the curves to loss.png.

Long sequences: with --chunk-len, each sequence runs chunk by chunk with every layer's conv and
SSM states carried across the boundaries (with their gradients) and each chunk's activations
recomputed in the backward pass (MambaLM.chunked_loss): the full sequence's gradient in memory
that does not grow with the length.

Checkpoints: out_dir/ckpt-<step>/ holds the model (safetensors, loadable by `mambakit generate
--model out_dir/ckpt-<step>` or `--model out_dir`) and trainer.pt (optimizer, step, RNG
states). Each is written to a temporary directory and renamed, then out_dir/latest is switched
atomically, so a crash leaves the previous checkpoint intact. They are written every
save_every steps, at the end and on SIGINT/SIGTERM. `--resume` continues exactly: the batch of
step k depends only on (seed, k)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import atomic_write
from .config import PRESETS, MambaConfig
from .data import Corpus, batch_at, load_corpus
from .distributed import DistEnv, any_rank, barrier, init_distributed, mean_over_ranks, rows_of, shutdown
from .models.lm import MambaLM


@dataclass
class TrainConfig:
    preset: str = "tiny"
    data: str | None = None  # None: the Python standard library's source files
    out_dir: str = "runs/mambakit"
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 500
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    save_every: int = 100
    seed: int = 0
    device: str = "auto"  # "auto": cuda if available, else cpu
    compile: bool = False
    activation_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    max_corpus_bytes: int | None = None
    chunk_len: int | None = None  # run each sequence in chunks, states carried (exact gradient, flat memory)
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps of this invocation
    resume: bool = False
    overwrite: bool = False

    def check(self) -> None:
        if self.chunk_len is not None and self.chunk_len < 1:
            raise ValueError(f"--chunk-len must be >= 1, got {self.chunk_len}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"--stop-after must be >= 1, got {self.stop_after}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "save_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be an int >= 1, got {v!r}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a finite number > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("--warmup-steps, --grad-clip and --weight-decay must be >= 0")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def param_groups(model: MambaLM, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, conv, embedding) only: none on norms, biases,
    A_log, D and the dt bias (the official recipe marks these `_no_weight_decay`)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or getattr(p, "_no_weight_decay", False) or name.endswith("A_log"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    return torch.device(cfg.device)


class _StopFlag:
    """SIGINT / SIGTERM ask the loop to save a checkpoint and stop after the current step."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                pass
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ---- checkpoints ------------------------------------------------------------------------------

def latest_checkpoint(out_dir: Path) -> Path | None:
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
    """Loads a checkpoint into a model that may be sharded (FSDP2) and its optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    from .checkpoint import load_pretrained
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


# ---- metrics ----------------------------------------------------------------------------------

def _read_metrics(path: Path, up_to_step: int) -> list[dict]:
    """Metrics of a run being resumed, without the steps after its checkpoint."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= up_to_step]


def plot_losses(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.7, label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the loop ---------------------------------------------------------------------------------

def model_config_for(cfg: TrainConfig, corpus: Corpus, overrides: dict) -> MambaConfig:
    base = dataclasses.replace(PRESETS[cfg.preset])
    if "vocab_size" not in overrides and base.vocab_size < corpus.vocab_size:
        base = dataclasses.replace(base, vocab_size=corpus.vocab_size)  # e.g. bytes + EOS
    config = dataclasses.replace(base, **overrides)
    if config.vocab_size < corpus.vocab_size:
        raise ValueError(f"--vocab-size {config.vocab_size} is smaller than the corpus' {corpus.vocab_size} token ids")
    return config


@torch.no_grad()
def evaluate(model: MambaLM, corpus: Corpus, cfg: TrainConfig, device, autocast) -> float:
    model.eval()
    losses = []
    for i in range(cfg.eval_batches):
        x, y = batch_at(corpus.val, i, cfg.batch_size, cfg.seq_len, seed=cfg.seed + 7919, device=device)
        with autocast():
            chunk = cfg.chunk_len if cfg.chunk_len is not None and cfg.chunk_len < cfg.seq_len else None
            losses.append(model(x, targets=y, chunk_len=chunk).item())  # chunked: long sequences fit
    model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig, model_overrides: dict | None = None, progress: bool = True) -> dict:
    """Runs (or resumes) training; returns a summary with the last validation loss."""
    cfg.check()
    overrides = dict(model_overrides or {})
    device = _device(cfg)
    env = init_distributed(device.type)
    if env.active:
        if device.type == "cuda":
            device = torch.device("cuda", env.local_rank)
        if cfg.batch_size % env.world:
            raise ValueError(f"--batch-size {cfg.batch_size} (the global batch) must divide among {env.world} ranks")
    try:
        return _train(cfg, overrides, device, env, progress and env.is_main)
    finally:
        shutdown(env)


def _train(cfg: TrainConfig, overrides: dict, device: torch.device, env: DistEnv, progress: bool) -> dict:
    out_dir = Path(cfg.out_dir)
    existing = latest_checkpoint(out_dir) if out_dir.exists() else None
    if existing is not None and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{out_dir} already holds a checkpoint ({existing.name}); pass --resume to continue it or "
                         f"--overwrite to start over")
    if cfg.resume and existing is None:
        raise ValueError(f"--resume: {out_dir} holds no checkpoint")
    corpus = load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)
    for split, tokens in (("train", corpus.train), ("validation", corpus.val)):
        if len(tokens) < cfg.seq_len + 1:
            raise ValueError(f"--seq-len {cfg.seq_len} is longer than the {split} split ({len(tokens)} tokens)")
    config = model_config_for(cfg, corpus, overrides)
    torch.manual_seed(cfg.seed)
    model = MambaLM(config, device=device)
    if cfg.fsdp:
        if not env.active:
            raise ValueError("--fsdp shards the model across ranks: launch with torchrun --nproc_per_node=N")
        from torch.distributed.fsdp import fully_shard
        for block in model.backbone.layers:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  fused=device.type == "cuda")
    start = load_checkpoint(existing, model, optimizer) if cfg.resume else 0
    metrics_path = out_dir / "metrics.jsonl"
    rows = _read_metrics(metrics_path, start) if cfg.resume else []
    if env.is_main:  # only rank 0 writes
        out_dir.mkdir(parents=True, exist_ok=True)
        if cfg.overwrite and existing is not None:
            for old in out_dir.glob("ckpt-*"):
                shutil.rmtree(old, ignore_errors=True)
            (out_dir / "latest").unlink(missing_ok=True)
        atomic_write(metrics_path, lambda p: Path(p).write_text("".join(json.dumps(r) + "\n" for r in rows)))
        atomic_write(out_dir / "train_config.json",
                     lambda p: Path(p).write_text(json.dumps({"train": dataclasses.asdict(cfg),
                                                              "model": dataclasses.asdict(config)}, indent=2)))
    barrier(env)
    if cfg.activation_checkpointing:
        _checkpoint_blocks(model)
    forward = model
    if env.active and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel
        forward = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward = torch.compile(forward)
    use_bf16 = device.type == "cuda"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    chunked = cfg.chunk_len is not None and cfg.chunk_len < cfg.seq_len
    summary = {"corpus": corpus.name, "unigram_bits": corpus.unigram_bits_per_token(),
               "params": sum(p.numel() for p in model.parameters())}
    bar = _progress(start, cfg.max_steps, progress)
    model.train()
    last_val = None
    log = open(metrics_path, "a") if env.is_main else contextlib.nullcontext()
    with _StopFlag() as stop, log:
        step = start
        while step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                x, y = batch_at(corpus.train, step * cfg.grad_accum + micro, cfg.batch_size, cfg.seq_len, cfg.seed,
                                device)
                x, y = rows_of(x, env), rows_of(y, env)  # this rank's rows of the global batch
                sync = contextlib.nullcontext()
                if env.active and micro < cfg.grad_accum - 1:
                    sync = forward.no_sync() if hasattr(forward, "no_sync") else sync  # reduce once per step
                with sync:
                    with autocast():
                        loss = forward(x, targets=y, chunk_len=cfg.chunk_len if chunked else None) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.item()
            loss_sum = mean_over_ranks(loss_sum, env, device)
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip else None
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": tokens_per_step / dt}
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                if env.is_main or cfg.fsdp:  # a sharded model evaluates on every rank together
                    last_val = evaluate(model, corpus, cfg, device, autocast)
                    row.update(val_loss=last_val, val_bits_per_token=last_val / math.log(2))
                barrier(env)
            if env.is_main:
                log.write(json.dumps(row) + "\n")
                log.flush()
            rows.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{row['tokens_per_s']:.0f}",
                            **({"val_bpt": f"{row['val_bits_per_token']:.3f}"} if "val_loss" in row else {}))
            time_box = cfg.stop_after is not None and step - start >= cfg.stop_after
            stop.requested = any_rank(stop.requested, env, device)  # all ranks stop at the same step
            if step % cfg.save_every == 0 or step == cfg.max_steps or stop.requested or time_box:
                states = full_state(model, optimizer) if cfg.fsdp else None  # collective when sharded
                if env.is_main:
                    save_checkpoint(out_dir, model, optimizer, step, cfg, states)
                barrier(env)
            if stop.requested or time_box:
                why = "a signal" if stop.requested else "--stop-after"
                bar.write(f"[mambakit] stopped by {why} at step {step}; checkpoint saved, --resume continues it",
                          file=sys.stderr)
                break
    bar.close()
    if env.is_main:
        plot_losses(rows, out_dir / "loss.png")
    summary.update(step=step, val_loss=last_val,
                   val_bits_per_token=None if last_val is None else last_val / math.log(2))
    return summary


def _checkpoint_blocks(model: MambaLM) -> None:
    """Recompute each block's activations in the backward pass instead of storing them."""
    from torch.utils.checkpoint import checkpoint
    for block in model.backbone.layers:
        forward = block.forward

        def wrapped(hidden, residual=None, cache=None, cu_seqlens=None, _f=forward):
            if cache is not None or not torch.is_grad_enabled():
                return _f(hidden, residual, cache, cu_seqlens)
            return checkpoint(_f, hidden, residual, None, cu_seqlens, use_reentrant=False)
        block.forward = wrapped


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True)
