"""Picks the SSD kernels' launch settings (mambakit/ops/triton/ssd_tiles.py) on the GPU.

For each shape (B x L x N, with benchmarks/ssd.py's 32 heads x 64, chunk 256, bf16), every
kernel's candidate settings are timed inside the whole op, the other kernels at the table's
settings: a forward kernel by the forward's median, a backward kernel by the forward+backward's.
A candidate counts only if its outputs and gradients match the table's to bf16 rounding. The
best of each kernel is written per state width (--pick, the knob's JSON: MAMBAKIT_SSD_TILES=FILE
runs with it), and the kernels' own times (torch.profiler) are printed for the table's settings,
the picked ones and, where importable, the official mamba_chunk_scan_combined.

Compiling ~250 kernel variants one by one takes minutes, so --workers processes compile them
first (Triton's on-disk cache) at a short length with the same specialisation.

    python benchmarks/tuning/ssd_tiles.py [--shapes 1x131072x64 2x8192x128] [--workers 12] \\
        [--kernels chunk_output dx dcb dbc] [--out benchmarks/tuning/results/ssd_tiles.json] [--pick FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

FORWARD_KERNELS = ("cb", "chunk_state", "state_passing", "chunk_output")
STAGES = [(4, 2), (4, 3), (8, 3), (4, 4)]  # (num_warps, num_stages)


def candidates(kernel: str) -> list[dict]:
    """The settings tried for `kernel` (the table's own among them)."""
    if kernel == "cb":
        return [dict(block_t=t, block_k=64, num_warps=w, num_stages=s) for t in (64, 128) for w, s in STAGES]
    if kernel in ("chunk_state", "chunk_state_bwd"):
        tiles = [(64, 64, 64), (64, 64, 32), (32, 64, 64), (64, 128, 32), (64, 32, 64)]
        return [dict(block_p=p, block_n=n, block_k=k, num_warps=w, num_stages=s) for (p, n, k), (w, s)
                in itertools.product(tiles, STAGES)]
    if kernel in ("state_passing", "state_passing_bwd"):
        return ([dict(block=b, group=g, num_warps=4) for b in (256, 512, 1024) for g in (1, 4, 8)]
                + [dict(block=b, group=g, num_warps=8) for b in (1024, 2048) for g in (4, 8)])
    if kernel == "chunk_output":
        tiles = [(64, 64, 64, 64), (128, 64, 64, 64), (64, 64, 32, 64), (128, 64, 32, 64), (128, 32, 64, 64),
                 (64, 64, 64, 32)]
        return [dict(block_m=m, block_p=p, block_s=s_, block_k=k, num_warps=w, num_stages=s)
                for (m, p, s_, k), (w, s) in itertools.product(tiles, STAGES)]
    if kernel == "dx":
        tiles = [(64, 64, 64), (64, 32, 64), (32, 64, 64), (128, 64, 32), (64, 64, 32)]
        return [dict(block_s=s_, block_t=t, block_k=k, num_warps=w, num_stages=s)
                for (s_, t, k), (w, s) in itertools.product(tiles, STAGES)]
    if kernel == "dcb":
        tiles = [(64, 64, 64), (64, 64, 32), (128, 64, 64), (64, 32, 64)]
        return [dict(block_t=t, block_s=s_, block_k=k, num_warps=w, num_stages=s, min_programs=mp)
                for (t, s_, k), (w, s), mp in itertools.product(tiles, STAGES, (1024, 4096))]
    if kernel == "dbc":
        return [dict(block=b, block_n=n, num_warps=w, num_stages=s, min_programs=mp)
                for b, n, (w, s), mp in itertools.product((32, 64), (64, 128), STAGES, (1024, 4096))]
    raise ValueError(kernel)


def parse_shape(text):
    batch, length, d_state = (int(v) for v in text.split("x"))
    return batch, length, d_state


def width_of(d_state):
    from mambakit.ops.triton.ssd_tiles import WIDTHS
    return next((w for w in WIDTHS if d_state <= w), WIDTHS[-1])


def jobs(shapes, kernels):
    return [(shape, kernel, cand) for shape in shapes for kernel in kernels for cand in candidates(kernel)]


def run_once(fn, kw):
    """One forward and backward: y and the gradients of x, dt, B, C (float32, on the GPU)."""
    import torch
    leaves = {k: v.detach().requires_grad_(k in ("x", "dt", "B", "C")) for k, v in kw.items()}
    y = fn(**leaves)
    g = torch.Generator(device=y.device).manual_seed(3)
    y.backward(torch.randn(y.shape, generator=g, device=y.device, dtype=y.dtype))
    return [y.detach().float()] + [leaves[k].grad.float() for k in ("x", "dt", "B", "C")]


def max_rel_diff(a, b):
    return max(((x - y).abs().max() / y.abs().max().clamp_min(1e-6)).item() for x, y in zip(a, b))


def compile_part(args):
    """A worker: runs its share of the jobs once at a short length, filling Triton's cache."""
    from ssd import CHUNK, make_inputs

    from mambakit.ops import knobs, ssd
    fn = lambda **kw: ssd(**kw, dt_softplus=True, chunk_size=CHUNK, backend="triton")  # noqa: E731
    shapes = [parse_shape(s) for s in args.shapes]
    mine = jobs(shapes, args.kernels)[args.part::args.parts]
    inputs = {}
    for (batch, _, d_state), kernel, cand in mine:
        key = (batch, d_state)
        if key not in inputs:  # 4096 steps: 16 chunks, the same integer specialisation as long runs
            inputs[key] = make_inputs(batch, 4096, d_state)
        with knobs.override(ssd_tiles=json.dumps({kernel: cand})):
            try:
                run_once(fn, inputs[key])
            except Exception as err:  # a candidate that does not compile is skipped in the timing too
                print(f"compile failed {kernel} {cand}: {type(err).__name__}: {str(err)[:200]}", flush=True)


def kernel_times(fn, kw, label):
    """The CUDA time of each kernel in one forward+backward, from torch.profiler (ms)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    run_once(fn, kw)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            run_once(fn, kw)
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total / 3 / 1000) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[1])
    print(f"  kernels, {label}: " + ", ".join(f"{name[:40]} {ms:.3f}" for name, ms in rows[:12]), flush=True)
    return {name: ms for name, ms in rows[:20]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1x131072x64", "2x8192x128"], help="B x L x N")
    ap.add_argument("--workers", type=int, default=12, help="processes that compile the variants first (0: none)")
    ap.add_argument("--kernels", nargs="+", default=None, help="sweep only these kernels (default: all of ssd_tiles.SETTINGS)")
    ap.add_argument("--out", default="benchmarks/tuning/results/ssd_tiles.json")
    ap.add_argument("--pick", default=None, help="write the best settings here, as the MAMBAKIT_SSD_TILES JSON")
    ap.add_argument("--part", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--parts", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from mambakit.ops.triton.ssd_tiles import SETTINGS
    args.kernels = args.kernels or list(SETTINGS)
    unknown = set(args.kernels) - set(SETTINGS)
    if unknown:
        ap.error(f"--kernels: unknown {sorted(unknown)}; the kernels are {list(SETTINGS)}")
    if args.part is not None:
        compile_part(args)
        return
    t0 = time.time()
    if args.workers:
        procs = [subprocess.Popen([sys.executable, __file__, "--shapes", *args.shapes, "--kernels", *args.kernels,
                                   "--part", str(i), "--parts", str(args.workers)]) for i in range(args.workers)]
        for p in procs:
            p.wait()
        print(f"compiled in {time.time() - t0:.0f} s", flush=True)

    import torch
    from ssd import CHUNK, bench, make_inputs

    from mambakit.ops import knobs, ssd
    from mambakit.ops.triton.ssd_tiles import tiles
    fn = lambda **kw: ssd(**kw, dt_softplus=True, chunk_size=CHUNK, backend="triton")  # noqa: E731
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        official = lambda **kw: mamba_chunk_scan_combined(**kw, chunk_size=CHUNK, dt_softplus=True)  # noqa: E731
    except ImportError:
        official = None
    rows, picked, profiles = [], {}, {}
    for text in args.shapes:
        batch, length, d_state = parse_shape(text)
        kw = make_inputs(batch, length, d_state)
        reference = run_once(fn, kw)
        base = {"fwd": bench(fn, kw, backward=False), "fwdbwd": bench(fn, kw, backward=True)}
        print(f"{text}: table settings fwd {base['fwd']:.3f} ms, fwd+bwd {base['fwdbwd']:.3f} ms", flush=True)
        profiles[text] = {"table": kernel_times(fn, kw, "table")}
        if official is not None:
            profiles[text]["official"] = kernel_times(official, kw, "official")
            base["official_fwd"] = bench(official, kw, backward=False)
            base["official_fwdbwd"] = bench(official, kw, backward=True)
        best = {}
        for kernel in args.kernels:
            metric = "fwd" if kernel in FORWARD_KERNELS else "fwdbwd"
            default = tiles(kernel, d_state)
            best[kernel] = (base[metric], default)
            for cand in candidates(kernel):
                row = {"shape": text, "kernel": kernel, **cand}
                with knobs.override(ssd_tiles=json.dumps({kernel: cand})):
                    try:
                        row["max_rel_diff"] = max_rel_diff(run_once(fn, kw), reference)
                        row[f"{metric}_ms"] = bench(fn, kw, backward=metric == "fwdbwd")
                    except Exception as err:
                        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
                rows.append(row)
                ok = "error" not in row and row["max_rel_diff"] < 2e-2
                if ok and row[f"{metric}_ms"] < best[kernel][0]:
                    best[kernel] = (row[f"{metric}_ms"], cand)
            print(f"  {kernel}: best {best[kernel][0]:.3f} ms ({metric}; table {base[metric]:.3f}) {best[kernel][1]}",
                  flush=True)
        width = str(width_of(d_state))
        for kernel, (_, cand) in best.items():
            picked.setdefault(kernel, {})[width] = cand
        with knobs.override(ssd_tiles=json.dumps({k: v for k, v in picked.items()})):
            both = {"fwd": bench(fn, kw, backward=False), "fwdbwd": bench(fn, kw, backward=True),
                    "max_rel_diff": max_rel_diff(run_once(fn, kw), reference)}
            profiles[text]["picked"] = kernel_times(fn, kw, "picked")
        print(f"{text}: picked fwd {both['fwd']:.3f} ms, fwd+bwd {both['fwdbwd']:.3f} ms "
              f"(table {base['fwd']:.3f} / {base['fwdbwd']:.3f}; official {base.get('official_fwd', 0):.3f} / "
              f"{base.get('official_fwdbwd', 0):.3f})", flush=True)
        rows.append({"shape": text, "table": base, "picked": both})
        del kw, reference
        torch.cuda.empty_cache()
    if args.pick:
        with open(args.pick, "w") as f:
            json.dump(picked, f, indent=1)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "picked": picked,
                   "profiles": profiles, "rows": rows}, f, indent=1)
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
