"""The command line: `mambakit train`, `eval`, `prepare` and `generate`.

COMMANDS maps each command to its module, which owns its flags: `HELP` (its line in `mambakit
--help`), an optional `DESCRIPTION`, `add_arguments(parser)` and `run(args) -> int`. A new
command is a new module and one line here. `train` and `eval` with `--task NAME` (other than
lm) hand the other flags to the task (mambakit.tasks), which parses them itself.

Conventions every command and task keeps: a boolean option is a --name / --no-name pair, a
--device takes auto (the default), cpu, cuda, cuda:N or mps, a bad flag or file is one `error:`
line. `mambakit --version` prints the installed version."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {  # in the order `mambakit --help` lists them
    "train": "mambakit.cli.train",
    "eval": "mambakit.cli.eval",
    "prepare": "mambakit.cli.prepare",
    "generate": "mambakit.cli.generate",
}
TASK_COMMANDS = ("train", "eval")  # the commands that take --task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mambakit", description="Mamba selective state-space models")
    parser.add_argument("--version", action="version", version=f"mambakit {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        command = importlib.import_module(module_name)
        command_parser = sub.add_parser(name, help=command.HELP, description=getattr(command, "DESCRIPTION", None))
        command.add_arguments(command_parser)
        command_parser.set_defaults(run=command.run)
    return parser


def package_version() -> str:
    """The installed package's version (its metadata), or "0+unknown" in a source tree that is
    not installed."""
    try:
        return importlib.metadata.version("mambakit")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _split_task(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the value of --task, the other flags) from `train`/`eval` flags."""
    for i, arg in enumerate(argv):
        if arg == "--task" and i + 1 < len(argv):
            return argv[i + 1], argv[:i] + argv[i + 2:]
        if arg.startswith("--task="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    """Runs `mambakit ARGV...` (sys.argv[1:] by default); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TASK_COMMANDS:
        task, rest = _split_task(argv[1:])
        if task is not None and task != "lm":
            from ..tasks import run
            return run(argv[0], task, rest)
    args = build_parser().parse_args(argv)
    return args.run(args)

