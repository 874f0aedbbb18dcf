"""ops.conv_proj_scan: a Mamba mixer's conv -> x_proj -> scan. Its Triton training Function
(_EagerConvProjScan), which holds the conv's input for the backward and runs the conv again
there, must give the outputs and every gradient of the readable composition, and must not hold
the conv output. Under TRITON_INTERPRET=1 on CPU; with the compiled kernels on the device."""

import pytest
import torch

pytest.importorskip("triton")

from mambakit import ops  # noqa: E402
from mambakit.ops import backend as backend_mod  # noqa: E402
from mambakit.ops.triton import scan_op  # noqa: E402
from tests.scan_inputs import count_held  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("x", "conv_weight", "conv_bias", "x_proj_weight", "dt_proj_weight", "A", "D", "z", "delta_bias")


def _inputs(batch=2, dim=8, length=21, d_state=4, rank=3, width=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    kw = dict(
        x=torch.randn(batch, dim, length, generator=g),
        conv_weight=torch.randn(dim, width, generator=g) * 0.5,
        conv_bias=torch.randn(dim, generator=g) * 0.1,
        x_proj_weight=torch.randn(rank + 2 * d_state, dim, generator=g) * 0.4,
        dt_proj_weight=torch.randn(dim, rank, generator=g) * 0.5,
        A=-(torch.rand(dim, d_state, generator=g) * 2 + 0.1),
        D=torch.randn(dim, generator=g),
        z=torch.randn(batch, dim, length, generator=g),
        delta_bias=torch.randn(dim, generator=g) * 0.3 - 1.0,
    )
    return {k: v.to(DEVICE) for k, v in kw.items()}


def _grads(kw, backend, composed=False, cu_seqlens=None, autocast=False, monkeypatch=None):
    """y and every input's gradient; composed: the Triton backend through its composition of ops."""
    leaves = {k: (None if v is None else v.clone().requires_grad_()) for k, v in kw.items()}
    if composed:
        monkeypatch.setattr(scan_op, "EAGER_FUNCTION", False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        y = ops.conv_proj_scan(**leaves, cu_seqlens=cu_seqlens, backend=backend)
    if composed:
        monkeypatch.setattr(scan_op, "EAGER_FUNCTION", True)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, y.dtype)
    (y.float() * gy.float()).sum().backward()
    return y.detach(), {k: None if v is None else v.grad for k, v in leaves.items()}


FP32 = dict(rtol=6e-4, atol=2e-3)


@pytest.mark.parametrize("optionals", [True, False], ids=["all", "none"])
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_outputs_and_every_gradient_match_the_reference_and_the_composition(packed, optionals, monkeypatch):
    """none: no conv bias, D, gate z or delta_bias (an ungated mixer without biases)."""
    kw = _inputs(batch=1 if packed else 2)
    if not optionals:
        kw = {k: (None if k in ("conv_bias", "D", "z", "delta_bias") else v) for k, v in kw.items()}
    cu = torch.tensor([0, 5, 6, 21], dtype=torch.int32, device=DEVICE) if packed else None
    y, g = _grads(kw, "triton", cu_seqlens=cu)
    y_ref, g_ref = _grads(kw, "reference", cu_seqlens=cu)  # the sequential scan and reference conv
    y_ops, g_ops = _grads(kw, "triton", composed=True, cu_seqlens=cu, monkeypatch=monkeypatch)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(y, y_ops, rtol=1e-5, atol=1e-5)
    for name in NAMES:
        if kw[name] is None:
            assert g[name] is None and g_ref[name] is None
            continue
        torch.testing.assert_close(g[name], g_ref[name], **FP32, msg=lambda m, n=name: f"d{n} vs reference: {m}")
        torch.testing.assert_close(g[name], g_ops[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"d{n} vs composition: {m}")


def test_under_autocast_it_matches_the_composition(monkeypatch):
    """bf16 autocast with a bf16 x and fp32 weights, as in the mixer: the backward (outside
    autocast) must form the forward's bf16 projections again."""
    kw = _inputs()
    kw = {k: (v.to(torch.bfloat16) if k in ("x", "z") else v) for k, v in kw.items()}
    y, g = _grads(kw, "triton", autocast=True)
    y_ops, g_ops = _grads(kw, "triton", composed=True, autocast=True, monkeypatch=monkeypatch)
    assert y.dtype == y_ops.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ops, rtol=0, atol=0)
    for name in NAMES:
        assert g[name].dtype == g_ops[name].dtype, name
        # weight gradients: ours sum over the batch in fp32, autograd's in the GEMM's bf16; below
        # du (x and the conv's): ours adds x_proj's part of du inside one GEMM (one rounding),
        # autograd adds two bf16 gradients. Against an fp32 reference both paths err alike (dx
        # 0.30 and 0.30, dconv_weight 0.74 and 0.74, dx_proj_weight 0.32 and 0.33 at these
        # inputs); these bounds are on their difference. The fp32 test above is the tight one.
        loose = name.endswith("proj_weight") or name in ("x", "conv_weight", "conv_bias")
        tol = dict(rtol=2e-2, atol=2e-2) if loose else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(g[name].float(), g_ops[name].float(), **tol, msg=lambda m, n=name: f"d{n}: {m}")


def test_the_backward_holds_the_conv_input_not_its_output(monkeypatch):
    """Every tensor autograd holds for the backward, counted by shape (B, D, L): the composition
    holds x (the conv's), the conv output u (x_proj's and the scan's) and z; the fused Function
    holds x and z only."""
    kw = {k: v.requires_grad_() for k, v in _inputs().items()}
    bdl = tuple(kw["x"].shape)
    fused = count_held(lambda: ops.conv_proj_scan(**kw, backend="triton"), bdl)
    monkeypatch.setattr(scan_op, "EAGER_FUNCTION", False)
    composed = count_held(lambda: ops.conv_proj_scan(**kw, backend="triton"), bdl)
    assert fused == 2  # x and z
    assert composed >= fused + 1  # and u


def test_bad_shapes_are_named():
    kw = _inputs()
    with pytest.raises(ValueError, match="x_proj_weight must have shape"):
        ops.conv_proj_scan(**dict(kw, x_proj_weight=kw["x_proj_weight"][:, :5]), backend="triton")
    with pytest.raises(ValueError, match="x_proj_weight must have shape"):  # no room for R >= 1
        ops.conv_proj_scan(**dict(kw, x_proj_weight=kw["x_proj_weight"][:8]), backend="triton")
    with pytest.raises(ValueError, match=r"dt_proj_weight must have shape \(8, 3\)"):
        ops.conv_proj_scan(**dict(kw, dt_proj_weight=kw["dt_proj_weight"][:, :2]), backend="triton")
    with pytest.raises(ValueError, match="z must have shape"):
        ops.conv_proj_scan(**dict(kw, z=kw["z"][..., :5]), backend="torch")


@pytest.mark.parametrize("scan_backend", ["torch", "triton"])
@pytest.mark.parametrize("with_cache", [False, True], ids=["no-cache", "cache"])
def test_the_mixers_inference_writes_y_over_the_conv_output_and_matches(scan_backend, with_cache, monkeypatch):
    """Without autograd the mixer's channels-first path (CUDA's, chosen here on either device)
    writes the scan's output over the conv output (out=): the output, and with a cache the final
    conv and SSM states, equal those of the time-major path."""
    from mambakit.modules import mamba as mamba_mod
    torch.manual_seed(0)
    layer = mamba_mod.Mamba(d_model=8, d_state=4, d_conv=3, expand=2).to(DEVICE)
    h = torch.randn(2, 13, 8, device=DEVICE)

    def run():
        cache = layer.allocate_state(2, device=DEVICE) if with_cache else None
        with torch.no_grad():
            out = layer(h, cache=cache)
        return out, cache

    monkeypatch.setattr(mamba_mod, "_time_major", lambda t: True)
    out_ref, cache_ref = run()
    monkeypatch.setattr(mamba_mod, "_time_major", lambda t: False)
    real = backend_mod.resolve
    monkeypatch.setattr(backend_mod, "resolve", lambda b, x=None: scan_backend if b is None else real(b, x))
    writes = []
    real_scan = ops.selective_scan
    monkeypatch.setattr(ops, "selective_scan", lambda u, *a, out=None, **k: writes.append(out is u) or
                        real_scan(u, *a, out=out, **k))
    out, cache = run()
    assert writes == [True]
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    if with_cache:
        torch.testing.assert_close(cache.conv, cache_ref.conv, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cache.ssm, cache_ref.ssm, rtol=1e-5, atol=1e-6)


def _xz_as_in_proj_makes_it(kw):
    """x and z stacked into one (B, 2D, L) tensor laid out as the mixer's in_proj output on CUDA:
    a (2D, B, L) block viewed as (B, 2D, L), L contiguous, batches interleaved."""
    batch, dim, length = kw["x"].shape
    block = torch.cat([kw["x"], kw["z"]], dim=1).transpose(0, 1).contiguous()  # (2D, B, L)
    return block.transpose(0, 1)  # (B, 2D, L), strides (L, B * L, 1)


def test_gate_in_x_gives_the_x_z_results_with_xzs_gradient_in_xzs_own_layout(monkeypatch):
    """gate_in_x: x is in_proj's whole output (conv input, then gate). The output and every
    gradient equal those of separate x and z; xz's gradient has xz's strides, and the kernels
    wrote dx and dz into it directly (no copy after them)."""
    from mambakit.ops.triton import conv_scan_op
    kw = _inputs()
    dim = kw["x"].shape[1]
    y_ref, g_ref = _grads(kw, "triton")
    written = []
    real = conv_scan_op._gathered
    monkeypatch.setattr(conv_scan_op, "_gathered", lambda dxz, d, dx, dz: written.append(
        (dx.data_ptr() == dxz.data_ptr(), dz.data_ptr() == dxz[:, d:].data_ptr())) or real(dxz, d, dx, dz))
    xz = _xz_as_in_proj_makes_it(kw).requires_grad_()
    params = {k: v.clone().requires_grad_() for k, v in kw.items() if k not in ("x", "z")}
    y = ops.conv_proj_scan(xz, **params, backend="triton", gate_in_x=True)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(DEVICE, y.dtype)
    (y * gy).sum().backward()
    torch.testing.assert_close(y.detach(), y_ref, rtol=1e-5, atol=1e-6)
    assert xz.grad.stride() == xz.stride()
    assert written == [(True, True)]
    torch.testing.assert_close(xz.grad[:, :dim], g_ref["x"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xz.grad[:, dim:], g_ref["z"], rtol=1e-4, atol=1e-5)
    for name, p in params.items():
        torch.testing.assert_close(p.grad, g_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")
    # the composition (torch backend) with the gate in x gives the same output
    with torch.no_grad():
        y_torch = ops.conv_proj_scan(xz, **params, backend="torch", gate_in_x=True)
    torch.testing.assert_close(y_torch, y_ref, **FP32)


def test_gate_in_x_errors_name_the_problem():
    kw = _inputs()
    xz = _xz_as_in_proj_makes_it(kw)
    rest = {k: v for k, v in kw.items() if k not in ("x", "z")}
    with pytest.raises(ValueError, match="z must be None"):
        ops.conv_proj_scan(xz, **rest, z=kw["z"], backend="torch", gate_in_x=True)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2D, L\) with D from conv_weight \(D, K\) = 8, "
                                         r"got \(2, 8, 21\)"):
        ops.conv_proj_scan(kw["x"], **rest, backend="torch", gate_in_x=True)


def test_the_mixers_cuda_layout_traces_in_one_graph(monkeypatch):
    """torch.compile(fullgraph=True) of the gated mixer's channels-first path (conv_proj_scan with
    the gate in xz, over the Triton custom ops; the interpreter on CPU, aot_eager so that no C++
    compiler is needed): no graph break, and the output and input gradient of eager (the fused
    Function). The device's test_triton_gpu.py compiles it with inductor."""
    from mambakit.modules import mamba as mamba_mod
    torch.manual_seed(0)
    layer = mamba_mod.Mamba(d_model=8, d_state=4, d_conv=3, expand=2).to(DEVICE)
    monkeypatch.setattr(mamba_mod, "_time_major", lambda t: False)
    real = backend_mod.resolve
    monkeypatch.setattr(backend_mod, "resolve", lambda b, x=None: "triton" if b is None else real(b, x))
    h = torch.randn(2, 13, 8, device=DEVICE, requires_grad=True)
    want = layer(h)
    want.sum().backward()
    g_want, h.grad = h.grad.clone(), None
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(h)
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, g_want, rtol=1e-4, atol=1e-5)
