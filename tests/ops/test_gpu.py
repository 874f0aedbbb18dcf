"""The torch paths on a CUDA device (run with the device tool: `python -m pytest -m gpu`)."""

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.ops import causal_conv1d, causal_conv1d_ref, selective_scan, selective_scan_ref
from tests.scan_inputs import make_scan_inputs

pytestmark = pytest.mark.gpu

TOL = {torch.float32: dict(rtol=6e-4, atol=2e-3), torch.bfloat16: dict(rtol=3e-2, atol=5e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("groups", [None, 2])
def test_scan_on_cuda_matches_cpu_reference(dtype, groups):
    kw = make_scan_inputs(2, 64, 300, 16, groups=groups, dtype=dtype, with_init=True)
    y_ref, h_ref = selective_scan_ref(**kw, delta_softplus=True, return_final_state=True)
    cuda = {k: (v.cuda().requires_grad_() if v is not None else None) for k, v in kw.items()}
    y, h = selective_scan(**cuda, delta_softplus=True, return_final_state=True)
    torch.testing.assert_close(y.float().cpu(), y_ref.float(), **TOL[dtype])
    torch.testing.assert_close(h.cpu(), h_ref, **TOL[torch.float32])
    (y.float().sum() + h.sum()).backward()
    assert all(torch.isfinite(v.grad).all() for v in cuda.values() if v is not None)


def test_scan_gradients_on_cuda_match_float64_reference():
    kw = make_scan_inputs(1, 8, 70, 4, groups=2, dtype=torch.float64, with_init=True)
    grads = []
    for device, fn in (("cpu", selective_scan_ref), ("cuda", selective_scan)):
        inputs = {k: v.detach().to(device).requires_grad_() for k, v in kw.items() if v is not None}
        y, h = fn(**inputs, delta_softplus=True, return_final_state=True)
        (y.sin().sum() + h.cos().sum()).backward()
        grads.append({k: v.grad.cpu() for k, v in inputs.items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-8, atol=1e-10)


def test_conv_on_cuda():
    x, w, b = torch.randn(2, 16, 33), torch.randn(16, 4), torch.randn(16)
    y = causal_conv1d(x.cuda(), w.cuda(), b.cuda(), "silu")
    torch.testing.assert_close(y.cpu(), causal_conv1d_ref(x, w, b, "silu"), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lm_on_cuda_prefill_then_step(dtype):
    torch.manual_seed(0)
    cpu_model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=128)).eval()
    model = MambaLM(cpu_model.config, device="cuda", dtype=dtype).eval()
    model.load_state_dict(cpu_model.state_dict())
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        expect = cpu_model(ids)
        full = model(ids.cuda())
        cache = model.allocate_cache(2)
        prefix = model(ids[:, :10].cuda(), cache=cache)
        steps = torch.stack([model.step(ids[:, t].cuda(), cache) for t in range(10, 24)], dim=1)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-1)
    torch.testing.assert_close(full.float().cpu(), expect, **tol)
    torch.testing.assert_close(torch.cat([prefix, steps], 1).float().cpu(), expect, **tol)
