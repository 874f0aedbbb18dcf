"""ops.selective_scan_dt_proj: the scan with Δ = dt_weight @ dt formed inside. The Triton path's
training Function (_EagerScanDtProj) must give the outputs and every gradient of the readable
composition (batched_linear, then the scan), and must not keep a (B, D, L) Δ for the backward.
Under TRITON_INTERPRET=1 on CPU; with the compiled kernels on the device."""

import pytest
import torch

from mambakit.ops import selective_scan, selective_scan_dt_proj
from mambakit.ops.reference import batched_linear
from tests.scan_inputs import count_held, make_scan_inputs

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(batch=2, dim=8, length=24, d_state=4, rank=3, with_init=True, seed=0):
    kw = make_scan_inputs(batch, dim, length, d_state, with_init=with_init, seed=seed)
    kw = {k: v for k, v in kw.items() if k != "delta" and v is not None}
    g = torch.Generator().manual_seed(seed + 1)
    kw["dt"] = torch.randn(batch, rank, length, generator=g)
    kw["dt_weight"] = torch.randn(dim, rank, generator=g) * 0.5
    return {k: v.to(DEVICE) for k, v in kw.items()}


@pytest.mark.parametrize("with_init, bf16", [(False, False), (True, False), (True, True)])
def test_outputs_and_every_gradient_match_the_composition(with_init, bf16):
    """bf16: u, dt, B, C, z in bf16 and the weight, A, D, the bias in fp32, as under autocast."""
    kw = _inputs(with_init=with_init)
    if bf16:
        kw = {k: (v.to(torch.bfloat16) if k in ("u", "dt", "B", "C", "z") else v) for k, v in kw.items()}
    fused = {k: v.clone().requires_grad_() for k, v in kw.items()}
    plain = {k: v.clone().requires_grad_() for k, v in kw.items()}
    y, h = selective_scan_dt_proj(**fused, delta_softplus=True, return_final_state=True, backend="triton")
    rest = {k: v for k, v in plain.items() if k not in ("dt", "dt_weight")}
    y_ref, h_ref = selective_scan(delta=batched_linear(plain["dt_weight"], plain["dt"]), **rest, delta_softplus=True,
                                  return_final_state=True, backend="triton")
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    g = torch.Generator().manual_seed(5)
    gy, gh = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype), torch.randn(h.shape, generator=g).to(DEVICE)
    ((y * gy).sum() + (h * gh).sum()).backward()
    ((y_ref * gy).sum() + (h_ref * gh).sum()).backward()
    for name in kw:
        torch.testing.assert_close(fused[name].grad, plain[name].grad, **_tolerance(name, bf16),
                                   msg=lambda m, name=name: f"{name}: {m}")


def _tolerance(name, bf16):
    """Equal to fp32 rounding, except dt_weight's gradient with bf16 activations: the fused
    backward sums its per-sequence terms in fp32, where the composition's autograd sums them in
    the dtype the weight was cast to (bf16 when dt is bf16) or in fp32 after the cast (when
    autocast casts it): one bf16 rounding apart."""
    return dict(rtol=8e-3, atol=1e-3) if bf16 and name == "dt_weight" else dict(rtol=1e-5, atol=1e-5)


def test_the_backward_keeps_dt_not_delta():
    """Every tensor autograd keeps for the backward, by shape: the composition keeps a (B, D, L)
    Δ besides u and z; selective_scan_dt_proj keeps only u and z at that size."""
    kw = {k: v.requires_grad_() for k, v in _inputs(with_init=False).items()}
    bdl = tuple(kw["u"].shape)
    kept = lambda fn: count_held(fn, bdl)  # noqa: E731

    rest = {k: v for k, v in kw.items() if k not in ("dt", "dt_weight")}
    fused = kept(lambda: selective_scan_dt_proj(**kw, delta_softplus=True, backend="triton"))
    plain = kept(lambda: selective_scan(delta=batched_linear(kw["dt_weight"], kw["dt"]), **rest, delta_softplus=True,
                                        backend="triton"))
    assert fused == 2  # u and z
    assert plain == fused + 1  # and Δ


def test_bad_dt_shapes_are_named():
    kw = _inputs()
    with pytest.raises(ValueError, match=r"dt must have shape \(B=2, R, L=24\)"):
        selective_scan_dt_proj(**dict(kw, dt=kw["dt"][:, :, :10]), backend="triton")
    with pytest.raises(ValueError, match=r"dt_weight must have shape \(8, 3\)"):
        selective_scan_dt_proj(**dict(kw, dt_weight=kw["dt_weight"][:5]), backend="triton")


def test_other_backends_compute_the_composition():
    kw = _inputs(dim=4, length=10)
    rest = {k: v for k, v in kw.items() if k not in ("dt", "dt_weight")}
    y = selective_scan_dt_proj(**kw, delta_softplus=True, backend="reference")
    y_ref = selective_scan(delta=batched_linear(kw["dt_weight"], kw["dt"]), **rest, delta_softplus=True,
                           backend="reference")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)


@pytest.mark.parametrize("gate", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("scan_backend", ["torch", "triton"])
def test_the_mixers_channels_first_path_matches_its_time_major_path(monkeypatch, scan_backend, gate):
    """Mamba._run's CUDA layout (channels-first, conv_proj_scan with the gate in xz), chosen on
    either device, with the torch ops or the Triton kernels (the interpreter on CPU): the output
    and every parameter's gradient equal those of the CPU layout (time-major, Δ then the scan)."""
    from mambakit.modules import mamba as mamba_mod
    torch.manual_seed(0)
    layer = mamba_mod.Mamba(d_model=8, d_state=4, d_conv=3, expand=2, gate=gate).to(DEVICE)
    h = torch.randn(2, 13, 8, device=DEVICE)
    monkeypatch.setattr(mamba_mod, "_time_major", lambda t: True)

    def run():
        layer.zero_grad()
        out = layer(h)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in layer.named_parameters()}

    out_ref, grads_ref = run()
    monkeypatch.setattr(mamba_mod, "_time_major", lambda t: False)
    from mambakit.ops import backend as backend_mod
    real_resolve = backend_mod.resolve
    monkeypatch.setattr(backend_mod, "resolve", lambda backend, x=None: scan_backend if backend is None else
                        real_resolve(backend, x))
    out, grads = run()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_under_autocast_an_fp32_dt_gets_the_compositions_gradients():
    """Under bf16 autocast the projection runs in bf16 even for fp32 dt and weight; the backward
    (outside autocast) must form that same bf16 Δ again, not an fp32 one."""
    kw = _inputs(with_init=False)
    kw = {k: (v.to(torch.bfloat16) if k in ("u", "B", "C", "z") else v) for k, v in kw.items()}  # dt stays fp32
    fused = {k: v.clone().requires_grad_() for k, v in kw.items()}
    plain = {k: v.clone().requires_grad_() for k, v in kw.items()}
    rest = {k: v for k, v in plain.items() if k not in ("dt", "dt_weight")}
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = selective_scan_dt_proj(**fused, delta_softplus=True, backend="triton")
        delta = batched_linear(plain["dt_weight"], plain["dt"])
        assert delta.dtype == torch.bfloat16
        y_ref = selective_scan(delta=delta, **rest, delta_softplus=True, backend="triton")
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, y.dtype)
    (y.float() * gy).sum().backward()
    (y_ref.float() * gy).sum().backward()
    for name in kw:
        assert fused[name].grad.dtype == plain[name].grad.dtype, name
        torch.testing.assert_close(fused[name].grad, plain[name].grad, **_tolerance(name, True),
                                   msg=lambda m, name=name: f"{name}: {m}")
