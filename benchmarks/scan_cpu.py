"""The selective scan alone on CPU: the chunked torch scan (each inner method and chunk size)
against plain sequential loops, at (B=1, D=1536, N=16, L=2048), fp32, 2 threads, forward.

    python benchmarks/scan_cpu.py [--threads 2] [--out benchmarks/results/scan_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from mambakit.ops import selective_scan_chunked, selective_scan_ref


def plain_loop(u, delta, A, B, C, D, z, delta_bias):
    """A plain, well-written sequential loop: one step of vector ops per time step."""
    dt = F.softplus(delta + delta_bias[:, None])  # (B, D, L)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # (B, D, N)
    y = torch.empty_like(u)
    for t in range(u.shape[-1]):
        dt_t = dt[:, :, t, None]
        h = torch.exp(dt_t * A) * h + dt_t * u[:, :, t, None] * B[:, None, :, t]
        y[:, :, t] = (h * C[:, None, :, t]).sum(-1)
    return (y + D[:, None] * u) * F.silu(z)


def materialized_loop(u, delta, A, B, C, D, z, delta_bias):
    """The loop of transformers' slow path: build exp(ΔA) and ΔBu for all of L, then step."""
    dt = F.softplus(delta + delta_bias[:, None])
    dA = torch.exp(dt[..., None] * A[:, None, :])  # (B, D, L, N)
    dBu = (dt * u)[..., None] * B.transpose(1, 2)[:, None]  # (B, D, L, N)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.matmul(h, C[:, :, t, None])[..., 0])
    return (torch.stack(ys, -1) + D[:, None] * u) * F.silu(z)


def timeit(fn, repeat=5):
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/scan_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    b, d, n, L = args.batch, args.dim, args.d_state, args.length
    u, z = torch.randn(b, d, L), torch.randn(b, d, L)
    delta = torch.randn(b, d, L) * 0.5 - 2
    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)
    B, C = torch.randn(b, n, L), torch.randn(b, n, L)
    D, bias = torch.ones(d), torch.randn(d) * 0.1

    ref = selective_scan_ref(u[..., :256], delta[..., :256], A, B[..., :256], C[..., :256], D=D,
                             z=z[..., :256], delta_bias=bias, delta_softplus=True)
    # the Mamba mixer hands the scan time-major memory (views of (B, L, D) tensors)
    layouts = {"channel-major": (u, delta, z),
               "time-major": tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (u, delta, z))}
    rows = []
    with torch.inference_mode():
        for name, fn in (("plain sequential loop", plain_loop), ("materialized loop (transformers-style)", materialized_loop)):
            ms = timeit(lambda: fn(u, delta, A, B, C, D, z, bias), args.repeat) * 1e3
            rows.append({"method": name, "layout": "channel-major", "chunk_size": None, "ms": ms})
            print(f"{name:42s} {ms:9.1f} ms", flush=True)
        for layout, (uu, dd, zz) in layouts.items():
            for inner, sizes in (("sequential", (16, 32, 64, 128, 256, 512)), ("hillis_steele", (16, 32, 64, 128))):
                for T in sizes:
                    got = selective_scan_chunked(uu[..., :256], dd[..., :256], A, B[..., :256], C[..., :256], D=D,
                                                 z=zz[..., :256], delta_bias=bias, delta_softplus=True,
                                                 chunk_size=T, inner=inner)
                    torch.testing.assert_close(got, ref, rtol=6e-4, atol=2e-3)
                    fn = lambda: selective_scan_chunked(uu, dd, A, B, C, D=D, z=zz, delta_bias=bias,
                                                        delta_softplus=True, chunk_size=T, inner=inner)
                    ms = timeit(fn, args.repeat) * 1e3
                    rows.append({"method": f"chunked/{inner}", "layout": layout, "chunk_size": T, "ms": ms})
                    print(f"chunked/{inner:14s} {layout:14s} T={T:<4d} {ms:9.1f} ms", flush=True)
    base = rows[0]["ms"]
    for r in rows:
        r["speedup_vs_plain_loop"] = base / r["ms"]
    result = {"shape": {"B": b, "D": d, "N": n, "L": L}, "dtype": "float32", "threads": args.threads,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print("wrote", args.out)
    plot(result, args.out.replace(".json", ".png"))


def plot(result, path):
    import matplotlib  # a dependency of mambakit
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for base in (r for r in result["rows"] if r["chunk_size"] is None):
        ax.axhline(base["ms"], ls="--", lw=1, color="gray" if "plain" in base["method"] else "black")
        ax.text(16, base["ms"] * 1.04, base["method"], fontsize=8)
    for method in ("chunked/sequential", "chunked/hillis_steele"):
        for layout, marker in (("channel-major", "o"), ("time-major", "s")):
            pts = [(r["chunk_size"], r["ms"]) for r in result["rows"] if r["method"] == method and r["layout"] == layout]
            ax.plot(*zip(*pts), marker=marker, label=f"{method} ({layout} input)")
    shape = result["shape"]
    ax.set(xscale="log", yscale="log", xlabel="chunk size T", ylabel="forward ms (median)",
           title=f"selective scan on CPU, B={shape['B']} D={shape['D']} N={shape['N']} L={shape['L']}, "
                 f"fp32, {result['threads']} threads")
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks([16, 32, 64, 128, 256, 512], labels=["16", "32", "64", "128", "256", "512"])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
