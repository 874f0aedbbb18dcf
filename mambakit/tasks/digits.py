"""Vision Mamba on scikit-learn's handwritten digits (1,797 real 8x8 grey images, 10 classes,
bundled with scikit-learn: nothing is downloaded), on CPU (or --device).

A fixed stratified split (--test-fraction, seeded) keeps 20 % of the images for testing; a
small Vim (patch 2: a 4x4 grid of 16 patch tokens plus the middle class token) trains with the
shared loop (tasks/fit.py), with random 1-pixel shifts of the training images. The run writes
into --out-dir the model (config.json + model.safetensors: `mambakit eval --task digits --model
DIR` tests it again), metrics.json (the summary every task writes, report.py, with the per-class
accuracy, the confusion matrix and the config; and every step's row), curves.png and
confusion.png.

`mambakit train --task digits` (1,000 steps of a 44K-parameter Vim) takes 65-80 s on 2 idle cores
and reaches 98.1-98.6 % test accuracy (seeds 0-2); --help lists the flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..training.devices import DEVICE_HELP

N_CLASSES = 10


def load_split(test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (N, 1, 8, 8), y_train (N,), x_test, y_test): pixels scaled from 0..16 to about
    zero mean, unit variance (statistics of the training images); a stratified seeded split."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ValueError("the digits task needs scikit-learn: pip install 'mambakit[vision]'") from None
    if not 0 < test_fraction < 1:
        raise ValueError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.images, data.target, test_size=test_fraction,
                                              random_state=seed, stratify=data.target)
    x_tr, x_te = (torch.tensor(a, dtype=torch.float32)[:, None] for a in (x_tr, x_te))  # (N, 1, 8, 8)
    mean, std = x_tr.mean(), x_tr.std()
    return (x_tr - mean) / std, torch.tensor(y_tr), (x_te - mean) / std, torch.tensor(y_te)


def shift_images(x: torch.Tensor, gen: torch.Generator, max_shift: int) -> torch.Tensor:
    """x (B, 1, H, W) -> each image moved by a random (dy, dx) in [-max_shift, max_shift]^2,
    filled with the background (the minimum pixel value)."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=float(x.min()))  # (B, 1, H+2s, W+2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, b), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (B, 1, W)
    return pad[torch.arange(b)[:, None, None], 0, rows, cols][:, None]  # (B, 1, H, W)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, n: int = N_CLASSES) -> torch.Tensor:
    """(n, n) counts: row = true class, column = predicted class."""
    return torch.bincount(target * n + pred, minlength=n * n).view(n, n)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambakit train --task digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="runs/digits",
                   help="where the model, metrics.json, curves.png and confusion.png go ('' = none)")
    p.add_argument("--patch-size", type=int, default=2, help="patch side in pixels (8 must divide by it)")
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-state", type=int, default=8)
    p.add_argument("--expand", type=int, default=2)
    p.add_argument("--scan", choices=("raster", "cross"), default="raster")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--max-shift", type=int, default=1, help="random shift of training images, pixels (0: none)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (0: leave torch's default)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="the start line and a progress bar on stderr")
    return p


def model_settings(args) -> dict:
    """The flags that shape the model (VisionConfig fields); the preset holds the images' shape
    (1 x 8 x 8) and the N_CLASSES classes."""
    return {"patch_size": args.patch_size, "d_model": args.d_model, "n_layer": args.n_layer,
            "d_state": args.d_state, "expand": args.expand, "scan": args.scan}


def run(args, progress: bool = True) -> tuple[object, dict, list[dict]]:
    """Trains and evaluates from parsed flags; returns (model, summary, per-step rows)."""
    from ..models.registry import create_model
    from ..training.devices import resolve_device
    from .fit import FitConfig, fit
    from .report import announce, task_summary
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size < 1 or args.max_shift < 0:
        raise ValueError("--batch-size must be >= 1 and --max-shift >= 0")
    device = resolve_device(args.device)
    x_tr, y_tr, x_te, y_te = load_split(args.test_fraction, args.seed)
    torch.manual_seed(args.seed)
    model = create_model("vim_digits", **model_settings(args)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if progress:
        tokens = model.num_patches + 1  # patch tokens and the class token
        announce("digits", n_params, args.max_steps, f"{args.batch_size} images of {tokens} tokens",
                 args.max_steps * args.batch_size * tokens, device)
    cfg = FitConfig(max_steps=args.max_steps, lr=args.lr, warmup_steps=args.warmup_steps,
                    weight_decay=args.weight_decay, eval_every=args.eval_every, seed=args.seed)
    n = x_tr.shape[0]

    def batch_at(step: int):
        """Epoch-wise shuffling: batch `step` is a slice of its epoch's seeded permutation."""
        epoch, start = divmod(step * args.batch_size, n)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        idx = torch.randperm(n, generator=gen)[start:start + args.batch_size]  # may be short at the epoch's end
        shift_gen = torch.Generator().manual_seed(args.seed * 7_919 + step)
        return shift_images(x_tr[idx], shift_gen, args.max_shift).to(device), y_tr[idx].to(device)

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x), y)

    def evaluate() -> dict:
        return {"accuracy": int((predict(model, x_te, device) == y_te).sum()) / len(y_te)}

    rows = fit(model, batch_at, loss_fn, cfg, evaluate=evaluate, progress=progress)
    model.eval()
    scores = test_scores(model, x_te, y_te, device)
    summary = task_summary("digits", accuracy=scores["accuracy"], rows=rows, n_params=n_params,
                           steps=args.max_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           device=device, model=model_settings(args), out_dir=args.out_dir)
    summary.update(test_accuracy=scores["accuracy"], **{k: v for k, v in scores.items() if k != "accuracy"},
                   n_train=n, threads=torch.get_num_threads(),
                   config={k: v for k, v in vars(args).items() if k != "progress"})
    return model, summary, rows


@torch.no_grad()
def predict(model, x: torch.Tensor, device) -> torch.Tensor:
    """The predicted classes (N,) on the CPU of images x (N, 1, 8, 8), 256 at a time."""
    return torch.cat([model(x[i:i + 256].to(device)).argmax(-1).cpu() for i in range(0, x.shape[0], 256)])


def test_scores(model, x_te: torch.Tensor, y_te: torch.Tensor, device) -> dict:
    """accuracy, per_class_accuracy, confusion and n_test of the model on the test images."""
    pred = predict(model, x_te, device)
    conf = confusion_matrix(pred, y_te)
    return {"accuracy": int((pred == y_te).sum()) / len(y_te),
            "per_class_accuracy": (conf.diag() / conf.sum(1)).tolist(), "confusion": conf.tolist(),
            "n_test": int(y_te.shape[0])}


# ---- the model on disk -------------------------------------------------------------------

MODEL_FORMAT = "mambakit-vision"


def save_model(model, directory: Path, test_fraction: float, seed: int) -> None:
    """config.json (the VisionConfig and the split the model was tested on) and
    model.safetensors in `directory`, as a whole (checkpoint.write_directory)."""
    from safetensors.torch import save_file

    from ..checkpoint import atomic_write, atomic_write_json, write_directory
    config = {"format": MODEL_FORMAT, "task": "digits", "vision": dataclasses.asdict(model.cfg),
              "split": {"test_fraction": test_fraction, "seed": seed}}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def write(into: Path) -> None:
        atomic_write(into / "model.safetensors", lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        atomic_write_json(into / "config.json", config)  # last: it marks a complete checkpoint

    write_directory(directory, write, owned=lambda _: {"config.json", "model.safetensors"})


def load_model(directory: str | Path, device="cpu") -> tuple[object, dict]:
    """(the model saved by `mambakit train --task digits` in `directory`, in eval mode, its
    split {"test_fraction", "seed"}); anything else is a ValueError naming the directory."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from ..models.registry import create_model
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"--model {directory}: no digits model there ({type(err).__name__}: {err})") from None
    vision = config.get("vision") if isinstance(config, dict) and config.get("format") == MODEL_FORMAT else None
    if not isinstance(vision, dict):
        raise ValueError(f"--model {directory}: its config.json is not a digits model (format {MODEL_FORMAT!r})")
    vision = dict(vision)
    if isinstance(vision.get("img_size"), list):
        vision["img_size"] = tuple(vision["img_size"])
    try:
        model = create_model("vim_digits", **vision)
        model.load_state_dict(load_file(directory / "model.safetensors"))
    except (OSError, ValueError, TypeError, RuntimeError, SafetensorError) as err:
        raise ValueError(f"--model {directory}: the digits model cannot be loaded "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    split = config.get("split") if isinstance(config.get("split"), dict) else {}
    return model.to(device).eval(), split


def plot_confusion(conf: list[list[int]], accuracy: float, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    ax.imshow(conf, cmap="Blues")
    for i, row in enumerate(conf):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > max(map(max, conf)) / 2 else "black")
    ax.set(xticks=range(N_CLASSES), yticks=range(N_CLASSES), xlabel="predicted", ylabel="true",
           title=f"Vision Mamba on 8x8 digits: test accuracy {accuracy:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def train_main(argv: list[str]) -> int:
    from .report import print_summary, save_run
    args = build_parser().parse_args(argv)
    try:
        model, summary, rows = run(args, progress=args.progress)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.out_dir:
        out = Path(args.out_dir)
        save_run(out, model, summary, rows, "accuracy", "Vision Mamba on 8x8 digits",
                 save_model=lambda d: save_model(model, d, args.test_fraction, args.seed))
        plot_confusion(summary["confusion"], summary["accuracy"], out / "confusion.png")
    print_summary(summary)
    return 0


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mambakit eval --task digits",
                                description="the test accuracy of a model of `mambakit train --task digits`")
    p.add_argument("--model", required=True, help="the model's directory (the run's --out-dir)")
    p.add_argument("--test-fraction", type=float, default=None, help="default: the split the model was tested on")
    p.add_argument("--seed", type=int, default=None, help="the split's seed; default: the model's")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    return p


def eval_main(argv: list[str]) -> int:
    """Prints one JSON line: the task, the model, accuracy, per_class_accuracy, confusion, n_test."""
    from ..training.devices import resolve_device
    args = build_eval_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
        model, split = load_model(args.model, device)
        test_fraction = args.test_fraction if args.test_fraction is not None else split.get("test_fraction", 0.2)
        seed = args.seed if args.seed is not None else split.get("seed", 0)
        _, _, x_te, y_te = load_split(test_fraction, seed)
        scores = test_scores(model, x_te, y_te, device)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps({"task": "digits", "model": str(args.model), "device": str(device),
                      "test_fraction": test_fraction, "seed": seed, **scores}, sort_keys=True))
    return 0
