"""The Mamba-2 (SSD) scan on the GPU: mambakit's Triton kernels against the official Triton
kernels (mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined), side by side in one run,
with torch SDPA causal attention and mambakit's Mamba-1 selective scan at the same width beside them.

bf16 x/B/C, fp32 dt/A/D/dt_bias, nheads x headdim = 32 x 64 = 2048, one group, N = 64 and 128,
chunk 256, dt_softplus, no z (the Mamba-2 mixer gates in its norm). Forward and forward+backward,
triton.testing.do_bench medians.

    python benchmarks/ssd.py [--d-state 64 128] [--out benchmarks/results/ssd_h200.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from scan import bench  # the do_bench medians of the Mamba-1 scan benchmark

SHAPES = [(16, 512), (8, 2048), (2, 8192), (1, 32768), (1, 131072)]
HEADS, HEADDIM, CHUNK = 32, 64, 256


def make_inputs(batch, length, d_state, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    return dict(
        x=torch.randn(batch, length, HEADS, HEADDIM, generator=g, **bf),
        dt=torch.randn(batch, length, HEADS, generator=g, device="cuda") * 0.5 - 1,
        A=-torch.rand(HEADS, generator=g, device="cuda") * 8 - 1,
        B=torch.randn(batch, length, 1, d_state, generator=g, **bf),
        C=torch.randn(batch, length, 1, d_state, generator=g, **bf),
        D=torch.ones(HEADS, device="cuda"),
        dt_bias=torch.randn(HEADS, generator=g, device="cuda") * 0.1,
    )


def sdpa_ms(batch, length, backward):
    """Causal attention of 32 heads x 64 (the same width), flash backend where torch picks it."""
    from triton.testing import do_bench
    q, k, v = (torch.randn(batch, HEADS, length, HEADDIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=backward) for _ in range(3))
    if not backward:
        with torch.no_grad():
            return do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), warmup=10, rep=50)
    grad = torch.randn_like(q)
    return do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad), warmup=10, rep=50)


def mamba1_ms(batch, length, backward):
    """mambakit's Mamba-1 selective scan at D = 2048, N = 16 (bf16, z, delta_bias, softplus)."""
    from mambakit.ops import selective_scan
    g = torch.Generator(device="cuda").manual_seed(1)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    dim = HEADS * HEADDIM
    kw = dict(u=torch.randn(batch, dim, length, generator=g, **bf),
              delta=(torch.randn(batch, dim, length, generator=g, device="cuda") * 0.5 - 1).to(torch.bfloat16),
              A=-torch.rand(dim, 16, generator=g, device="cuda") * 4 - 0.5,
              B=torch.randn(batch, 16, length, generator=g, **bf), C=torch.randn(batch, 16, length, generator=g, **bf),
              D=torch.ones(dim, device="cuda"), z=torch.randn(batch, dim, length, generator=g, **bf),
              delta_bias=torch.randn(dim, generator=g, device="cuda") * 0.1)
    return bench(lambda **k: selective_scan(**k, delta_softplus=True, backend="triton"), kw, backward)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-state", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--shapes", nargs="+", default=[f"{b}x{length}" for b, length in SHAPES])
    ap.add_argument("--no-extras", action="store_true", help="skip SDPA and the Mamba-1 scan")
    ap.add_argument("--out", default="benchmarks/results/ssd_h200.json")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    from mambakit.ops import ssd
    ours = lambda **kw: ssd(**kw, dt_softplus=True, chunk_size=CHUNK, backend="triton")  # noqa: E731
    try:
        import mamba_ssm
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        official = lambda **kw: mamba_chunk_scan_combined(**kw, chunk_size=CHUNK, dt_softplus=True)  # noqa: E731
        official_version = mamba_ssm.__version__
    except ImportError as err:
        print("official mamba_ssm not importable:", err)
        official, official_version = None, None
    warm = make_inputs(*shapes[0], args.d_state[0])
    for fn in (ours, official):  # compile and clock up before the first timed shape
        if fn is not None:
            bench(fn, warm, backward=True)
    del warm
    rows = []
    for d_state in args.d_state:
        for batch, length in shapes:
            kw = make_inputs(batch, length, d_state)
            row = {"B": batch, "L": length, "N": d_state}
            if official is not None:  # the same answer on the same inputs, as a sanity check
                with torch.no_grad():
                    a, b = ours(**kw).float(), official(**kw).float()
                    row["max_rel_diff_vs_official"] = ((a - b).abs().max() / b.abs().max()).item()
            for name, fn in (("mambakit", ours), ("official", official)):
                if fn is not None:
                    row[f"{name}_fwd_ms"] = bench(fn, kw, backward=False)
                    row[f"{name}_fwdbwd_ms"] = bench(fn, kw, backward=True)
            if official is not None:
                row["fwd_speedup"] = row["official_fwd_ms"] / row["mambakit_fwd_ms"]
                row["fwdbwd_speedup"] = row["official_fwdbwd_ms"] / row["mambakit_fwdbwd_ms"]
            del kw
            if not args.no_extras and d_state == args.d_state[-1]:
                for key, fn in (("sdpa", sdpa_ms), ("mamba1_scan", mamba1_ms)):
                    for backward, suffix in ((False, "fwd"), (True, "fwdbwd")):
                        try:
                            row[f"{key}_{suffix}_ms"] = fn(batch, length, backward)
                        except torch.OutOfMemoryError:
                            row[f"{key}_{suffix}_ms"] = None
                        torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), flush=True)
            result = save(rows, official_version, args.out)  # after every row: a run cut short keeps its rows
            torch.cuda.empty_cache()
    plot(result, args.out.replace(".json", ".png"))


def save(rows, official_version, path) -> dict:
    """Write the result so far to `path` and return it."""
    import triton
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "mamba_ssm": official_version, "date": time.strftime("%Y-%m-%d"),
              "setup": f"bf16 x/B/C, fp32 dt/A/D/dt_bias, {HEADS} heads x {HEADDIM}, 1 group, chunk {CHUNK}, "
                       "dt_softplus, no z", "rows": rows}
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return result


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    states = sorted({r["N"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(states), figsize=(6.5 * len(states), 4.5), squeeze=False)
    for ax, d_state in zip(axes[0], states):
        rows = [r for r in result["rows"] if r["N"] == d_state]
        for key, label, style in (("mambakit_fwd_ms", "mambakit fwd", "-o"), ("mambakit_fwdbwd_ms", "mambakit fwd+bwd", "--o"),
                                  ("official_fwd_ms", "official fwd", "-s"), ("official_fwdbwd_ms", "official fwd+bwd", "--s"),
                                  ("sdpa_fwd_ms", "SDPA causal fwd", ":^"), ("mamba1_scan_fwd_ms", "Mamba-1 scan fwd", ":v")):
            pts = [(r["L"], r[key]) for r in rows if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set(xscale="log", yscale="log", xlabel="sequence length L (label: B x L)", ylabel="ms",
               title=f"SSD, {result['device']}, bf16, 32x64 heads, N={d_state}")
        # after the scale, which would reset them
        ax.set_xticks([r["L"] for r in rows], labels=[f"{r['B']}x{r['L']}" for r in rows], fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
