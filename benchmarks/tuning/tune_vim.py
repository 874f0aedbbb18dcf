"""Sweeps for Vim's padded inference path at one layer of Vim-Ti (D_inner 384, N 16, R 12) on
the device. The scan and conv sweeps run in the earlier column layout (activations (C, B*Lp));
the padded path is batch-major (B, C, Lp), which `--parts layout` chose over the columns:

    python benchmarks/tuning/tune_vim.py OUT.jsonl                 # batch 64 at 1024 px (Lp = 4112)
    python benchmarks/tuning/tune_vim.py OUT.jsonl --batch 64 --px 2048

- the scan in the padded path's form (Δ given after its softplus): forward without the gate (it
  writes y_f + D u), reversed
  with the gate and the forward's output added; B and C fp32 slices of x_proj's (B, R + 2N, Lp)
  output, their state stride compiled in. Lanes over states (NL) x warps x steps per chunk (T)
  x register prefetch; and, in the same run, the earlier form as a baseline (bf16 B and C in
  (R + 2N, B*Lp) columns, each direction gated);
- x_proj with bf16 against fp32 output;
- the bidirectional conv's (BLOCK_L, BLOCK_D, warps) x a register cap (maxnreg);
- Δ and B, C from one read of u (x_proj_delta, `--parts xproj`) over its tiles, against x_proj's
  bmm alone.

    --parts scan,conv,gemm,layout,convtime,xproj   (default: scan,conv,gemm; layout: u, z, y as
                                     columns against batch-major buffers, for the conv and the scan;
                                     convtime: the conv from time rows over its tiles; xproj:
                                     x_proj_delta over its tiles against x_proj's bmm alone;
                                     patchify: the images' copy into patch rows, Triton against
                                     torch's permuting copy)"""
import argparse, itertools, json, sys
from pathlib import Path

import torch
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
from mambakit.ops.triton.bidirectional import bidirectional_conv  # noqa: E402
from mambakit.ops.triton.scan_launch import scan_inference  # noqa: E402
from mambakit.ops.triton.patchify import patchify  # noqa: E402
from mambakit.ops.triton.x_proj_delta import x_proj_delta  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--batch", type=int, default=64)
p.add_argument("--px", type=int, default=1024)
p.add_argument("--parts", default="scan,conv,gemm")  # also: layout
p.add_argument("--bc", default="fp32,bf16", help="x_proj's output dtypes to sweep the scan with")
p.add_argument("--shapes", type=json.loads, default=None,
               help="the scan's [NL, BLOCK_D, warps, T] to sweep, every T allowed (default: SHAPES below, "
                    "bf16 at one 16-byte vector of steps)")
p.add_argument("--prefetch", default="0,1", help="the scan's PREFETCH modes to sweep (2: B, C as words, bf16)")
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
A = -torch.rand(di, n, device=dev) - 0.5
D, bias = torch.randn(di, device=dev), torch.randn(di, device=dev) * 0.1
y = torch.empty_like(u)
w_x = torch.randn(r + 2 * n, di, device=dev, dtype=bf16) * di ** -0.5
# the earlier form: bf16 B, C in columns, z in both directions
x_cols = w_x @ u.permute(1, 0, 2).reshape(di, -1)  # (R + 2N, B*Lp)
Bb, Cb = (x_cols[r + j * n:r + (j + 1) * n].view(n, batch, lp).permute(1, 0, 2) for j in (0, 1))
for reverse in (False, True) if "scan" in args.parts else ():
    ms = do_bench(lambda: scan_inference(u, delta, A, Bb, Cb, D, z, bias, True, out=y, reverse=reverse),
                  warmup=5, rep=30)
    emit(dict(part="scan_bf16_bc_baseline", reverse=reverse, ms=round(ms, 4)))
# the padded path's form: x_proj's output (B, R + 2N, Lp), in fp32 or (to compare) bf16
x_dbl = torch.matmul(w_x.float(), u.float())  # (B, R + 2N, Lp) fp32
y_f = torch.randn_like(u)
dt = torch.nn.functional.softplus(delta.float() + bias[:, None]).to(bf16)  # Δ as x_proj_delta hands it over
# (NL lanes over states, channels per program, warps, steps per chunk): several channels per
# thread (BLOCK_D > 32 / NL per warp) share each thread's B and C registers
SHAPES = [(2, 16, 1, 4), (2, 32, 1, 4), (2, 64, 2, 4), (1, 64, 1, 2), (4, 32, 1, 4), (4, 16, 1, 4), (1, 32, 1, 4),
          (2, 16, 1, 8), (2, 32, 1, 8), (4, 32, 1, 8), (4, 16, 1, 8)]
for bc in args.bc.split(","):
    xb = x_dbl if bc == "fp32" else x_dbl.to(bf16)
    B_, C_ = xb[:, r:r + n], xb[:, r + n:]
    t_max = 16 // xb.element_size()
    for reverse in (False, True) if "scan" in args.parts else ():
        extra = dict(z=z, add=y_f, out_scale=0.5) if reverse else dict(z=None, add=None, out_scale=1.0)
        run = lambda lanes: scan_inference(u, dt, A, B_, C_, D, extra["z"], out=y, reverse=reverse,  # noqa: E731
                                           add=extra["add"], out_scale=extra["out_scale"], fixed_bc_stride=True,
                                           lanes=lanes)
        best = None
        modes = [int(m) for m in args.prefetch.split(",") if m != "2" or (bc == "bf16" and not reverse)]
        configs = [dict(NL=nl, BLOCK_D=bd, num_warps=warps, T=t, STAGES=1, PREFETCH=prefetch)
                   for (nl, bd, warps, t), prefetch in itertools.product(args.shapes or SHAPES, modes)
                   if t <= t_max and (bc == "fp32" or t == t_max or args.shapes)]
        for lanes in configs:  # the launcher's cap with words (past 168 registers Vim-Ti's programs take two waves)
            lanes.update(maxnreg=168) if lanes["PREFETCH"] == 2 else None
        for lanes in configs:
            try:
                ms = do_bench(lambda: run(lanes), warmup=5, rep=30)
            except Exception as e:  # noqa: BLE001 (a shape that does not compile is skipped)
                print(lanes, "fail", type(e).__name__, str(e)[:200], flush=True)
                continue
            row = dict(part="scan", bc=bc, reverse=reverse, **lanes, ms=round(ms, 4))
            emit(row)
            best = row if best is None or row["ms"] < best["ms"] else best
        default = do_bench(lambda: run(None), warmup=5, rep=30)
        emit(dict(part="scan", bc=bc, reverse=reverse, best=best, default_ms=round(default, 4)))
if "gemm" in args.parts:
    emit(dict(part="x_proj", out="bf16", ms=round(do_bench(lambda: w_x @ u.permute(1, 0, 2).reshape(di, -1),
                                                       warmup=5, rep=30), 4)))
    emit(dict(part="x_proj", out="fp32", ms=round(do_bench(
        lambda: torch.ops.aten.bmm.dtype(w_x.expand(batch, *w_x.shape), u, torch.float32), warmup=5, rep=30), 4)))

x_rows = torch.randn(batch, lp, di, device=dev, dtype=bf16)
w = torch.randn(2 * di, 4, device=dev)  # both directions' conv weights
cb = torch.randn(2 * di, device=dev)
u2 = torch.empty(2 * di, batch, lp, device=dev, dtype=bf16).permute(1, 0, 2)
# tiles x a register cap: at 32 x 128 x 4 the conv takes 144 registers, which holds an SM to
# three programs (12 warps; Nsight Compute)
CONV_TILES = [(32, 128, 4), (32, 128, 8), (16, 128, 4), (32, 64, 4), (64, 64, 4), (64, 128, 8), (16, 64, 2)]
for (bl, bd, warps), cap in itertools.product(CONV_TILES, (None, 128, 96, 80, 64)) if "conv" in args.parts else ():
    try:
        ms = do_bench(lambda: bidirectional_conv(x_rows, w, cb, length, u2, block=(bl, bd, warps, cap)), warmup=5,
                      rep=30)
    except Exception as e:  # noqa: BLE001 (a shape that does not compile is skipped)
        print((bl, bd, warps, cap), "fail", type(e).__name__, str(e)[:200], flush=True)
        continue
    emit(dict(part="conv", BLOCK_L=bl, BLOCK_D=bd, warps=warps, maxnreg=cap, ms=round(ms, 4)))
if "convtime" in args.parts:
    # the conv from time rows (B, D, Lp), no transposing store, against token rows above; and the
    # products that make x in each layout (in_proj's x half)
    x_time = torch.randn(batch, di, lp, device=dev, dtype=bf16)
    u2b = torch.empty(batch, 2 * di, lp, device=dev, dtype=bf16)
    emit(dict(part="convtime", form="token rows (32, 128, 4)", ms=round(do_bench(
        lambda: bidirectional_conv(x_rows, w, cb, length, u2b), warmup=5, rep=30), 4)))
    # measured: (4, 32, 4) 0.193 ms, (16, 8, 4) 0.21, every other of (32|64|128, 2-16, 2-8) 0.50-0.66;
    # then longer runs of each row a program (fewer channels, more steps)
    for bd_, runs, warps in [(4, 32, 4), (2, 64, 4), (1, 128, 4), (2, 128, 8), (4, 64, 4), (4, 64, 8), (1, 64, 2),
                             (2, 32, 2), (8, 16, 4), (8, 32, 8)]:
        try:
            ms = do_bench(lambda: bidirectional_conv(x_time.transpose(1, 2), w, cb, length, u2b,
                                                     block=(bd_, runs, warps)), warmup=5, rep=30)
        except Exception as e:  # noqa: BLE001 (a shape that does not compile is skipped)
            print((bd_, runs, warps), "fail", type(e).__name__, str(e)[:200], flush=True)
            continue
        emit(dict(part="convtime", BLOCK_D=bd_, runs=runs, warps=warps, ms=round(ms, 4)))
    hidden = torch.randn(batch, lp, 192, device=dev, dtype=bf16)
    w_in = torch.randn(di, 192, device=dev, dtype=bf16)
    emit(dict(part="convtime", form="in_proj x as token rows (mm)", ms=round(do_bench(
        lambda: torch.nn.functional.linear(hidden.view(-1, 192), w_in), warmup=5, rep=30), 4)))
    emit(dict(part="convtime", form="in_proj x as time rows (bmm)", ms=round(do_bench(
        lambda: torch.bmm(w_in.expand(batch, di, 192), hidden.transpose(1, 2)), warmup=5, rep=30), 4)))
if "layout" in args.parts:
    # the padded path keeps u, z and y as columns (C, B*Lp): one program's channel rows lie B*Lp
    # steps apart (526 KB at 1024 px). The same kernels into batch-major (B, C, Lp) buffers, where
    # they lie Lp apart: whether the spread of each program's rows over memory costs time
    u2_batch_major = torch.empty(batch, 2 * di, lp, device=dev, dtype=bf16)
    for name, buf in (("columns (2D, B, Lp)", u2), ("batch-major (B, 2D, Lp)", u2_batch_major)):
        emit(dict(part="layout", kernel="conv", out=name, ms=round(do_bench(
            lambda: bidirectional_conv(x_rows, w, cb, length, buf), warmup=5, rep=30), 4)))
    x_bc = torch.randn(batch, r + 2 * n, lp, device=dev, dtype=bf16)
    Bl, Cl = x_bc[:, r:r + n], x_bc[:, r + n:]
    dtl = (torch.rand(batch, di, lp, device=dev) * 0.1).to(bf16)
    for name, make in (("columns", cols), ("batch-major", lambda c: torch.randn(batch, c, lp, device=dev, dtype=bf16))):
        ul, zl, yl = make(di), make(di), make(di)
        for reverse in (False, True):
            extra = dict(z=zl, add=yl, out_scale=0.5) if reverse else dict(z=None, add=None, out_scale=1.0)
            emit(dict(part="layout", kernel="scan", reverse=reverse, u_z_y=name, ms=round(do_bench(
                lambda: scan_inference(ul, dtl, A, Bl, Cl, D, extra["z"], out=yl, reverse=reverse, add=extra["add"],
                                       out_scale=extra["out_scale"], fixed_bc_stride=True), warmup=5, rep=30), 4)))

if "xproj" in args.parts:
    # Δ and B, C from one read of u (x_proj_delta) against x_proj's bmm alone (measured: bmm + the
    # dt_softplus kernel it replaced 0.1527 ms, x_proj_delta 0.1497-0.1596 over these tiles)
    ub = torch.randn(batch, di, lp, device=dev, dtype=bf16)
    w_dt = (torch.randn(di, r, device=dev) * r ** -0.5).to(bf16)
    delta_buf = torch.empty(batch, di, lp, device=dev, dtype=bf16)
    ref_delta, ref_bc = (t.float() for t in x_proj_delta(ub, w_x, w_dt, bias, n, block=(64, 64, 64, 4)))
    emit(dict(part="xproj", form="x_proj bmm alone", ms=round(do_bench(lambda: torch.matmul(w_x, ub), warmup=5,
                                                                       rep=30), 4)))
    for tile in [None, (64, 64, 128, 4), (64, 128, 128, 4), (64, 32, 128, 4), (128, 64, 128, 4), (128, 64, 128, 8),
                 (128, 64, 64, 4), (32, 64, 128, 4), (32, 128, 64, 4), (64, 64, 64, 4), (64, 64, 128, 8),
                 (64, 64, 128, 4, 2), (64, 64, 128, 4, 4), (128, 128, 128, 8), (64, 128, 64, 4, 2)]:
        try:
            ms = do_bench(lambda: x_proj_delta(ub, w_x, w_dt, bias, n, delta_out=delta_buf, block=tile),
                          warmup=5, rep=30)
            got_delta, got_bc = x_proj_delta(ub, w_x, w_dt, bias, n, block=tile)
        except Exception as e:  # noqa: BLE001 (a shape that does not compile is skipped)
            print(tile, "fail", type(e).__name__, str(e)[:200], flush=True)
            continue
        emit(dict(part="xproj", block=tile, ms=round(ms, 4),
                  err_delta=round((got_delta.float() - ref_delta).abs().max().item(), 5),
                  err_bc=round((got_bc.float() - ref_bc).abs().max().item(), 5)))
if "patchify" in args.parts:
    # the batch's images (fp32) into bf16 patch rows (B, M, 3*16*16): torch's permuting copy against
    # the Triton kernel over its tiles (patches a program, warps)
    img = torch.randn(batch, 3, args.px, args.px, device=dev)
    g = args.px // 16
    rows = torch.empty(batch, g * g, 768, device=dev, dtype=bf16)
    emit(dict(part="patchify", form="torch permuting copy", ms=round(do_bench(lambda: rows.view(batch, g, g, 3, 16, 16).copy_(
        img.reshape(batch, 3, g, 16, g, 16).permute(0, 2, 4, 1, 3, 5)), warmup=5, rep=30), 4)))
    for tile in [None, (2, 4), (4, 4), (8, 4), (8, 8), (16, 8), (4, 2)]:
        emit(dict(part="patchify", block=tile, ms=round(do_bench(lambda: patchify(img, 16, bf16, block=tile), warmup=5,
                                                                 rep=30), 4)))
