"""The command line's conventions: help that tells the real defaults, --device auto wherever a
--device is, one --name/--no-name form for every boolean option, --version, a line at once
when a task starts, a saved digits model that `eval` loads, one summary form for every task,
the LM loss plot in the summary's unit (bits), and a warning for a warmup longer than the run."""

import argparse
import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import json
import math
import re
import time

import pytest
import torch

from mambakit.cli import build_parser, main
from mambakit.config import PRESETS, MambaConfig
from mambakit.tasks import TASKS
from mambakit.training import TrainConfig, train


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _task_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every task's own parsers: "NAME train" and, for a task with an evaluation, "NAME eval"."""
    parsers = {}
    for name, module_name in TASKS.items():
        module = importlib.import_module(module_name)
        build_train = getattr(module, "build_train_parser", None) or module.build_parser
        parsers[f"{name} train"] = build_train()
        if hasattr(module, "eval_main"):
            parsers[f"{name} eval"] = module.build_eval_parser()
    return parsers


def _all_parsers() -> dict[str, argparse.ArgumentParser]:
    root = build_parser()
    return {"mambakit": root, **{f"mambakit {k}": p for k, p in _subparsers(root).items()}, **_task_parsers()}


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action | None:
    return next((a for a in parser._actions if flag in a.option_strings), None)


# ---- help, --device, boolean options, --version --------------------------------------------------

def test_train_help_shows_the_default_presets_model_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    preset = PRESETS[TrainConfig().preset]
    for field in ("d_model", "n_layer", "vocab_size", "d_state", "expand"):
        flag = "--" + field.replace("_", "-")
        (line,) = [ln for ln in text.splitlines() if ln.strip().startswith(flag + " ")]
        shown = re.search(r"\(default: [^)]*?(\w+)\)\s*$", line).group(1)
        assert shown == str(getattr(preset, field)), line
        if getattr(preset, field) != getattr(MambaConfig(), field):
            assert str(getattr(MambaConfig(), field)) not in line, line  # not MambaConfig's own default
    table = text[text.index("the presets"):]
    for name, cfg in PRESETS.items():  # and every preset's sizes
        (row,) = [ln.split() for ln in table.splitlines() if ln.split()[:1] == [name]]
        assert [str(cfg.d_model), str(cfg.n_layer), str(cfg.vocab_size)] == row[1:4]


def test_device_auto_is_the_default_of_every_device_option():
    parsers = {"mambakit train": _subparsers(build_parser())["train"], **_task_parsers()}
    for name, parser in parsers.items():
        action = _option(parser, "--device")
        assert action is not None, f"{name} has no --device"
        default = action.default if action.default is not None else TrainConfig().device  # None: TrainConfig's
        assert default == "auto", name
        required = [a.option_strings[0] for a in parser._actions if a.required]  # eval's --model
        assert parser.parse_args(["--device", "auto", *[x for f in required for x in (f, "x")]]).device == "auto"
    from mambakit.training.devices import resolve_device
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device"):
        resolve_device("tpu")


def test_every_boolean_option_is_a_name_and_no_name_pair():
    """No bare switch (store_true / store_false) and no --flag true|false: every boolean option
    is argparse.BooleanOptionalAction (--gate / --no-gate)."""
    for name, parser in _all_parsers().items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            label = f"{name}: {action.option_strings}"
            assert not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction,
                                           argparse._StoreConstAction)), label
            assert action.metavar != "BOOL", label
            if action.nargs == 0:
                assert isinstance(action, argparse.BooleanOptionalAction), label
    train_parser = _subparsers(build_parser())["train"]
    args = train_parser.parse_args(["--no-tie-embeddings", "--resume", "--no-compile"])
    assert (args.model_tie_embeddings, args.resume, args.compile) == (False, True, False)
    assert _task_parsers()["digits train"].parse_args(["--no-progress"]).progress is False


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"mambakit {importlib.metadata.version('mambakit')}"


# ---- tasks -------------------------------------------------------------------------------------

class _Started(Exception):
    pass


@pytest.mark.parametrize("task,extra", [("selective-copying", []), ("induction-heads", []),
                                        ("digits", ["--threads", "0"])])
def test_a_task_says_what_it_trains_before_the_first_step(task, extra, tmp_path, capsys, monkeypatch):
    """With its defaults (the paper's GPU-sized runs for the synthetic tasks), a task prints its
    start line within a second or two, before training begins (the first step on a CPU can
    take minutes)."""
    if task == "digits":
        pytest.importorskip("sklearn")
    from mambakit.tasks import fit as fit_module
    began = time.perf_counter()
    seen = {}

    def no_training(*args, **kwargs):
        seen["seconds"] = time.perf_counter() - began
        seen["err"] = capsys.readouterr().err
        raise _Started

    monkeypatch.setattr(fit_module, "fit", no_training)
    with pytest.raises(_Started):
        main(["train", "--task", task, "--out-dir", str(tmp_path / "run"), *extra])
    (line,) = [ln for ln in seen["err"].splitlines() if ln.startswith(f"[mambakit] {task}:")]
    assert "parameters" in line and "steps of batch" in line
    assert seen["seconds"] < 10
    cpu = not torch.cuda.is_available()
    assert ("sized for a GPU" in line) == (cpu and task != "digits"), line


TINY = {
    "selective-copying": ["--d-model", "16", "--seq-len", "24", "--n-memorize", "4", "--max-steps", "2",
                          "--batch-size", "4", "--eval-batches", "1", "--device", "cpu"],
    "induction-heads": ["--d-model", "16", "--seq-len", "16", "--max-steps", "2", "--batch-size", "4",
                        "--eval-batches", "1", "--device", "cpu"],
    "digits": ["--d-model", "16", "--n-layer", "1", "--d-state", "4", "--max-steps", "3", "--batch-size", "16",
               "--warmup-steps", "1", "--eval-every", "3", "--threads", "0"],
}


@pytest.fixture(scope="module")
def task_runs(tmp_path_factory):
    """Every task trained for a few steps through `mambakit train`: {task: (out_dir, stdout)}."""
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("the digits task needs scikit-learn")
    runs = {}
    for task, argv in TINY.items():
        out = tmp_path_factory.mktemp(task)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(io.StringIO()):
            assert main(["train", "--task", task, *argv, "--no-progress", "--out-dir", str(out)]) == 0
        runs[task] = (out, stdout.getvalue())
    return runs


def test_every_task_prints_and_writes_the_same_summary(task_runs):
    kinds = {"task": str, "accuracy": float, "final_loss": float, "n_params": int, "steps": int, "steps_run": int,
             "seconds": float, "batch_size": int, "lr": float, "seed": int, "device": str, "model": dict,
             "out_dir": str}
    for task, (out, stdout) in task_runs.items():
        summary = json.loads(stdout.strip().splitlines()[-1])  # the last line: the summary, as JSON
        for key, kind in kinds.items():
            assert isinstance(summary[key], kind), (task, key, summary.get(key))
        assert summary["task"] == task and 0 <= summary["accuracy"] <= 1 and summary["out_dir"] == str(out)
        assert summary["steps_run"] == summary["steps"] == int(TINY[task][TINY[task].index("--max-steps") + 1])
        written = json.loads((out / "metrics.json").read_text())
        assert written["summary"] == summary and len(written["steps"]) == summary["steps_run"]
        assert (out / "curves.png").is_file() and (out / "config.json").is_file()
    from mambakit.tasks.report import SUMMARY_KEYS
    assert set(kinds) == set(SUMMARY_KEYS)


def test_digits_saves_its_model_and_eval_loads_it(task_runs, capsys):
    out, stdout = task_runs["digits"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    trained = json.loads(stdout.strip().splitlines()[-1])
    capsys.readouterr()
    assert main(["eval", "--task", "digits", "--model", str(out), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == trained["accuracy"] and result["confusion"] == trained["confusion"]
    assert result["n_test"] == trained["n_test"] == 360
    with pytest.raises(SystemExit, match="error: --model .*not a digits model"):
        main(["eval", "--task", "digits", "--model", str(task_runs["induction-heads"][0])])


# ---- the LM trainer: plot units, warmup ---------------------------------------------------------

def test_the_lm_loss_plot_is_in_bits_as_the_summary(tmp_path):
    from mambakit.training.metrics import plot_losses
    ln2 = math.log(2)
    rows = [{"step": 1, "loss": 6 * ln2}, {"step": 2, "loss": 5 * ln2, "val_loss": 4 * ln2}]
    fig = plot_losses(rows, tmp_path / "loss.png")
    (ax,) = fig.axes
    assert "bits" in ax.get_ylabel() and "nats" not in ax.get_ylabel()
    train_line, val_line = ax.get_lines()
    assert list(train_line.get_ydata()) == pytest.approx([6, 5]) and list(val_line.get_ydata()) == pytest.approx([4])
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_a_warmup_longer_than_the_run_is_warned_about(tmp_path, capsys):
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), seq_len=16, batch_size=2, max_steps=2, warmup_steps=5,
                      eval_every=2, eval_batches=1, save_every=2, max_corpus_bytes=100_000)
    train(cfg, dict(d_model=16, n_layer=1, d_state=4), progress=False)
    assert "--warmup-steps 5 is longer than the run (--max-steps 2)" in capsys.readouterr().err

    from mambakit.tasks.fit import FitConfig, fit
    model = torch.nn.Linear(2, 1)
    batches = lambda step: (torch.ones(4, 2), torch.zeros(4, 1))  # noqa: E731
    loss = lambda m, x, y: ((m(x) - y) ** 2).mean()  # noqa: E731
    fit(model, batches, loss, FitConfig(max_steps=3, warmup_steps=4), progress=False)
    assert "--warmup-steps 4 is longer than the run (--max-steps 3)" in capsys.readouterr().err
    fit(model, batches, loss, FitConfig(max_steps=3, warmup_steps=3), progress=False)
    assert "warning" not in capsys.readouterr().err
