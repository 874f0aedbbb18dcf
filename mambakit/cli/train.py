"""`mambakit train`: a MambaLM on a corpus (mambakit.training), with one flag per TrainConfig
field and per model config field. `--task NAME` (other than lm) never reaches this parser:
mambakit.cli hands the other flags to the task, which parses them itself."""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys

from ..config import PRESETS, MambaConfig
from ..tasks import TASKS
from ..training import TrainConfig, train
from ..training.devices import DEVICE_HELP
from .flags import (ATTN_LAYERS_HELP, add_arch_flag, add_dataclass_flags, attn_layers_for, check_arch_layer,
                    check_preset_attn_layers, preset_for_arch)

HELP = "train a MambaLM (default: the tiny preset on the Python standard library)"
DESCRIPTION = ("Every TrainConfig field and every model config field (--d-model, --n-layer, "
               "...) can be set; unset ones keep the preset's / the default.")
TRAIN_HELP = {  # TrainConfig fields whose flag needs more than its default
    "preset": f"the model's size: {', '.join(PRESETS)} (the table below); with --arch, its family's sizes "
              f"(--arch mamba2 --preset 130m: mamba2-130m, --arch hybrid --preset 130m: hybrid-130m)",
    "data": "a text file, a directory of text files, or a token file of `mambakit prepare` (.bin / .npy); "
            "None: the Python standard library",
    "device": DEVICE_HELP.replace(" (default: auto)", ""),
    "resume": "continue the run in --out-dir from its latest checkpoint",
    "fsdp": "under torchrun: shard the model, gradients and optimizer state (FSDP2)",
    "overwrite": "start over in an --out-dir that holds a checkpoint",
    "compile": "torch.compile the model",
    "activation_checkpointing": "recompute each block's activations in the backward pass",
    "skip_nonfinite": "skip a step whose loss or gradient norm is NaN or infinite, instead of stopping with an "
                      "error (no checkpoint ever holds a non-finite state)",
    "allow_config_change": "--resume even with other settings than the checkpoint's (data, seed, lr, ...): the "
                           "changes are listed instead of refused",
}
MODEL_HELP = {"vocab_size": "grown to the data's largest token id + 1 when that is larger (257 for text: "
                            "bytes + EOS)",
              "attn_layer_idx": ATTN_LAYERS_HELP,
              "attn_cfg": "the attention's settings as JSON, the official MHA's keyword arguments "
                          "('{\"num_heads\": 4, \"rotary_emb_dim\": 16}')"}

FLAG_NAMES = {"attn_layer_idx": "--attn-layers"}  # model fields whose flag has a second, shorter name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_arch_flag(parser)
    add_dataclass_flags(parser, TrainConfig, help=TRAIN_HELP)
    preset = TrainConfig.preset  # the default preset: the model flags' defaults are its values
    add_dataclass_flags(parser, MambaConfig, dest_prefix="model_", help=MODEL_HELP, defaults=PRESETS[preset],
                        default_note=f"from --preset; {preset}: ", aliases=FLAG_NAMES)
    parser.add_argument("--task", default="lm", choices=["lm", *TASKS],
                        help="lm (default): a language model on --data; another task takes its own flags "
                             "(mambakit train --task NAME --help)")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = preset_table()


def preset_table() -> str:
    """The presets' values of the model fields in which they differ, as a table for --help; a
    list as --attn-layers takes it ("-" for none), and the dicts (attn_cfg), too long for a
    column, as lines under the table in --attn-cfg's JSON."""
    fields = [f.name for f in dataclasses.fields(MambaConfig)
              if len({repr(getattr(p, f.name)) for p in PRESETS.values()}) > 1]
    columns = [f for f in fields if not any(isinstance(getattr(p, f), dict) for p in PRESETS.values())]
    rows = [["--preset"] + [FLAG_NAMES.get(f, "--" + f.replace("_", "-")) for f in columns]]
    rows += [[name] + [_cell(getattr(cfg, f)) for f in columns] for name, cfg in PRESETS.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines += [f"{name}: --{f.replace('_', '-')} '{_json(getattr(cfg, f))}'"
              for f in fields if f not in columns for name, cfg in PRESETS.items() if getattr(cfg, f)]
    return "the presets (a model flag, when given, overrides its value):\n  " + "\n  ".join(lines)


def _json(settings: dict) -> str:
    """A dict of settings as compact JSON, its unset (None) entries left out."""
    return json.dumps({k: v for k, v in settings.items() if v is not None}, separators=(",", ":"))


def _cell(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


def _check_attn_layers(values: dict, arch: str | None) -> None:
    """--attn-layers checked against the model's layers (--n-layer, else the preset's) and
    --arch, and turned into indices; without it, the preset's attention layers checked against
    --n-layer. A ValueError naming the flags. A bad --preset or --n-layer is left to the trainer,
    which names it."""
    preset = values["preset"]
    n_layer = values.get("model_n_layer", PRESETS[preset].n_layer) if preset in PRESETS else None
    if not isinstance(n_layer, int) or n_layer < 1:
        return
    text = values.get("model_attn_layer_idx")
    if text is None:
        check_preset_attn_layers(preset, n_layer)
        return
    values["model_attn_layer_idx"] = attn_layers_for(text, n_layer, arch)
    if values["model_attn_layer_idx"] and not PRESETS[preset].attn_cfg and "model_attn_cfg" not in values:
        raise ValueError(f"--attn-layers {text!r}: the {preset} preset has no attention settings; give --attn-cfg "
                         f"'{{\"num_heads\": N}}' too, or take a hybrid preset (--arch hybrid)")


def run(args: argparse.Namespace) -> int:
    """Trains from the parsed flags; a bad setting is an `error:` line (SystemExit)."""
    values = {k: v for k, v in vars(args).items() if v is not None and k not in ("task", "arch")}
    try:
        check_arch_layer(args.arch, values.get("model_layer"))
        values["preset"] = preset_for_arch(values.get("preset", TrainConfig.preset), args.arch)
        _check_attn_layers(values, args.arch)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    model_overrides = {k[len("model_"):]: v for k, v in values.items() if k.startswith("model_")}
    try:
        summary = train(cfg, model_overrides)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit("error: " + " ".join(str(err).split("\n"))) from None
    except KeyboardInterrupt as err:  # Ctrl-C before training began, or a second signal while stopping
        print(f"error: {str(err) or 'interrupted'}; the last checkpoint in {cfg.out_dir} (if any) is intact",
              file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)
    bits = summary.get("val_bits_per_token")
    print(f"[mambakit] {summary['params'] / 1e6:.2f}M parameters, {summary['step']} steps on {summary['corpus']}; "
          f"validation {bits:.3f} bits/token against the unigram entropy {summary['unigram_bits']:.3f}; "
          f"checkpoint, metrics.jsonl and loss.png in {cfg.out_dir}" if bits is not None else
          f"[mambakit] stopped at step {summary['step']}; checkpoint in {cfg.out_dir}", file=sys.stderr)
    return summary.get("exit_status") or 0  # 130 / 143 when stopped by SIGINT / SIGTERM
