"""What the Mamba paper's synthetic tasks (selective copying, induction heads) share: seeded
batch streams, the small MambaLM they train, the common flags, and their summary (written and
printed as every task's: report.py).

A batch is a pure function of (seed, split, step): nothing is stored, and a run (or a test)
can regenerate any batch exactly.

A hybrid (--attn-layers 1: that layer is causal attention, the others the --layer mixer) is
the same model with the config's attention fields set (MambaConfig.attn_layer_idx, attn_cfg);
without --attn-cfg its attention is hybrid_attn_cfg(d_model)."""

from __future__ import annotations

import argparse
import contextlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..training.devices import DEVICE_HELP
from ..training.devices import resolve_device as _resolve_device
from .report import announce, plot_curves, print_summary, save_run, task_summary

__all__ = ["ModelArgs", "add_common_flags", "autocast_for", "build_model", "describe_model", "fit_config",
           "hybrid_attn_cfg", "model_args", "plot_curves", "print_summary", "resolve_device", "rng_for", "save_run",
           "start", "summary_base"]

SPLITS = {"train": 0, "eval": 1}
STATE_FILE = "fit_state.pt"  # the resumable training state in --out-dir (--save-every, --resume)
# flags that do not change what a run trains (where, how long this call, what it writes or shows);
# a resume must keep every other flag (the batch size, the lengths, the model ...)
NOT_RUN_SETTINGS = ("time_limit", "resume", "save_every", "out_dir", "progress", "device", "eval_every",
                    "eval_batches", "eval_lengths")


def rng_for(seed: int, step: int, split: str = "train") -> np.random.Generator:
    """The random stream of one batch: independent for every (seed, split, step)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    for name, value in (("seed", seed), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(step)]))


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def to_device(*arrays: np.ndarray, device=None) -> tuple[torch.Tensor, ...]:
    """Integer numpy arrays -> int64 tensors on `device`. To CUDA the copy goes from pinned
    memory without blocking: a copy from pageable memory makes the host wait until the GPU has
    finished the work queued before it, so a training loop could not queue its next step early."""
    cuda = device is not None and torch.device(device).type == "cuda"
    return tuple(torch.from_numpy(a).long().pin_memory().to(device, non_blocking=True) if cuda
                 else torch.from_numpy(a).long().to(device) for a in arrays)


# ---- the model ---------------------------------------------------------------------------

def hybrid_attn_cfg(d_model: int) -> dict:
    """A hybrid's attention when --attn-cfg is not given: 2 heads (of 32 channels at d_model 64),
    the rotary embedding on half of each head's channels (the official hybrids' ratio): the other
    half compares content whatever the distance, which a lookup far beyond the training length
    needs. {"num_heads": 2, "rotary_emb_dim": 16} at d_model 64."""
    return {"num_heads": 2, "rotary_emb_dim": d_model // 4 // 2 * 2}


@dataclass
class ModelArgs:
    layer: str = "mamba"  # "mamba" (S6) | "s4d": the mixer of every layer that is not attention
    gate: bool = True
    d_model: int = 64
    n_layer: int = 2
    d_state: int = 16
    attn_layer_idx: list[int] = field(default_factory=list)  # a hybrid's attention layers (MambaConfig's)
    attn_cfg: dict = field(default_factory=dict)  # their settings (MambaConfig.attn_cfg), {} without any


def build_model(args: ModelArgs, vocab_size: int, device: torch.device, seed: int):
    """A small MambaLM (the registry's "mamba_synthetic": RMSNorm, tied embeddings) with the
    chosen mixer and sizes, and attention at args.attn_layer_idx for a hybrid, seeded."""
    from ..models.registry import create_model
    torch.manual_seed(seed)
    hybrid = {"attn_layer_idx": list(args.attn_layer_idx), "attn_cfg": dict(args.attn_cfg)} if args.attn_layer_idx \
        else {}
    return create_model("mamba_synthetic", d_model=args.d_model, n_layer=args.n_layer, vocab_size=vocab_size,
                        d_state=args.d_state, layer=args.layer, gate=args.gate, pad_vocab_size_multiple=8,
                        **hybrid).to(device)


def describe_model(args: ModelArgs) -> str:
    """"mamba", "s4d (no gate)", "mamba + attention at layer 1": for titles."""
    text = args.layer + ("" if args.gate else " (no gate)")
    if args.attn_layer_idx:
        layers = ", ".join(map(str, args.attn_layer_idx))
        text += f" + attention at layer{'s' if len(args.attn_layer_idx) > 1 else ''} {layers}"
    return text


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resolve_device(name: str) -> torch.device:
    """--device (auto, cpu, cuda, cuda:N, mps: training.devices) as a torch.device."""
    return _resolve_device(name)


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU: a factory of context managers for fit()."""
    if device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return None


def autocast_context(device: torch.device):
    factory = autocast_for(device)
    return factory() if factory is not None else contextlib.nullcontext()


# ---- flags -------------------------------------------------------------------------------

def add_common_flags(parser: argparse.ArgumentParser, *, seq_len: int, max_steps: int, batch_size: int,
                     lr: float, out_dir: str) -> None:
    parser.add_argument("--layer", choices=["mamba", "s4d"], default="mamba", help="the mixer: mamba (S6) or s4d")
    parser.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                        help="the SiLU(z) gate branch of the mixer (--no-gate: the paper's 'without gate')")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-state", type=int, default=16)
    parser.add_argument("--attn-layers", "--attn-layer-idx", dest="attn_layer_idx", default="", metavar="LAYERS",
                        help="a hybrid: these layers are causal attention, indices such as '1' or '0,3' or a pattern "
                             "such as 'ma' (a = attention, m = the --layer mixer); default: none")
    parser.add_argument("--attn-cfg", default="", metavar="JSON",
                        help="the attention layers' settings (the official attn_cfg: num_heads, num_heads_kv, "
                             f"head_dim, rotary_emb_dim, ...; default {json.dumps(hybrid_attn_cfg(64))} at d_model "
                             f"64: 2 heads, rotary on half of each head's channels)")
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--max-steps", type=int, default=max_steps)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of --max-steps")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1,
                        help="the cosine schedule ends at lr x this (1: a constant lr after warmup)")
    parser.add_argument("--eval-every", type=int, default=None, help="default: every 10%% of --max-steps")
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=None,
                        help="stop training early (evaluated) after this many seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--out-dir", default=out_dir, help="model, metrics JSON and plot go here ('' = none)")
    parser.add_argument("--save-every", type=int, default=0,
                        help="write a resumable training state (OUT_DIR/fit_state.pt) every N steps, at the end "
                             "and on a --time-limit stop (default 0: no state)")
    parser.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                        help="continue exactly from OUT_DIR/fit_state.pt (same settings; --time-limit applies anew)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                        help="the start line and a progress bar on stderr")


def model_args(args) -> ModelArgs:
    for name in ("d_model", "n_layer", "d_state", "seq_len", "max_steps", "batch_size", "eval_batches"):
        check_positive_int("--" + name.replace("_", "-"), getattr(args, name))
    if args.layer == "s4d" and args.d_state % 2:
        raise ValueError(f"--d-state must be even for --layer s4d, got {args.d_state}")
    attn_layer_idx, attn_cfg = hybrid_fields(getattr(args, "attn_layer_idx", ""), getattr(args, "attn_cfg", ""),
                                             args.d_model, args.n_layer)
    return ModelArgs(layer=args.layer, gate=args.gate, d_model=args.d_model, n_layer=args.n_layer,
                     d_state=args.d_state, attn_layer_idx=attn_layer_idx, attn_cfg=attn_cfg)


def hybrid_fields(layers_text: str, cfg_text: str, d_model: int, n_layer: int) -> tuple[list[int], dict]:
    """--attn-layers and --attn-cfg as the config's attn_layer_idx and attn_cfg, checked by
    MambaConfig (a ValueError naming the flag and the field): ([], {}) without attention layers."""
    from ..config import MambaConfig
    if not layers_text.strip():
        if cfg_text.strip():
            raise ValueError("--attn-cfg needs --attn-layers (the layers that are attention)")
        return [], {}
    try:
        cfg = json.loads(cfg_text) if cfg_text.strip() else hybrid_attn_cfg(d_model)
    except ValueError:
        raise ValueError(f"--attn-cfg must be a JSON object such as {json.dumps(hybrid_attn_cfg(d_model))}, "
                         f"got {cfg_text!r}") from None
    try:
        config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=16, attn_layer_idx=layers_text,
                             attn_cfg=cfg)
    except ValueError as err:
        raise ValueError(f"--attn-layers / --attn-cfg: {err}") from None
    return list(config.attn_layer_idx), dict(cfg)


def fit_config(args):
    from .fit import FitConfig
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, args.max_steps // 20)
    every = args.eval_every if args.eval_every is not None else max(1, args.max_steps // 10)
    saving = args.save_every > 0 or args.resume
    if saving and not args.out_dir:
        raise ValueError("--save-every and --resume need an --out-dir for the training state")
    state_path = str(Path(args.out_dir) / STATE_FILE) if saving else None
    if state_path and not args.resume:
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return FitConfig(max_steps=args.max_steps, lr=args.lr, warmup_steps=warmup, weight_decay=args.weight_decay,
                     min_lr_ratio=args.min_lr_ratio, eval_every=every, seed=args.seed, time_limit_s=args.time_limit,
                     state_path=state_path, save_every=args.save_every, resume=args.resume,
                     settings={k: v for k, v in sorted(vars(args).items()) if k not in NOT_RUN_SETTINGS})


# ---- outputs -----------------------------------------------------------------------------

def start(task: str, args, model, device: torch.device, progress: bool) -> None:
    """The start line (report.announce), before the first step: one batch is batch_size x seq_len tokens."""
    if progress:
        announce(task, n_params(model), args.max_steps, f"{args.batch_size} x {args.seq_len} tokens",
                 args.max_steps * args.batch_size * args.seq_len, device)


def summary_base(task: str, args, model, rows: list[dict], device: torch.device, accuracy: float | None) -> dict:
    """Every task's summary keys (report.task_summary), and the sequence length."""
    summary = task_summary(task, accuracy=accuracy, rows=rows, n_params=n_params(model), steps=args.max_steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                           model=asdict(model_args(args)), out_dir=args.out_dir)
    summary["seq_len"] = args.seq_len
    return summary
