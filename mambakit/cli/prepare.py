"""`mambakit prepare`: tokenize a corpus with a Hugging Face tokenizer into the .bin / .npy
token file that `mambakit train --data` memory-maps (mambakit.training.prepare), with the
tokenizer's files beside it (OUT.tokenizer/), which the run then stores with its checkpoints."""

from __future__ import annotations

import argparse
import sys

from ..training import prepare

HELP = "tokenize a corpus with a Hugging Face tokenizer into a .bin / .npy file"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizer", required=True, help="a tokenizer directory or a hub id in the local cache")
    parser.add_argument("--data", required=True, help="a text file or a directory of text files")
    parser.add_argument("--out", required=True, help="the token file to write (.bin: uint16, .npy: uint16/uint32)")


def run(args: argparse.Namespace) -> int:
    """Writes the token file; a bad flag or corpus is an `error:` line (SystemExit)."""
    try:
        info = prepare(args.tokenizer, args.data, args.out)
    except (ValueError, FileNotFoundError, ImportError) as err:
        raise SystemExit(f"error: {err}") from None
    kept = f"; the tokenizer's files in {info['tokenizer']}" if info["tokenizer"] else ""
    print(f"[mambakit] {info['files']} files -> {info['tokens']} tokens ({info['dtype']}) in {info['out']}{kept}",
          file=sys.stderr)
    return 0
