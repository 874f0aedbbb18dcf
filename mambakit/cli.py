"""The command line: `mambakit train`, `prepare` and `generate` (bench arrives with its issue)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .config import PRESETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(spec: str, device: str, dtype: torch.dtype, seed: int):
    """A preset name (random weights, seeded) or a checkpoint directory / cached hub id."""
    from .models.lm import MambaLM
    if spec in PRESETS:
        torch.manual_seed(seed)
        return MambaLM.from_name(spec, device=device, dtype=dtype), True
    return MambaLM.from_pretrained(spec, device=device, dtype=dtype), False


def pick_tokenizer(model_spec: str, tokenizer_spec: str | None):
    """--tokenizer if given (a directory or cached hub id, or "bytes"); else the checkpoint's
    own tokenizer files when it has them; else the built-in byte tokenizer."""
    from .tokenizer import ByteTokenizer, has_tokenizer, load_tokenizer
    if tokenizer_spec == "bytes":
        return ByteTokenizer()
    if tokenizer_spec is not None:
        return load_tokenizer(tokenizer_spec)
    if model_spec not in PRESETS and Path(model_spec).is_dir() and has_tokenizer(model_spec):
        return load_tokenizer(model_spec)
    return ByteTokenizer()


_CONTROL = {c: "\ufffd" for c in range(32) if chr(c) not in "\n\t"} | {127: "\ufffd"}


def printable(text: str) -> str:
    """Control bytes (which random weights produce) would garble the terminal."""
    return text.translate(_CONTROL)


def _check_generate_args(args) -> None:
    if args.max_new_tokens < 1:
        raise SystemExit(f"error: --max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0 or args.temperature == float("inf"):
        raise SystemExit(f"error: --temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise SystemExit(f"error: --top-k must be >= 1, got {args.top_k}")
    for name in ("top_p", "min_p"):
        v = getattr(args, name)
        if v is not None and not 0 < v <= 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be in (0, 1], got {v}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise SystemExit(f"error: --repetition-penalty must be > 0, got {args.repetition_penalty}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")


def cmd_generate(args) -> int:
    from .generation import stream
    _check_generate_args(args)
    try:
        model, random_weights = load_model(args.model, args.device, DTYPES[args.dtype], args.seed)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: --model {args.model!r}: {err}") from None
    try:
        tokenizer = pick_tokenizer(args.model, args.tokenizer)
    except (FileNotFoundError, ImportError, ValueError) as err:
        raise SystemExit(f"error: --tokenizer {args.tokenizer or args.model!r}: {err}") from None
    model.eval()
    if not args.prompt:
        raise SystemExit("error: --prompt is empty")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise SystemExit("error: --prompt encodes to no tokens")
    if args.max_prompt_tokens is not None and len(ids) > args.max_prompt_tokens:
        raise SystemExit(f"error: --prompt is {len(ids)} tokens, more than --max-prompt-tokens {args.max_prompt_tokens}")
    if max(ids) >= model.config.padded_vocab_size:
        raise SystemExit(f"error: the prompt has token ids up to {max(ids)} but the model's vocabulary has "
                         f"{model.config.padded_vocab_size} entries")
    if random_weights:
        print(f"[mambakit] preset {args.model!r} with RANDOM weights (seed {args.seed}): the text is noise, "
              f"this shows the machinery, not a trained model", file=sys.stderr)
    input_ids = torch.tensor([ids], device=args.device)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    tokens, t_first, t0 = [], None, time.perf_counter()
    printed = ""
    eos = args.eos_token_id if args.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    for token in stream(model, input_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                        seed=args.seed, eos_token_id=eos, stop=args.stop or None,
                        tokenizer=tokenizer if args.stop else None):
        if t_first is None:
            t_first = time.perf_counter()
        tokens.append(int(token[0]))
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(printable(text[len(printed):]))
            out.flush()
            printed = text
    t_end = time.perf_counter()
    out.write(printable(tokenizer.decode(tokens)[len(printed):]) + "\n")
    steps = len(tokens) - 1
    step_ms = (t_end - t_first) / steps * 1e3 if steps else float("nan")
    print(f"[mambakit] prefill {len(ids)} tokens: {(t_first - t0) * 1e3:.1f} ms | {len(tokens)} new tokens, "
          f"{step_ms:.2f} ms/step, {1e3 / step_ms if steps else float('nan'):.1f} tokens/s", file=sys.stderr)
    return 0


def _add_dataclass_flags(parser, cls, skip=(), dest_prefix=""):
    """One --flag per dataclass field (bool fields take true/false), default None = unchanged."""
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        hint = hints[field.name]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base is bool:
            kind = _parse_bool
        elif base in (int, float):
            kind = base
        else:
            kind = str
        parser.add_argument("--" + field.name.replace("_", "-"), dest=dest_prefix + field.name, type=kind,
                            default=None, metavar=base.__name__.upper() if hasattr(base, "__name__") else "VALUE",
                            help=f"(default: {field.default!r})" if field.default is not dataclasses.MISSING else None)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def cmd_train(args) -> int:
    import dataclasses

    from .train import TrainConfig, train
    values = {k: v for k, v in vars(args).items() if v is not None and k != "task"}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in train_fields})
    model_overrides = {k[len("model_"):]: v for k, v in values.items() if k.startswith("model_")}
    for flag in ("resume", "overwrite", "compile", "activation_checkpointing", "fsdp"):
        if getattr(args, "flag_" + flag, False):
            setattr(cfg, flag, True)
    try:
        summary = train(cfg, model_overrides)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    bits = summary.get("val_bits_per_token")
    print(f"[mambakit] {summary['params'] / 1e6:.2f}M parameters, {summary['step']} steps on {summary['corpus']}; "
          f"validation {bits:.3f} bits/token against the unigram entropy {summary['unigram_bits']:.3f}; "
          f"checkpoint, metrics.jsonl and loss.png in {cfg.out_dir}" if bits is not None else
          f"[mambakit] stopped at step {summary['step']}; checkpoint in {cfg.out_dir}", file=sys.stderr)
    return 0


def cmd_prepare(args) -> int:
    from .prepare import prepare
    try:
        info = prepare(args.tokenizer, args.data, args.out)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"[mambakit] {info['files']} files -> {info['tokens']} tokens ({info['dtype']}) in {info['out']}",
          file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambakit", description="Mamba selective state-space models")
    sub = parser.add_subparsers(dest="command", required=True)
    from .config import MambaConfig
    from .train import TrainConfig
    tr = sub.add_parser("train", help="train a MambaLM (default: the tiny preset on the Python standard library)",
                        description="Every TrainConfig field and every model config field (--d-model, --n-layer, "
                                    "...) can be set; unset ones keep the preset's / the default.")
    _add_dataclass_flags(tr, TrainConfig, skip=("resume", "overwrite", "compile", "activation_checkpointing", "fsdp"))
    for flag, text in (("resume", "continue the run in --out-dir from its latest checkpoint"),
                       ("fsdp", "under torchrun: shard the model, gradients and optimizer state (FSDP2)"),
                       ("overwrite", "start over in an --out-dir that holds a checkpoint"),
                       ("compile", "torch.compile the model"),
                       ("activation_checkpointing", "recompute each block's activations in the backward pass")):
        tr.add_argument("--" + flag.replace("_", "-"), dest="flag_" + flag, action="store_true", help=text)
    _add_dataclass_flags(tr, MambaConfig, dest_prefix="model_")
    from .tasks import TASKS
    tr.add_argument("--task", default="lm", choices=["lm", *TASKS],
                    help="lm (default): a language model on --data; another task takes its own flags "
                         "(mambakit train --task NAME --help)")
    tr.set_defaults(func=cmd_train)
    ev = sub.add_parser("eval", help="evaluate a task model (mambakit eval --task NAME --help)")
    ev.add_argument("--task", required=True, choices=list(TASKS))
    pr = sub.add_parser("prepare", help="tokenize a corpus with a Hugging Face tokenizer into a .bin / .npy file")
    pr.add_argument("--tokenizer", required=True, help="a tokenizer directory or a hub id in the local cache")
    pr.add_argument("--data", required=True, help="a text file or a directory of text files")
    pr.add_argument("--out", required=True, help="the token file to write (.bin: uint16, .npy: uint16/uint32)")
    pr.set_defaults(func=cmd_prepare)
    gen = sub.add_parser("generate", help="generate text from a preset (random weights) or a checkpoint")
    gen.add_argument("--model", default="tiny",
                     help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory / cached hub id")
    gen.add_argument("--prompt", default="The state space model ")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability")
    gen.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    gen.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    gen.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    gen.add_argument("--eos-token-id", type=int, default=None, help="default: the tokenizer's eos token, if any")
    gen.add_argument("--max-prompt-tokens", type=int, default=None, help="reject longer prompts")
    gen.add_argument("--tokenizer", default=None,
                     help="a tokenizer directory or cached hub id, or 'bytes'; default: the checkpoint's, else bytes")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    gen.set_defaults(func=cmd_generate)
    return parser


def _split_task(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the value of --task, the other flags) from `train`/`eval` flags."""
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("train", "eval"):
        task, rest = _split_task(argv[1:])
        if task is not None and task != "lm":
            from .tasks import run
            return run(argv[0], task, rest)
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
