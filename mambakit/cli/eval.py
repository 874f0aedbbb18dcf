"""`mambakit eval --task NAME ...`: evaluate a task model. The task parses its own flags
(`mambakit eval --task NAME --help`); mambakit.cli hands them over before this parser runs, so
this parser only gives `mambakit eval` its help and its error for a missing or unknown --task."""

from __future__ import annotations

import argparse

from .. import tasks

HELP = "evaluate a task model (mambakit eval --task NAME --help)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=list(tasks.TASKS))


def run(args: argparse.Namespace) -> int:
    return tasks.run("eval", args.task, [])
