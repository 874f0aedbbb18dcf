"""The peak bytes of live activations in one inference forward of Vim-Ti and of DeiT-Ti's
architecture, counted on CPU: an estimate of the GPU peaks that needs no GPU.

    python benchmarks/vision_memory.py [--size 512] [--batch 8]

A dispatch mode counts each op output's storage for as long as a tensor on it is alive. The
selective scan and the causal conv are replaced by stand-ins that allocate only their output
(or write into out=), as the fused GPU kernels do: the chunked torch scan's own temporaries
would otherwise decide the CPU peak. fp32 throughout; parameters and the input image are not
counted. Vim-Ti is counted twice: its inference path (BiMamba._fused_inference) and its
training path run without autograd (what inference ran before the fused path). Writes
benchmarks/results/vision_memory_cpu.json and a bar plot beside it (.png);
`--plot JSON` only redraws the plot of an existing result."""

from __future__ import annotations

import argparse
import json
import sys
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


class LiveBytes(TorchDispatchMode):
    """Peak of the summed storage bytes of op outputs that are alive, and what was alive then."""

    def __init__(self):
        super().__init__()
        self.tensors: dict[int, int] = {}  # storage -> live tensors on it
        self.nbytes: dict[int, int] = {}
        self.made_by: dict[int, str] = {}
        self.current = self.peak = 0
        self.at_peak: list = []
        self._refs = []
        self._op = ""

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key, n = storage.data_ptr(), storage.nbytes()
        if n == 0:
            return
        if key not in self.tensors:
            self.tensors[key], self.nbytes[key], self.made_by[key] = 0, n, self._op
            self.current += n
            if self.current > self.peak:
                self.peak = self.current
                self.at_peak = sorted(((self.nbytes[k], self.made_by[k]) for k in self.nbytes), reverse=True)[:8]
        self.tensors[key] += 1

        def dead(_, key=key):
            self.tensors[key] -= 1
            if self.tensors[key] == 0:
                del self.tensors[key], self.made_by[key]
                self.current -= self.nbytes.pop(key)
        self._refs.append(weakref.ref(t, dead))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out


def _kernel_stand_ins():
    """ops.selective_scan and ops.causal_conv1d replaced by their output allocations."""
    from mambakit import ops

    def scan(u, *args, out=None, **kwargs):
        return out if out is not None else torch.empty_like(u)

    def conv(x, *args, **kwargs):
        return torch.empty_like(x)
    ops.selective_scan, ops.causal_conv1d = scan, conv


def peak_bytes(model: torch.nn.Module, images: torch.Tensor) -> tuple[int, list]:
    with torch.inference_mode():
        mode = LiveBytes()
        with mode:
            model(images)
    return mode.peak, mode.at_peak


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vision_memory_cpu.json"))
    p.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result")
    args = p.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return
    _kernel_stand_ins()
    from mambakit import ops
    from mambakit.models.vision import create_model
    from vision import TinyViT
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size)
    rows = []
    vim = create_model("vim_tiny", num_classes=1000, img_size=args.size).eval()
    for name, inference_path in (("vim_tiny (inference path)", True), ("vim_tiny (training path)", False)):
        real = ops.no_autograd
        if not inference_path:
            ops.no_autograd = lambda *a: False
        peak, at = peak_bytes(vim, images)
        ops.no_autograd = real
        rows.append(dict(model=name, peak_mb=round(peak / 1e6, 2), alive_at_peak=[(round(n / 1e6, 2), op) for n, op in at]))
    peak, at = peak_bytes(TinyViT(img_size=args.size).eval(), images)
    rows.append(dict(model="deit_tiny architecture (TinyViT)", peak_mb=round(peak / 1e6, 2),
                     alive_at_peak=[(round(n / 1e6, 2), op) for n, op in at]))
    for r in rows:
        print(f"{r['model']:36s} peak {r['peak_mb']:8.2f} MB")
    result = dict(size=args.size, batch=args.batch, dtype="fp32", rows=rows,
                  vim_inference_over_deit=round(rows[0]["peak_mb"] / rows[2]["peak_mb"], 3),
                  vim_training_path_over_deit=round(rows[1]["peak_mb"] / rows[2]["peak_mb"], 3))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"Vim-Ti / DeiT-Ti: {result['vim_inference_over_deit']} (inference path), "
          f"{result['vim_training_path_over_deit']} (training path); wrote {args.out}")
    plot(result, Path(args.out).with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    """One bar per counted model: its peak of live activation bytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(8, 2.8))
    colors = ["tab:green" if "inference" in r["model"] else "tab:olive" if "vim" in r["model"] else "tab:gray"
              for r in rows]
    bars = ax.barh([r["model"] for r in rows], [r["peak_mb"] for r in rows], color=colors)
    ax.bar_label(bars, fmt="%.1f MB", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="peak of live activations, MB (lower is better)",
           title=f"one inference forward, {result['size']} px, batch {result['batch']}, {result['dtype']}")
    ax.set_xlim(0, max(r["peak_mb"] for r in rows) * 1.2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("wrote", path)


if __name__ == "__main__":
    main()
