"""Host time against GPU time of one scan shape (default 16 x 512, where a call is bound by host
time): do_bench milliseconds, host and wall microseconds per call with no synchronisation
inside the loop, and the torch profiler's kernel table, forward and forward+backward.

    python benchmarks/tuning/scan_host_time.py [--batch 16 --length 512]

To compare two commits, run it with PYTHONPATH pointing at each one's tree in turn.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for scan.py
from scan import bench, make_inputs  # noqa: E402


def host_and_wall_us(fn, n=200):
    """(host µs per call, wall µs per call) over n calls, synchronizing only around the loop."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    return round((t1 - t0) / n * 1e6, 1), round((t2 - t0) / n * 1e6, 1)


def kernel_table(fn, calls=20):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=10)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=512)
    args = ap.parse_args()
    import mambakit
    from mambakit.ops import selective_scan
    print("mambakit from", mambakit.__file__)
    ours = lambda **kw: selective_scan(**kw, delta_softplus=True, backend="triton")  # noqa: E731
    kw = make_inputs(args.batch, args.length)
    for _ in range(3):  # compile, and let the clocks settle
        bench(ours, kw, False)
        bench(ours, kw, True)
    print("do_bench ms: fwd", bench(ours, kw, False), "fwd+bwd", bench(ours, kw, True))

    def forward():
        with torch.no_grad():
            ours(**kw)

    leaves = {k: v.detach().requires_grad_() for k, v in kw.items()}
    grad = torch.randn_like(ours(**leaves))

    def forward_backward():
        for v in leaves.values():
            v.grad = None
        ours(**leaves).backward(grad)

    for name, fn in (("fwd", forward), ("fwd+bwd", forward_backward)):
        print(f"{name}: host us / wall us per call", host_and_wall_us(fn))
        print(kernel_table(fn))


if __name__ == "__main__":
    main()
