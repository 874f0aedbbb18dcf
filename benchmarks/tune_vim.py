"""Sweeps for Vim's padded inference path at one layer of Vim-Ti (D_inner 384, N 16, R 12) on
the device, in the layouts `BiMamba._padded_inference` uses (activations as columns (C, B*Lp)):

    python benchmarks/tune_vim.py OUT.jsonl                 # batch 64 at 1024 px (Lp = 4112)
    python benchmarks/tune_vim.py OUT.jsonl --batch 64 --px 2048

- the scan, forward and reversed: the lanes kernels' NL (lanes over states) x warps x pipeline
  stages x register prefetch, and a few register caps;
- the bidirectional conv's (BLOCK_L, BLOCK_D, warps);
- Δ = dt_proj(dt) as a GEMM with K = R = 12, or with K padded to 16 (the next rows of x_proj's
  output, B's, against zero weight columns: the same product)."""
import argparse, itertools, json, sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambakit.ops.triton.bidirectional import bidirectional_conv  # noqa: E402
from mambakit.ops.triton.selective_scan import scan_fwd  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--batch", type=int, default=64)
p.add_argument("--px", type=int, default=1024)
args = p.parse_args()
out = open(args.out, "a")
dev, bf16 = "cuda", torch.bfloat16
batch, di, n, r = args.batch, 384, 16, 12
length = (args.px // 16) ** 2 + 1
lp = -(-length // 16) * 16
torch.manual_seed(0)


def emit(row):
    row.update(batch=batch, px=args.px)
    out.write(json.dumps(row) + "\n"); out.flush()
    print(json.dumps(row), flush=True)


def cols(c):  # (B, C, Lp) view of a (C, B*Lp) buffer
    return torch.randn(c, batch, lp, device=dev, dtype=bf16).permute(1, 0, 2)


u, delta, z = cols(di), (cols(di) * 0.5 - 1), cols(di)
x_dbl = torch.randn(r + 2 * n, batch * lp, device=dev, dtype=bf16)
B_, C_ = (x_dbl[r + j * n:r + (j + 1) * n].view(n, batch, lp).permute(1, 0, 2) for j in (0, 1))
A = -torch.rand(di, n, device=dev) - 0.5
D, bias = torch.randn(di, device=dev), torch.randn(di, device=dev) * 0.1
y = torch.empty_like(u)
for reverse in (False, True):
    best = None
    configs = [dict(NL=nl, BLOCK_D=(32 // nl) * warps, num_warps=warps, STAGES=stages, PREFETCH=prefetch)
               for nl, warps, stages, prefetch in itertools.product((2, 4, 8), (1, 2), (1, 3), (False, True))]
    # 16 states per thread; and a register cap (Triton's maxnreg) that keeps 12 one-warp programs
    # per SM (the whole grid in one wave) with the prefetch's extra registers, at the price of spills
    configs += [dict(NL=1, BLOCK_D=32, num_warps=1, STAGES=1, PREFETCH=False)]
    configs += [dict(NL=2, BLOCK_D=16, num_warps=1, STAGES=1, PREFETCH=pf, maxnreg=m)
                for pf, m in ((True, 168), (True, 128), (False, 128))]
    for lanes in configs:
        try:
            ms = do_bench(lambda: scan_fwd(u, delta, A, B_, C_, D, z, bias, None, True, None, False, out=y,
                                           reverse=reverse, lanes=lanes), warmup=5, rep=30)
        except Exception as e:  # noqa: BLE001 (a shape that does not compile is skipped)
            print(lanes, "fail", type(e).__name__, str(e)[:200], flush=True)
            continue
        row = dict(part="scan", reverse=reverse, **lanes, ms=round(ms, 4))
        emit(row)
        best = row if best is None or row["ms"] < best["ms"] else best
    default = do_bench(lambda: scan_fwd(u, delta, A, B_, C_, D, z, bias, None, True, None, False, out=y,
                                        reverse=reverse), warmup=5, rep=30)
    emit(dict(part="scan", reverse=reverse, best=best, default_ms=round(default, 4)))

x_rows = torch.randn(batch, lp, di, device=dev, dtype=bf16)
w = torch.randn(2 * di, 4, device=dev)  # both directions' conv weights
cb = torch.randn(2 * di, device=dev)
u2 = torch.empty(2 * di, batch, lp, device=dev, dtype=bf16).permute(1, 0, 2)
for bl, bd, warps in itertools.product((32, 64, 128), (32, 64, 128), (4, 8)):
    ms = do_bench(lambda: bidirectional_conv(x_rows, w, cb, length, u2, block=(bl, bd, warps)), warmup=5,
                  rep=30)
    emit(dict(part="conv", BLOCK_L=bl, BLOCK_D=bd, warps=warps, ms=round(ms, 4)))

w_dt = torch.randn(di, r, device=dev, dtype=bf16)
w_dt16 = torch.cat([w_dt, torch.zeros(di, 16 - r, device=dev, dtype=bf16)], 1)
emit(dict(part="dt_gemm", K=12, ms=round(do_bench(lambda: w_dt @ x_dbl[:r], warmup=5, rep=30), 4)))
emit(dict(part="dt_gemm", K=16, ms=round(do_bench(lambda: w_dt16 @ x_dbl[:16], warmup=5, rep=30), 4)))
torch.testing.assert_close(w_dt @ x_dbl[:r], w_dt16 @ x_dbl[:16])
