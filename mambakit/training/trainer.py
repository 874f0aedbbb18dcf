"""`mambakit train`: a single-process trainer for MambaLM (CPU or one GPU), or one process per
device under torchrun (distributed.py).

AdamW (fused on CUDA) with no weight decay on norms, biases, A_log, D and the dt bias; linear
warmup then cosine decay (optim.py); gradient clipping and accumulation; bf16 autocast on CUDA;
optional activation checkpointing per block and torch.compile. Periodic evaluation gives the
validation loss and bits per token (bits per byte for the byte tokenizer). A tqdm bar shows the
loss, tokens/s and the ETA; metrics go to metrics.jsonl and the curves, in bits per token as the
summary, to loss.png (metrics.py). A warmup longer than the run is warned about.

Long sequences: with --chunk-len, each sequence runs chunk by chunk with every layer's conv and
SSM states carried across the boundaries (with their gradients) and each chunk's activations
recomputed in the backward pass (MambaLM.chunked_loss): the full sequence's gradient in memory
that does not grow with the length.

Checkpoints (checkpoints.py) are written every save_every steps, at the end and on SIGINT/SIGTERM
(signals.py: the summary's exit_status is then 130 / 143; a second signal aborts without
saving); `--resume` continues exactly: the batch of step k depends only on (seed, k), and a
resume with other settings is refused (TrainConfig.changes_from) unless --allow-config-change.
A run on a token file of `mambakit prepare` stores the tokenizer beside it (data.tokenizer_sidecar)
in every checkpoint and in out_dir, so that `mambakit generate --model out_dir` decodes with it.

A step whose loss or gradient norm is not finite stops the run with a ValueError (after saving
the last finite state), or with --skip-nonfinite is skipped (no update; its metrics row says
"skipped"). A state that is not finite is never saved, so `latest` always holds a finite one."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from ..checkpoint import atomic_write
from ..config import PRESETS, MambaConfig
from ..models.lm import MambaLM
from ..tokenizer import has_tokenizer, tokenizer_files, write_tokenizer_files
from .checkpoints import (first_nonfinite, full_state, latest_checkpoint, load_checkpoint, read_trainer_state,
                          remove_stale_temporaries, save_checkpoint)
from .data import BYTE_VOCAB, Corpus, batch_at, load_corpus
from .devices import resolve_device
from .distributed import DistEnv, any_rank, barrier, init_distributed, mean_over_ranks, rows_of, shutdown
from .metrics import plot_losses, read_metrics
from .optim import lr_at, param_groups, warmup_warning
from .signals import StopFlag
from .train_config import TrainConfig


def _device(cfg: TrainConfig) -> torch.device:
    """The device of --device (checked by TrainConfig.check), or a ValueError when it is not here."""
    return resolve_device(cfg.device)


def model_config_for(cfg: TrainConfig, corpus: Corpus, overrides: dict) -> MambaConfig:
    """The run's model: the preset with the model flags' overrides. Without --vocab-size, the
    vocabulary grows to the corpus' only up to the byte tokenizer's (bytes + EOS): a token file
    whose largest id lies beyond the preset's vocabulary is a ValueError naming the file and
    the id (one stray id would otherwise grow the embedding and the head to fit it)."""
    base = dataclasses.replace(PRESETS[cfg.preset])
    largest = corpus.vocab_size - 1
    if "vocab_size" not in overrides and base.vocab_size < corpus.vocab_size:
        if corpus.vocab_size > max(base.vocab_size, BYTE_VOCAB):
            raise ValueError(f"--data {corpus.name}: its largest token id is {largest}, beyond the {cfg.preset} "
                             f"preset's vocabulary of {base.vocab_size}; pass --vocab-size {largest + 1} (or more) "
                             f"if the tokenizer has that many tokens")
        base = dataclasses.replace(base, vocab_size=corpus.vocab_size)  # bytes + EOS
    config = dataclasses.replace(base, **overrides)
    if config.vocab_size < corpus.vocab_size:
        raise ValueError(f"--vocab-size {config.vocab_size} does not cover the largest token id {largest} "
                         f"of --data {corpus.name}")
    return config


@torch.no_grad()
def evaluate(model: MambaLM, corpus: Corpus, cfg: TrainConfig, device, autocast) -> float:
    """The mean loss over cfg.eval_batches fixed validation batches."""
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
    warning = warmup_warning(cfg)
    if warning is not None and env.is_main:
        print(warning, file=sys.stderr)
    try:
        return _train(cfg, overrides, device, env, progress and env.is_main)
    finally:
        shutdown(env)


def _train(cfg: TrainConfig, overrides: dict, device: torch.device, env: DistEnv, progress: bool) -> dict:
    out_dir = Path(cfg.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a directory")
    existing = _existing_checkpoint(out_dir, cfg)
    if existing is not None and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"{out_dir} already holds a checkpoint ({existing.name}); pass --resume to continue it or "
                         f"--overwrite to start over")
    if cfg.resume and existing is None:
        raise ValueError(f"--resume: {out_dir} holds no checkpoint")
    stored = read_trainer_state(existing) if cfg.resume else None
    corpus = load_corpus(cfg.data, max_bytes=cfg.max_corpus_bytes)
    if stored is not None:
        _check_resume(cfg, stored, existing, env)
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
    start = load_checkpoint(existing, model, optimizer, stored) if cfg.resume else 0
    metrics_path = out_dir / "metrics.jsonl"
    rows = read_metrics(metrics_path, start) if cfg.resume else []
    tokenizer = _run_tokenizer(corpus, existing if cfg.resume else None)
    if env.is_main:  # only rank 0 writes
        _prepare_out_dir(out_dir, cfg)
        write_tokenizer_files(tokenizer, out_dir)  # the run's copy (each checkpoint holds one too)
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
               "params": sum(p.numel() for p in model.parameters()), "max_token_id": corpus.vocab_size - 1,
               "tokenizer": sorted(tokenizer)}
    bar = _progress(start, cfg.max_steps, progress)
    model.train()
    last_val, last_saved, failure, stopped_by, exit_status = None, start, None, None, None
    log = open(metrics_path, "a") if env.is_main else contextlib.nullcontext()
    with StopFlag() as stop, log, contextlib.closing(bar):
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
            grad_norm = _gradient_norm(model, cfg.grad_clip)
            finite = not any_rank(not (math.isfinite(loss_sum) and math.isfinite(grad_norm)), env, device)
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if not finite and not cfg.skip_nonfinite:
                failure = (f"step {step + 1}: the loss is {loss_sum:.4g} and the gradient norm {grad_norm:.4g}, "
                           f"not finite; training stopped (--skip-nonfinite skips such steps)")
            else:
                step += 1
                dt = time.perf_counter() - t0
                row = {"step": step, "loss": loss_sum, "lr": lr, "tokens_per_s": tokens_per_step / dt,
                       "grad_norm": grad_norm}
                if not finite:  # skipped: no update, and no loss to plot
                    row = {"step": step, "lr": lr, "skipped": f"loss {loss_sum:.4g}, gradient norm {grad_norm:.4g}"}
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
                bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_step / dt:.0f}",
                                **({"val_bpt": f"{row['val_bits_per_token']:.3f}"} if "val_loss" in row else {}))
            time_box = cfg.stop_after is not None and step - start >= cfg.stop_after
            stop.requested = any_rank(stop.requested, env, device)  # all ranks stop at the same step
            periodic = failure is None and (step % cfg.save_every == 0 or step == cfg.max_steps)
            if (periodic or failure or stop.requested or time_box) and step > last_saved:
                _save(out_dir, model, optimizer, step, cfg, env, device, tokenizer)
                last_saved = step
            if failure is not None or stop.requested or time_box:
                if failure is None:
                    stopped_by = _signal_name(stop.signum) if stop.requested else "--stop-after"
                    exit_status = stop.exit_status if stop.requested else None
                    bar.write(f"[mambakit] stopped by {stopped_by} at step {step}; checkpoint saved, --resume "
                              f"continues it", file=sys.stderr)
                break
    bar.close()
    if env.is_main:
        plot_losses(rows, out_dir / "loss.png")
    if failure is not None:
        kept = f"the checkpoint of step {last_saved} in {out_dir} is kept" if last_saved else "nothing was saved"
        raise ValueError(f"{failure}; {kept}")
    summary.update(step=step, val_loss=last_val, stopped_by=stopped_by, exit_status=exit_status,
                   val_bits_per_token=None if last_val is None else last_val / math.log(2))
    return summary


def _check_resume(cfg: TrainConfig, stored: dict, checkpoint: Path, env: DistEnv) -> None:
    """A resume continues the stored run: other settings are a ValueError listing them, or,
    with --allow-config-change, a listed warning (TrainConfig.changes_from says which count)."""
    changes = cfg.changes_from(stored["train_config"])
    if changes and not cfg.allow_config_change:
        raise ValueError(f"--resume: {checkpoint} was trained with other settings ({', '.join(changes)}); "
                         f"pass the same ones to continue that run, or --allow-config-change")
    if changes and env.is_main:
        print(f"[mambakit] --resume with changed settings: {', '.join(changes)}", file=sys.stderr)
    if stored["step"] >= cfg.max_steps:
        raise ValueError(f"--resume: {checkpoint} is at step {stored['step']} and --max-steps is {cfg.max_steps}; "
                         f"raise --max-steps to train further")


def _existing_checkpoint(out_dir: Path, cfg: TrainConfig) -> Path | None:
    """The checkpoint out_dir/latest names; a broken `latest` is a ValueError, except under
    --overwrite, which removes it."""
    if not out_dir.exists():
        return None
    try:
        return latest_checkpoint(out_dir)
    except ValueError:
        if cfg.overwrite:
            return None
        raise


def _prepare_out_dir(out_dir: Path, cfg: TrainConfig) -> None:
    """Creates out_dir, removes what killed runs left there, and with --overwrite the old run's
    checkpoints."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"--out-dir {out_dir} cannot be created ({err.strerror or err})") from None
    remove_stale_temporaries(out_dir)
    if cfg.overwrite:
        for old in out_dir.glob("ckpt-*"):
            shutil.rmtree(old, ignore_errors=True)
        (out_dir / "latest").unlink(missing_ok=True)


def _gradient_norm(model: MambaLM, max_norm: float) -> float:
    """The gradients' total norm (before clipping), clipping them to max_norm when it is > 0."""
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # a sharded (FSDP2) norm: every rank takes the whole one
        norm = norm.full_tensor()
    return float(norm)


def _run_tokenizer(corpus: Corpus, resumed: Path | None) -> dict[str, bytes]:
    """The files of the tokenizer that made the corpus (a token file's sidecar), else those of
    the checkpoint being resumed; none for a byte-level run. Read once: every checkpoint gets
    the same ones, whatever happens to the files meanwhile."""
    if corpus.tokenizer_dir is not None:
        return tokenizer_files(corpus.tokenizer_dir)
    if resumed is not None and has_tokenizer(resumed):
        return tokenizer_files(resumed)
    return {}


def _save(out_dir: Path, model: MambaLM, optimizer, step: int, cfg: TrainConfig, env: DistEnv, device,
          tokenizer: dict[str, bytes]) -> None:
    """Saves a checkpoint (with the run's tokenizer files) on rank 0, unless some rank's
    parameters or optimizer state are not finite: then every rank raises the same ValueError
    and `latest` keeps the last good one."""
    bad = _local_nonfinite(model, optimizer)
    if any_rank(bad is not None, env, device):
        raise ValueError(f"step {step}: {bad or 'a parameter of another rank'} is not finite; no checkpoint "
                         f"written, {out_dir / 'latest'} keeps the last good one")
    states = full_state(model, optimizer) if cfg.fsdp else None  # collective when sharded
    if env.is_main:
        save_checkpoint(out_dir, model, optimizer, step, cfg, states, tokenizer)
    barrier(env)


def _local_nonfinite(model: MambaLM, optimizer) -> str | None:
    """The first parameter (or its optimizer state) of this rank that holds a NaN or an infinity."""
    state = {}
    for name, p in model.named_parameters():
        state[name], state[f"{name} (optimizer)"] = p, optimizer.state.get(p, {})
    return first_nonfinite(state)


def _signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum is not None else "a signal"


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
