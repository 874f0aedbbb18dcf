"""Vision Mamba's padded inference path: both scan directions over the tokens as they lie.

The anti-causal conv and the reversed scan are checked against the causal references run on
flipped inputs; the whole layer, and the encoder that pads for it, against the readable
two-direction reference. On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py)."""

from __future__ import annotations

import pytest
import torch

from mambakit.models.vision import create_model
from mambakit.modules.bimamba import BiMamba
from mambakit.ops.reference import selective_scan_ref
from mambakit.ops.triton.bidirectional import bidirectional_conv, bidirectional_conv_ref
from mambakit.ops import knobs
from mambakit.ops.triton.scan_launch import scan_fwd, scan_inference
from mambakit.ops.triton.x_proj_delta import x_proj_delta, x_proj_delta_ref
from tests.scan_inputs import padded_scan_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _columns(batch: int, dim: int, padded: int, g: torch.Generator) -> torch.Tensor:
    """A (B, D, Lp) view of a (D, B*Lp) column buffer: the layout of the padded path."""
    return torch.randn(dim, batch, padded, generator=g).to(DEVICE).permute(1, 0, 2)


def _token_rows(batch: int, padded: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """(B, Lp, D) token rows inside a wider buffer (in_proj's output rows hold more channels)."""
    return torch.randn(batch, padded, dim + 5, generator=g).to(DEVICE)[..., 2:dim + 2]


@pytest.mark.parametrize("layout", ["token_rows", "time_rows"])
@pytest.mark.parametrize("length,padded,bias,dim", [(13, 16, True, 8), (16, 16, True, 8), (17, 32, False, 8),
                                                     (2, 16, True, 8), (100, 112, True, 16), (90, 96, False, 24),
                                                     (100, 112, True, 64)])
def test_bidirectional_conv_is_two_causal_convs(length, padded, bias, dim, layout):
    """Short rows take the masked edge tiles only; (100, 16 channels) also the unmasked inner
    tiles of token rows (32 steps, all 16 channels, the halo inside) and (100, 64 channels)
    those of time rows (32 steps, 32 channels, a run of 8 steps either side inside); 24 channels
    a partial channel block. Token rows: x (B, Lp, D) with channels contiguous; time rows: a
    view of (B, D, Lp), each thread's taps taken from the runs of 8 steps around its own."""
    g = torch.Generator().manual_seed(length)
    batch, width = 2, 4
    if layout == "token_rows":
        x = _token_rows(batch, padded, dim, g)
    else:
        x = torch.randn(batch, dim + 3, padded, generator=g).to(DEVICE)[:, 1:dim + 1].transpose(1, 2)
    x[:, length:] = 1e3  # padding steps: must never be read
    w = torch.randn(2 * dim, width, generator=g).to(DEVICE)  # forward, then backward direction
    b = torch.randn(2 * dim, generator=g).to(DEVICE) if bias else None
    out = torch.full((2 * dim, batch, padded), float("nan"), device=DEVICE).permute(1, 0, 2)
    bidirectional_conv(x, w, b, length, out)
    want = bidirectional_conv_ref(x, w, b, length)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert (out[..., length:] == 0).all()  # the backward scan meets these first: zero input
    # the backward half is anti-causal: its first step sees the next ones, the forward half's does not
    x2 = x.clone()
    x2[:, min(1, length - 1)] += 1.0
    out2 = torch.empty_like(out)
    bidirectional_conv(x2, w, b, length, out2)
    if length > 1:
        assert not torch.allclose(out2[:, dim:, 0], out[:, dim:, 0])
        torch.testing.assert_close(out2[:, :dim, 0], out[:, :dim, 0])


@pytest.mark.parametrize("block", [(4, 2, 1), (16, 2, 4), (2, 4, 2), (8, 1, 2)])
@pytest.mark.parametrize("length,padded,dim", [(100, 112, 24), (112, 112, 16), (40, 48, 8)])
def test_bidirectional_conv_time_rows_over_its_tiles(block, length, padded, dim):
    """The conv from time rows with small tiles (channels, runs of 8 steps, warps), so that the
    kernel meets every kind of tile: the masked first tile of a row, unmasked inner tiles (a run
    either side inside the sequence), masked last ones and partial channel blocks (24 channels in
    blocks of 16). The default tile (256 steps) has no inner tile at these lengths."""
    g = torch.Generator().manual_seed(length + dim)
    x = torch.randn(2, dim + 3, padded, generator=g).to(DEVICE)[:, 1:dim + 1].transpose(1, 2)  # (B, Lp, D) view
    x[:, length:] = 1e3  # padding steps: must never be read
    w = torch.randn(2 * dim, 4, generator=g).to(DEVICE)
    b = torch.randn(2 * dim, generator=g).to(DEVICE)
    out = torch.full((2, 2 * dim, padded), float("nan"), device=DEVICE)
    bidirectional_conv(x, w, b, length, out, block=block)
    torch.testing.assert_close(out, bidirectional_conv_ref(x, w, b, length), rtol=1e-5, atol=1e-5)


def test_bidirectional_conv_bad_input():
    x = torch.randn(2, 16, 4, device=DEVICE)
    w = torch.randn(8, 4, device=DEVICE)
    out = torch.empty(2, 8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="out must be"):
        bidirectional_conv(x, w, None, 16, torch.empty(2, 4, 16, device=DEVICE))
    with pytest.raises(ValueError, match="length 17"):
        bidirectional_conv(x, w, None, 17, out)
    with pytest.raises(ValueError, match="weight must be"):
        bidirectional_conv(x, w[:4], None, 16, out)
    with pytest.raises(ValueError, match="bias must be"):
        bidirectional_conv(x, w, torch.randn(4, device=DEVICE), 16, out)
    with pytest.raises(ValueError, match="unit stride along D or along L"):
        bidirectional_conv(torch.randn(2, 32, 8, device=DEVICE)[:, ::2, ::2], w, None, 16, out)
    with pytest.raises(ValueError, match="out must be .* with unit stride along L"):
        bidirectional_conv(x, w, None, 16, out.transpose(1, 2).contiguous().transpose(1, 2))
    time_rows = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, Lp, D) over (B, D, Lp)
    with pytest.raises(ValueError, match="width must be 4"):
        bidirectional_conv(time_rows, torch.randn(8, 3, device=DEVICE), None, 16, out)
    with pytest.raises(ValueError, match="16-byte aligned runs"):
        bidirectional_conv(torch.randn(2, 4, 20, device=DEVICE).transpose(1, 2), w, None, 20,
                           torch.empty(2, 8, 20, device=DEVICE))


@pytest.mark.parametrize("length,prefetch", [(45, False), (32, False), (45, True)])
def test_reversed_scan_is_the_flipped_causal_scan(length, prefetch):
    """scan_inference(reverse=True) runs from step L-1 down to 0: the causal reference on the
    time-flipped inputs, flipped back; final_state is the state after step 0. L = 45 leaves a
    partial chunk at the end, which the reversed scan meets first."""
    g = torch.Generator().manual_seed(length)
    batch, dim, n = 2, 8, 4
    u, delta, z = (_columns(batch, dim, length, g) for _ in range(3))
    delta = delta * 0.5
    A = -torch.rand(dim, n, generator=g).to(DEVICE) - 0.2
    B, C = (torch.randn(batch, n, length, generator=g).to(DEVICE) for _ in range(2))
    D, bias = (torch.randn(dim, generator=g).to(DEVICE) for _ in range(2))
    lanes = {"PREFETCH": prefetch}  # prefetch: the chunk before is loaded ahead
    y, final = scan_inference(u, delta, A, B, C, D, z, bias, True, reverse=True, lanes=lanes)
    want, want_final = selective_scan_ref(u.flip(-1), delta.flip(-1), A, B.flip(-1), C.flip(-1), D, z.flip(-1),
                                          bias, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(y, want.flip(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, want_final, rtol=1e-4, atol=1e-4)
    causal = selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert not torch.allclose(y, causal, atol=1e-2)  # the direction is seen
    # written over its input, as the padded path does
    u2 = u.clone()
    scan_inference(u2, delta, A, B, C, D, z, bias, True, out=u2, reverse=True, lanes=lanes)
    torch.testing.assert_close(u2, y, rtol=0, atol=0)
    with pytest.raises(TypeError, match="reverse"):  # the training launcher scans forward only
        scan_fwd(u, delta, A, B, C, D, z, bias, None, True, None, True, reverse=True)


def test_reversed_scan_with_few_rows_flips_around_the_segmented_forward(monkeypatch):
    """Where the forward scan would cut few long rows into segments, the reversed one runs as
    the segmented forward scan of the flipped inputs (the reversed kernel has no segments)."""
    from mambakit.ops.triton import scan_launch
    from mambakit.ops.triton.scan_plan import plan_scan
    g = torch.Generator().manual_seed(5)
    batch, dim, n, length = 1, 4, 4, 200
    u, delta, z = (torch.randn(batch, dim, length, generator=g).to(DEVICE) for _ in range(3))
    A = -torch.rand(dim, n, generator=g).to(DEVICE) - 0.2
    B, C = (torch.randn(batch, n, length, generator=g).to(DEVICE) for _ in range(2))
    D, bias = (torch.randn(dim, generator=g).to(DEVICE) for _ in range(2))
    calls = []
    real = scan_launch._reverse_by_flipping
    monkeypatch.setattr(scan_launch, "_reverse_by_flipping", lambda *a: calls.append(1) or real(*a))
    out = torch.empty_like(u)
    with knobs.override(scan_min_seg=64):  # 200 steps in two segments
        assert plan_scan(u, B, A).forward.seg_len  # the forward scan would cut them
        y, final = scan_inference(u, delta * 0.5, A, B, C, D, z, bias, True, out=out, reverse=True)
    assert calls == [1] and y is out
    want, want_final = selective_scan_ref(u.flip(-1), (delta * 0.5).flip(-1), A, B.flip(-1), C.flip(-1), D,
                                          z.flip(-1), bias, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(y, want.flip(-1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(final, want_final, rtol=1e-4, atol=1e-4)


def test_x_proj_delta_softplus_at_both_ends():
    """Large arguments (softplus(x) = x) and very negative ones (its series branch) through the
    dt projection: dt_low's first row is u's first channel (x_proj row 0 picks it), and every
    channel's dt weight on it is 1."""
    g = torch.Generator().manual_seed(5)
    dim, rank, n, length = 8, 3, 4, 21
    u = torch.randn(2, dim, length, generator=g).to(DEVICE) * 2
    u[0, 0, :4] = 200.0
    u[1, 0, :4] = -200.0
    wx = torch.randn(rank + 2 * n, dim, generator=g).to(DEVICE) * 0.1
    wx[0] = 0.0
    wx[0, 0] = 1.0
    wdt = torch.randn(dim, rank, generator=g).to(DEVICE) * 0.1
    wdt[:, 0] = 1.0
    b = torch.randn(dim, generator=g).to(DEVICE)
    delta, _ = x_proj_delta(u, wx, wdt, b, n)
    want, _ = x_proj_delta_ref(u, wx, wdt, b, n)
    torch.testing.assert_close(delta, want, rtol=1e-5, atol=1e-6)
    assert (delta[0, :, :4] > 20).all() and (delta[1, :, :4] < 1e-10).all()  # both ends of the softplus were met


def test_x_proj_delta_softplus_relative_error_over_the_whole_line():
    """The softplus against float64 over arguments from -87 (Δ near fp32's smallest normal) to
    60: relative error within 6e-6 plus what rounding the fp32 argument itself costs e^x (|x|
    ulp), so a small Δ keeps its low bits (a form through 1 + e^x alone would lose them all below
    x = -17). The worst, 2.5e-6 under the CPU interpreter, is just above x = -4, where the
    softplus leaves its series for log2(1 + e). One channel, rank 1: Δ = softplus(u)."""
    x = torch.linspace(-87.0, 60.0, 4096, device=DEVICE).view(1, 1, -1)  # (B, D=1, L)
    wx = torch.zeros(1 + 2 * 4, 1, device=DEVICE)
    wx[0, 0] = 1.0
    got = x_proj_delta(x, wx, torch.ones(1, 1, device=DEVICE), None, 4)[0].double().flatten()
    want = torch.nn.functional.softplus(x.double()).flatten()
    rel = ((got - want).abs() / want).cpu()
    bound = 6e-6 + x.double().abs().flatten().cpu() * 2 ** -23
    worst = rel.argmax()
    assert (rel <= bound).all(), f"worst relative error {rel[worst].item():.3g} at x = {x.flatten()[worst].item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,rank,n,length,bias", [(24, 3, 4, 40, True), (64, 12, 16, 48, False),
                                                    (130, 20, 16, 80, True)])
def test_x_proj_delta_is_x_proj_then_the_dt_projection(dim, rank, n, length, bias, dtype):
    """Δ and B, C from one read of u against x_proj's product and the dt projection's softplus in
    fp32 (the dt rows rounded to u's dtype, as x_proj's output is): channels past one product step (64) and not a multiple of it, ranks below and above 16,
    d_state below 16, steps not a multiple of the block; u a view with a row stride past L, and
    the outputs written into given views."""
    g = torch.Generator().manual_seed(dim + rank)
    u = torch.randn(2, dim, length + 5, generator=g)[..., 2:length + 2].to(DEVICE).to(dtype)
    wx = (torch.randn(rank + 2 * n, dim, generator=g) * dim ** -0.5).to(DEVICE).to(dtype)
    wdt = (torch.randn(dim, rank, generator=g) * rank ** -0.5).to(DEVICE).to(dtype)
    b = (torch.randn(dim, generator=g) * 0.5 - 1).to(DEVICE) if bias else None
    delta_out = torch.full((2, dim, length + 3), float("nan"), device=DEVICE, dtype=dtype)[..., :length]
    delta, bc = x_proj_delta(u, wx, wdt, b, n, delta_out=delta_out)
    assert delta is delta_out and bc.shape == (2, 2 * n, length)
    want_delta, want_bc = x_proj_delta_ref(u, wx, wdt, b, n)
    # bf16: the interpreter truncates where the GPU rounds (twice: the dt rows, then Δ)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(delta.float(), want_delta, **tol)
    torch.testing.assert_close(bc.float(), want_bc, **tol)
    # x_proj's own product (torch) for B and C
    torch.testing.assert_close(bc.float(), torch.matmul(wx, u).float()[:, rank:], **tol)


def test_x_proj_delta_bad_input():
    u = torch.randn(2, 16, 32, device=DEVICE)
    wx, wdt = torch.randn(3 + 8, 16, device=DEVICE), torch.randn(16, 3, device=DEVICE)
    with pytest.raises(ValueError, match="x_proj_weight"):
        x_proj_delta(u, wx[:, :15], wdt, None, 4)
    with pytest.raises(ValueError, match="R >= 1"):
        x_proj_delta(u, wx, wdt, None, 6)  # no rows left for dt's rank
    with pytest.raises(ValueError, match="dt_weight"):
        x_proj_delta(u, wx, wdt[:, :2].contiguous(), None, 4)
    with pytest.raises(ValueError, match="must match"):
        x_proj_delta(u.double(), wx.double(), wdt, None, 4)
    with pytest.raises(ValueError, match="unit stride"):
        x_proj_delta(u.transpose(1, 2).contiguous().transpose(1, 2), wx, wdt, None, 4)
    with pytest.raises(ValueError, match="delta_out"):
        x_proj_delta(u, wx, wdt, None, 4, delta_out=torch.empty(2, 16, 31, device=DEVICE))


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_adds_another_output_and_scales_before_the_gate(reverse):
    """out = scale * (y + D u + add) * SiLU(z), add read before the same chunk of out is written (so
    it may be out itself); B and C as the padded path makes them: fp32 slices of one x_proj
    buffer, with their state stride compiled in (fixed_bc_stride)."""
    g = torch.Generator().manual_seed(11 + reverse)
    batch, dim, n, length = 2, 8, 4, 32
    u, delta, z, add = (_columns(batch, dim, length, g) for _ in range(4))
    delta = delta * 0.5
    A = -torch.rand(dim, n, generator=g).to(DEVICE) - 0.2
    x_dbl = torch.randn(batch, 3 + 2 * n, length, generator=g).to(DEVICE)  # (B, R + 2N, L)
    B, C = x_dbl[:, 3:3 + n], x_dbl[:, 3 + n:]
    D, bias = (torch.randn(dim, generator=g).to(DEVICE) for _ in range(2))
    flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)  # noqa: E731
    plain = flip(selective_scan_ref(flip(u), flip(delta), A, flip(B), flip(C), D, None, bias, delta_softplus=True))
    want = 0.5 * (plain + add) * torch.nn.functional.silu(z)
    y, _ = scan_inference(u, delta, A, B, C, D, z, bias, True, reverse=reverse, add=add, out_scale=0.5,
                          fixed_bc_stride=True)
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)
    inplace = add.clone()
    scan_inference(u, delta, A, B, C, D, z, bias, True, reverse=reverse, add=inplace, out=inplace, out_scale=0.5,
                   fixed_bc_stride=True)
    torch.testing.assert_close(inplace, y, rtol=0, atol=0)
    ungated, _ = scan_inference(u, delta, A, B, C, D, None, bias, True, reverse=reverse)
    torch.testing.assert_close(ungated, plain, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="add has shape"):
        scan_inference(u, delta, A, B, C, D, z, bias, True, add=add[..., :16])


@pytest.mark.gpu
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("batch,dim,n,length",
                         [(24, 384, 16, 64), (4, 64, 4, 64), (24, 384, 4, 64), (4, 64, 16, 40)],
                         ids=["vim_tiny_tile", "d_state_4", "d_state_4_many_rows", "length_40"])
def test_scan_at_vim_tiny_tile_shape_matches_reference(reverse, batch, dim, n, length):
    """The tile the launcher picks for Vim-Ti's batches (more than 8192 rows: 2 lanes over 16
    states, 16 channels a warp, 8 bf16 steps a chunk, register prefetch), in the padded path's
    form: forward ungated, reversed with the forward's output added and the gate, against the
    fp32 reference on the same bf16 inputs. Also two bf16 shapes where the launcher reads the
    reversed chunk's carried state with the masked sum (ORDERED off): d_state 4 (a thread does
    not hold all its states) and 40 steps (rows not a multiple of 16). That read was found wrong
    on sm_90 when forced where a thread holds all its states."""
    g = torch.Generator().manual_seed(3 + reverse)
    r = 12
    bf = torch.bfloat16
    u, z, add = (_columns(batch, dim, length, g).to(bf) for _ in range(3))
    delta = torch.nn.functional.softplus(_columns(batch, dim, length, g) * 0.5 - 2).to(bf)
    A = -torch.rand(dim, n, generator=g).to(DEVICE) - 0.2
    x_dbl = torch.randn(batch, r + 2 * n, length, generator=g).to(DEVICE).to(bf)
    B, C = x_dbl[:, r:r + n], x_dbl[:, r + n:]
    D = torch.randn(dim, generator=g).to(DEVICE)
    if reverse:
        want = padded_scan_ref(u, delta, A, B, C, D, z, add, reverse=True, out_scale=0.5)
        y, _ = scan_inference(u, delta, A, B, C, D, z, reverse=True, add=add, out_scale=0.5, fixed_bc_stride=True)
    else:
        want = padded_scan_ref(u, delta, A, B, C, D)
        y, _ = scan_inference(u, delta, A, B, C, D, fixed_bc_stride=True)
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)


def test_bf16_words_prefetch_equals_the_plain_loads(monkeypatch):
    """With bf16 B and C in rows that allow it (unit stride along time, 4-byte aligned, whole
    chunks) the padded path's forward scan loads them a chunk ahead as 32-bit words of two
    steps (PREFETCH 2) and widens them in registers; the result must equal the plain loads
    (PREFETCH 0) and the prefetch of raw values (1) exactly, and the fp32 reference to bf16
    rounding. B and C one step off alignment take the raw prefetch, and so does the reversed
    scan unless its rows are 16-byte aligned (its words read wrong steps on sm_90 at rows only
    4-byte aligned; right at 16-byte aligned ones)."""
    from mambakit.ops.triton import scan_launch
    g = torch.Generator().manual_seed(21)
    batch, dim, n, length, bf = 2, 16, 16, 32, torch.bfloat16
    u, z = (_columns(batch, dim, length, g).to(bf) for _ in range(2))
    delta = (torch.rand(dim, batch, length, generator=g).to(DEVICE) * 0.5).to(bf).permute(1, 0, 2)
    A = -torch.rand(dim, n, generator=g).to(DEVICE) - 0.2
    x_dbl = torch.randn(batch, 3 + 2 * n + 1, length + 2, generator=g).to(DEVICE).to(bf)  # (B, R + 2N + 1, L + 2)
    D = torch.randn(dim, generator=g).to(DEVICE)
    chosen = []
    real = scan_launch.launch
    monkeypatch.setattr(scan_launch, "launch",
                        lambda k, grid, a, kw: chosen.append(kw.get("PREFETCH")) or real(k, grid, a, kw))

    def run(B, C, lanes=None, **kw):
        return scan_inference(u, delta, A, B, C, D, fixed_bc_stride=True, lanes=lanes, **kw)[0]

    B, C = x_dbl[:, 3:3 + n, :length], x_dbl[:, 3 + n:3 + 2 * n, :length]
    y = run(B, C)
    assert chosen == [2]
    for mode in (0, 1):
        torch.testing.assert_close(run(B, C, {"PREFETCH": mode}), y, rtol=0, atol=0)
    want = selective_scan_ref(u.float(), delta.float(), A, B.float(), C.float(), D, None, None)
    torch.testing.assert_close(y.float(), want, rtol=2e-2, atol=2e-2)
    chosen.clear()
    B1, C1 = x_dbl[:, 3:3 + n, 1:length + 1], x_dbl[:, 4 + n:4 + 2 * n, 1:length + 1]  # one bf16 step off a word
    torch.testing.assert_close(run(B1, C1), run(B1, C1, {"PREFETCH": 0}), rtol=0, atol=0)
    run(B, C, reverse=True)  # rows 34 steps apart: 4-byte aligned only
    assert chosen == [1, 0, 1]
    # the reversed scan takes words where the rows are 16-byte aligned (x_proj's own output)
    x16 = torch.randn(batch, 3 + 2 * n, length, generator=g).to(DEVICE).to(bf)
    B16, C16 = x16[:, 3:3 + n], x16[:, 3 + n:]
    chosen.clear()
    y_rev = run(B16, C16, reverse=True)
    assert chosen == [2]
    for mode in (0, 1):
        torch.testing.assert_close(run(B16, C16, {"PREFETCH": mode}, reverse=True), y_rev, rtol=0, atol=0)
    flip = lambda t: t.flip(-1).float()  # noqa: E731
    want = selective_scan_ref(flip(u), flip(delta), A, flip(B16), flip(C16), D, None, None).flip(-1)
    torch.testing.assert_close(y_rev.float(), want, rtol=2e-2, atol=2e-2)


def _bimamba(d_model: int = 12, seed: int = 0, divide_out: bool = True, d_conv: int = 4,
             bias: bool = False) -> BiMamba:
    torch.manual_seed(seed)
    bi = BiMamba(d_model, d_state=8, divide_out=divide_out, d_conv=d_conv, bias=bias).to(DEVICE)
    with torch.no_grad():
        for p in bi.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return bi


@pytest.mark.parametrize("length,divide_out,d_conv,bias",
                         [(21, True, 4, False), (32, False, 4, False), (1, True, 4, False), (21, True, 3, False),
                          (21, True, 4, True), (17, True, 3, True)])
def test_padded_inference_equals_the_two_direction_reference(length, divide_out, d_conv, bias, monkeypatch):
    """Width 4 (Vim's) takes the conv over time rows (x and z from one product, Δ written over x);
    another width, the conv over token rows. `bias`: in_proj and out_proj with their biases."""
    bi = _bimamba(divide_out=divide_out, d_conv=d_conv, bias=bias)
    bi.backend = "triton"
    h = torch.randn(3, length, 12, device=DEVICE)
    calls = []
    real = bi._padded_inference
    monkeypatch.setattr(bi, "_padded_inference", lambda x, n: calls.append((x.shape[1], n)) or real(x, n))
    with torch.no_grad():
        want = bi(h, fused=False)
        got = bi(h)
    assert calls == [(-(-length // 16) * 16, length)]
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_padded_weights_are_made_again_when_a_parameter_changes():
    """The padded path keeps its derived weights (stacked, cast, A = -exp(A_log)) between calls
    and makes them again after any in-place change of a parameter, so an updated model never
    runs on stale weights."""
    from mambakit.modules.bimamba import padded_weights
    bi = _bimamba()
    bi.backend = "triton"
    h = torch.randn(2, 16, 12, device=DEVICE)
    with torch.no_grad():
        first = bi(h)
        w1 = padded_weights(bi, torch.float32)
        assert padded_weights(bi, torch.float32) is w1  # kept between calls
        bi.A_b_log.add_(0.5)  # an optimizer step or load_state_dict writes in place
        assert padded_weights(bi, torch.float32) is not w1
        got = bi(h)
        torch.testing.assert_close(got, bi(h, fused=False), rtol=2e-5, atol=2e-5)
        assert not torch.allclose(got, first, atol=1e-4)
    with torch.inference_mode():  # a model made under inference_mode: no version counters, no cache
        made_there = _bimamba()
        made_there.backend = "triton"
        torch.testing.assert_close(made_there(h), made_there(h, fused=False), rtol=2e-5, atol=2e-5)
        assert made_there.__dict__.get("_padded_weights") is None


def test_padding_never_reaches_the_true_steps():
    """Given `length`, the steps after it are padding: whatever they hold, the first `length`
    outputs are the reference's on the true steps (both directions: the backward scan starts
    in the padding)."""
    bi = _bimamba()
    bi.backend = "triton"
    h = torch.randn(2, 32, 12, device=DEVICE)
    with torch.no_grad():
        want = bi(h[:, :19], fused=False)
        h[:, 19:] = 50.0 * torch.randn(2, 13, 12, device=DEVICE)
        got = bi(h, length=19)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[:, :19], want, rtol=2e-5, atol=2e-5)
        bi.backend = "torch"  # the other paths take the same argument
        torch.testing.assert_close(bi(h, length=19)[:, :19], want, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="length 33"):
        bi(h, length=33)


def test_vision_encoder_pads_once_for_the_triton_path(monkeypatch):
    """The encoder pads 5 tokens (4 patches and the class token) to 16 once, runs every layer
    on the padded rows, and returns the same features as the unpadded torch path."""
    torch.manual_seed(0)
    model = create_model("vim_tiny", num_classes=5, img_size=16, patch_size=8, d_model=16, n_layer=2).to(DEVICE)
    x = torch.randn(2, 3, 16, 16, device=DEVICE)
    mixers = [m for m in model.modules() if isinstance(m, BiMamba)]
    lengths = []
    for m in mixers:
        real = m._padded_inference
        monkeypatch.setattr(m, "_padded_inference", lambda h, n, real=real: lengths.append((h.shape[1], n)) or real(h, n))
    with torch.no_grad():
        for m in mixers:
            m.backend = "torch"
        want = model.forward_features(x)
        for m in mixers:
            m.backend = "triton"
        got = model.forward_features(x)
    assert lengths == [(16, 5)] * 2
    assert got.shape == want.shape == (2, 5, 16)
    torch.testing.assert_close(got, want, rtol=5e-5, atol=5e-5)
    # forward (class token pooled) runs the final add and norm on that token alone: the same logits
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, model.head(want[:, model.cls_position]), rtol=5e-5, atol=5e-5)
    assert lengths == [(16, 5)] * 4
    # position embeddings that record a gradient keep the unpadded path (its autograd records them)
    model.pos_embed.requires_grad_(True)
    with torch.enable_grad():
        out = model.forward_features(x)
    assert lengths == [(16, 5)] * 4 and out.requires_grad
