"""Vim-Ti against DeiT-Ti: inference images/s and peak memory against image size.

    python benchmarks/vision.py            # CUDA: 224, 512, 1024, 1248 px, bf16 autocast
    python benchmarks/vision.py --sizes 768 896 960 992 1024 --iters 5 \
        --out benchmarks/results/vision_crossover_h200.json            # where the speed crossover lies
    python benchmarks/vision.py --max-batch 1 --sizes 1024 2048 --iters 10 \
        --out benchmarks/results/vision_batch1_h200.json               # batch 1
    python benchmarks/vision.py --smoke    # CPU, tiny sizes: checks that everything runs (runs/)
    python benchmarks/vision.py --plot benchmarks/results/vision_h100.json   # redraw a result's PNG

DeiT-Ti is timm's `deit_tiny_patch16_224` (pretrained=False, img_size=S; its attention is
F.scaled_dot_product_attention, i.e. flash attention on the GPU) when timm is installed, else
`TinyViT` below: the same architecture (patch 16, width 192, 12 blocks of 3-head SDPA attention
and a 4x MLP, class token, LayerNorm). Each model runs at the largest batch that fits, up to
--max-batch (halving on out-of-memory). Writes JSON (+ a PNG plot) to benchmarks/results/."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambakit.models.vision import create_model

RESULTS = Path(__file__).resolve().parent / "results"


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, d_h)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, L, d_h)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """DeiT-Ti's architecture (5.7M parameters at 224 px), for machines without timm."""

    def __init__(self, img_size: int, patch: int = 16, dim: int = 192, depth: int = 12, heads: int = 3,
                 num_classes: int = 1000):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        n = (img_size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[_ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):  # (B, 3, H, W) -> (B, classes)
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, M, D)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(t))[:, 0])


def make_deit(size: int) -> tuple[nn.Module, str]:
    try:
        import timm
    except ImportError:
        return TinyViT(size), "TinyViT (DeiT-Ti architecture; timm not installed)"
    return timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=size), f"timm {timm.__version__}"


def make_model(name: str, size: int, smoke: bool) -> tuple[nn.Module, str]:
    if name == "vim_tiny":
        return create_model("vim_tiny", img_size=size), "mambakit"
    return make_deit(size)


def _autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type,
                                                                                             enabled=False)


def measure(model: nn.Module, size: int, batch: int, device: torch.device, dtype, iters: int, warmup: int) -> dict:
    """images/s and peak memory of `iters` inference batches after `warmup` ones."""
    x = torch.randn(batch, 3, size, size, device=device)
    ctx = _autocast(device, dtype)
    cuda = device.type == "cuda"
    with torch.inference_mode(), ctx:
        for _ in range(warmup):
            model(x)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return {"batch": batch, "images_per_s": batch * iters / seconds, "ms_per_batch": 1e3 * seconds / iters,
            "peak_mem_gib": None if peak is None else peak / 2**30}


def run_one(name: str, size: int, args, device, dtype) -> dict:
    model, source = make_model(name, size, args.smoke)
    model = model.to(device).eval()
    params = sum(p.numel() for p in model.parameters())
    batch = args.max_batch
    while batch >= 1:
        try:
            row = measure(model, size, batch, device, dtype, args.iters, args.warmup)
            break
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            batch //= 2
    else:
        row = {"batch": 0, "images_per_s": None, "ms_per_batch": None, "peak_mem_gib": None, "oom": True}
    if args.profile and name == "vim_tiny" and row["batch"]:
        print_profile(model, size, row["batch"], device, dtype, args.profile)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row.update(model=name, size=size, tokens=(size // 16) ** 2 + 1, params=params, source=source)
    print(json.dumps(row), flush=True)
    return row


def print_profile(model: nn.Module, size: int, batch: int, device: torch.device, dtype, top: int) -> None:
    """The `top` kernels (GPU time) of one inference batch, grouped by input shapes, so that a
    copy or elementwise kernel can be traced to the tensors it reads."""
    from torch.profiler import ProfilerActivity, profile
    x = torch.randn(batch, 3, size, size, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), _autocast(device, dtype):
        model(x)
        with profile(activities=activities, record_shapes=True) as prof:
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"profile of one {size}-px batch of {batch}:", flush=True)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=top, max_name_column_width=50,
                                                             max_shapes_column_width=80), flush=True)


def crossover(rows: list[dict], key: str, better) -> int | None:
    """The smallest size from which Vim is better than DeiT on `key` at every larger size."""
    sizes = sorted({r["size"] for r in rows})
    by = {(r["model"], r["size"]): r for r in rows}
    wins = []
    for s in sizes:
        v, d = by[("vim_tiny", s)].get(key), by[("deit_tiny", s)].get(key)
        if v is None or d is None:
            wins.append(v is not None)  # the one that ran wins
        else:
            wins.append(better(v, d))
    for i, s in enumerate(sizes):
        if all(wins[i:]):
            return s
    return None


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, label in (("vim_tiny", "Vim-Ti (mambakit)"), ("deit_tiny", "DeiT-Ti (SDPA)")):
        rs = sorted((r for r in rows if r["model"] == name and r["images_per_s"]), key=lambda r: r["size"])
        axes[0].plot([r["size"] for r in rs], [r["images_per_s"] for r in rs], "o-", label=label)
        mem = [(r["size"], r["peak_mem_gib"] / r["batch"]) for r in rs if r["peak_mem_gib"] is not None]
        if mem:
            axes[1].plot(*zip(*mem), "o-", label=label)
    axes[0].set(xlabel="image size (px)", ylabel="images / s", yscale="log", title="inference throughput")
    axes[1].set(xlabel="image size (px)", ylabel="peak GiB per image in the batch", yscale="log",
                title="peak memory (max_memory_allocated / batch)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, one iteration")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--max-batch", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/vision_h200.json)")
    p.add_argument("--profile", type=int, default=0, help="print the top N ops of one Vim-Ti batch at each size")
    p.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result")
    args = p.parse_args(argv)
    if args.plot:
        result = json.loads(Path(args.plot).read_text())
        plot(result["rows"], Path(args.plot).with_suffix(".png"),
             f"Vim-Ti vs DeiT-Ti, {result['device']}, {result['dtype']}, batch up to {result['max_batch']}")
        return 0
    if args.smoke:
        device, dtype = torch.device("cpu"), None
        defaults = {"sizes": [32, 64], "max_batch": 2, "iters": 1, "warmup": 1,
                    "out": str(RESULTS.parents[1] / "runs" / "vision_smoke_cpu.json")}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("error: the benchmark needs CUDA (use --smoke on CPU)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        defaults = {"sizes": [224, 512, 1024, 1248], "max_batch": 64, "iters": 10, "warmup": 3,
                    "out": str(RESULTS / "vision_h200.json")}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for s in args.sizes:
        if s % 16:
            raise SystemExit(f"error: image size {s} is not divisible by the patch size 16")
    torch.manual_seed(0)
    start = time.perf_counter()
    rows = [run_one(name, s, args, device, dtype) for s in args.sizes for name in ("vim_tiny", "deit_tiny")]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "dtype": "bf16 autocast" if dtype else "fp32", "iters": args.iters,
        "max_batch": args.max_batch, "rows": rows,
        "crossover_faster_from_px": crossover(rows, "images_per_s", lambda v, d: v > d),
        "crossover_smaller_from_px": crossover(rows, "peak_mem_gib", lambda v, d: v < d) if device.type == "cuda"
        else None,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"),
         f"Vim-Ti vs DeiT-Ti, {result['device']}, {result['dtype']}, batch up to {result['max_batch']}")
    def since(px):
        return "at none of these sizes" if px is None else f"from {px} px"

    print(f"wrote {out} and {out.with_suffix('.png')} in {result['seconds']:.0f} s; Vim-Ti faster "
          f"{since(result['crossover_faster_from_px'])}, smaller {since(result['crossover_smaller_from_px'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
