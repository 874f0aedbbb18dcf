"""`mambakit generate`: text from a preset (random weights, seeded) or a checkpoint, streamed
to stdout as it is made, with the prefill time and decode speed on stderr."""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from ..config import PRESETS
from ..generation import stream
from ..generation.sampling import MIN_TEMPERATURE, SEED_RANGE
from ..models.lm import MambaLM
from ..tokenizer import ByteTokenizer, HFTokenizer, load_for_model, load_tokenizer
from ..training.devices import DEVICE_HELP, resolve_device
from .flags import add_arch_flag, arch_of, preset_for_arch

HELP = "generate text from a preset (random weights) or a checkpoint"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny",
                        help=f"a preset ({', '.join(PRESETS)}; with --arch, its family's sizes) or a checkpoint "
                             f"directory / cached hub id")
    add_arch_flag(parser)
    parser.add_argument("--prompt", default="The state space model ")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help=f"0 = greedy (so is anything below {MIN_TEMPERATURE:g})")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep this much probability")
    parser.add_argument("--min-p", type=float, default=None, help="drop tokens below min-p x the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="> 1 discourages repeats")
    parser.add_argument("--stop", action="append", default=[], help="stop at this string (repeatable)")
    parser.add_argument("--eos-token-id", type=int, default=None, help="default: the tokenizer's eos token, if any")
    parser.add_argument("--max-prompt-tokens", type=int, default=None, help="reject longer prompts")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory or cached hub id, or 'bytes'; "
                                                          "default: the checkpoint's, else bytes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help=DEVICE_HELP.replace(" (default: auto)", ""))
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def load_model(spec: str, device: str | torch.device, dtype: torch.dtype, seed: int) -> tuple[MambaLM, bool]:
    """A preset name (random weights, seeded) or a checkpoint directory / cached hub id."""
    if spec in PRESETS:
        torch.manual_seed(seed)
        return MambaLM.from_name(spec, device=device, dtype=dtype), True
    return MambaLM.from_pretrained(spec, device=device, dtype=dtype), False


def pick_tokenizer(model_spec: str, tokenizer_spec: str | None) -> ByteTokenizer | HFTokenizer:
    """--tokenizer if given (a directory or cached hub id, or "bytes"); else the checkpoint's
    own tokenizer files when it has them; else the built-in byte tokenizer."""
    if tokenizer_spec == "bytes":
        return ByteTokenizer()
    if tokenizer_spec is not None:
        return load_tokenizer(tokenizer_spec)
    return ByteTokenizer() if model_spec in PRESETS else load_for_model(model_spec)


_CONTROL = {c: "\ufffd" for c in range(32) if chr(c) not in "\n\t"} | {127: "\ufffd"}


def printable(text: str) -> str:
    """Control bytes (which random weights produce) would garble the terminal."""
    return text.translate(_CONTROL)


def _error(message: str) -> SystemExit:
    """The exit of a bad flag or file: one `error:` line on stderr, exit status 1."""
    return SystemExit("error: " + " ".join(str(message).split()))


def _check_generate_args(args) -> torch.device:
    """Every flag that can be checked before the model is loaded; returns --device's device."""
    if args.max_new_tokens < 1:
        raise _error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise _error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise _error(f"--top-k must be >= 1, got {args.top_k}")
    for name in ("top_p", "min_p"):
        v = getattr(args, name)
        if v is not None and not 0 < v <= 1:
            raise _error(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    r = args.repetition_penalty
    if r is not None and (not math.isfinite(r) or r <= 0):
        raise _error(f"--repetition-penalty must be a finite number > 0, got {r}")
    if any(not stop for stop in args.stop):
        raise _error("--stop must not be empty")
    if not SEED_RANGE[0] <= args.seed < SEED_RANGE[1]:
        raise _error(f"--seed must fit in 64 bits ([-2**63, 2**64)), got {args.seed}")
    if args.eos_token_id is not None and args.eos_token_id < 0:
        raise _error(f"--eos-token-id must be >= 0, got {args.eos_token_id}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise _error(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    try:
        return resolve_device(args.device)
    except ValueError as err:
        raise _error(err) from None


def _eos_token_id(args, tokenizer, vocab_size: int) -> int | None:
    """--eos-token-id, else the tokenizer's eos token; an error line if the model cannot make it."""
    if args.eos_token_id is not None:
        if args.eos_token_id >= vocab_size:
            raise _error(f"--eos-token-id {args.eos_token_id} is outside the model's vocabulary [0, {vocab_size})")
        return args.eos_token_id
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and not 0 <= eos < vocab_size:
        raise _error(f"the tokenizer's eos token id {eos} is outside the model's vocabulary [0, {vocab_size}); "
                     f"pass --eos-token-id or another --tokenizer")
    return eos


def run(args: argparse.Namespace) -> int:
    """Generates from --model and --prompt; every bad flag is an `error:` line (SystemExit)."""
    device = _check_generate_args(args)
    try:
        spec = preset_for_arch(args.model, args.arch, "--model")
    except ValueError as err:
        raise _error(err) from None
    try:
        model, random_weights = load_model(spec, device, DTYPES[args.dtype], args.seed)
    except (FileNotFoundError, ValueError) as err:
        raise _error(f"--model {args.model!r}: {err}") from None
    if args.arch is not None and arch_of(model.config) != args.arch:
        raise _error(f"--arch {args.arch} and --model {args.model!r} disagree: the checkpoint is a "
                     f"{arch_of(model.config)} model")
    try:
        tokenizer = pick_tokenizer(spec, args.tokenizer)
    except (FileNotFoundError, ImportError, ValueError) as err:
        raise _error(f"--tokenizer {args.tokenizer or args.model!r}: {err}") from None
    model.eval()
    if not args.prompt:
        raise _error("--prompt is empty")
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise _error("--prompt encodes to no tokens")
    if args.max_prompt_tokens is not None and len(ids) > args.max_prompt_tokens:
        raise _error(f"--prompt is {len(ids)} tokens, more than --max-prompt-tokens {args.max_prompt_tokens}")
    if max(ids) >= model.config.padded_vocab_size:
        raise _error(f"the prompt has token ids up to {max(ids)} but the model's vocabulary has "
                     f"{model.config.padded_vocab_size} entries")
    eos = _eos_token_id(args, tokenizer, model.config.vocab_size)
    if random_weights:
        print(f"[mambakit] preset {spec!r} with RANDOM weights (seed {args.seed}): the text is noise, "
              f"this shows the machinery, not a trained model", file=sys.stderr)
    input_ids = torch.tensor([ids], device=device)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()
    tokens, t_first, t0 = [], None, time.perf_counter()
    printed = ""
    tokens_in = stream(model, input_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                       seed=args.seed, eos_token_id=eos, stop=args.stop or None,
                       tokenizer=tokenizer if args.stop else None)
    try:
        for token in tokens_in:
            if t_first is None:
                t_first = time.perf_counter()
            tokens.append(int(token[0]))
            text = tokenizer.decode(tokens)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(printable(text[len(printed):]))
                out.flush()
                printed = text
    except (ValueError, TypeError) as err:  # an argument the checks above let through: still one line
        out.write("\n")
        raise _error(err) from None
    t_end = time.perf_counter()
    out.write(printable(tokenizer.decode(tokens)[len(printed):]) + "\n")
    steps = len(tokens) - 1
    step_ms = (t_end - t_first) / steps * 1e3 if steps else float("nan")
    print(f"[mambakit] prefill {len(ids)} tokens: {(t_first - t0) * 1e3:.1f} ms | {len(tokens)} new tokens, "
          f"{step_ms:.2f} ms/step, {1e3 / step_ms if steps else float('nan'):.1f} tokens/s", file=sys.stderr)
    return 0
