"""The S4D (LTI) mixer: convolution mode = recurrent mode = step(), the kernel against a naive
sum, the SSM against a sequential numpy recurrence, and the mixer inside MambaLM; the gate
option of both mixers; the config fields layer / gate."""

import copy

import numpy as np
import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.modules.mamba import Mamba
from mambakit.modules.s4d import S4D


def random_s4d(d_model=6, d_state=8, gate=True, chunk_size=7, seed=0) -> S4D:
    """An fp64 S4D with random, non-trivial parameters (not the structured init)."""
    torch.manual_seed(seed)
    m = S4D(d_model, d_state=d_state, gate=gate, chunk_size=chunk_size).double()
    with torch.no_grad():
        m.log_dt.uniform_(-4.0, -0.5)
        m.A_log_real.uniform_(-2.0, 0.7)
        m.A_imag.normal_(0.0, 4.0)
        m.B.normal_()
        m.C.normal_()
        m.D.normal_()
        m.conv1d.bias.normal_()
    return m


def random_state(m: S4D, batch: int):
    state = m.allocate_state(batch)
    state.conv.normal_()
    state.ssm.normal_()
    return state


def params_np(m: S4D):
    """(dt, A, B, C, D) as numpy float64 / complex128, from the raw parameters."""
    g = lambda p: p.detach().double().numpy()
    dt = np.exp(g(m.log_dt))  # (D,)
    A = -np.exp(g(m.A_log_real)) + 1j * g(m.A_imag)  # (D, N/2)
    B = g(m.B)[..., 0] + 1j * g(m.B)[..., 1]
    C = g(m.C)[..., 0] + 1j * g(m.C)[..., 1]
    return dt, A, B, C, g(m.D)


@pytest.mark.parametrize("length", [1, 7, 23, 64])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_mode_equals_recurrent_mode_fp64(length, with_state):
    m = random_s4d()
    x = torch.randn(3, length, m.d_model, dtype=torch.float64)
    state = random_state(m, 3) if with_state else None
    y_conv, s_conv = m.forward_with_states(x, copy.deepcopy(state), mode="conv")
    y_rec, s_rec = m.forward_with_states(x, copy.deepcopy(state), mode="recurrent")
    assert y_conv.abs().max() > 1e-2  # not trivially zero
    torch.testing.assert_close(y_conv, y_rec, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_conv.ssm, s_rec.ssm, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s_conv.conv, s_rec.conv, rtol=0, atol=0)


def test_ssm_matches_sequential_numpy_recurrence():
    """The SSM core of both modes against h_k = Ā h_{k-1} + B̄ x_k, y_k = 2 Re(C h_k) + D x_k in numpy."""
    m = random_s4d()
    batch, length = 2, 19
    x = torch.randn(batch, m.d_inner, length, dtype=torch.float64)
    h0 = torch.randn(batch, m.d_inner, m.n_modes, dtype=torch.complex128)
    dt, A, B, C, D = params_np(m)
    A_bar = np.exp(dt[:, None] * A)
    B_bar = (A_bar - 1) / A * B
    xn, h = x.numpy(), h0.numpy().copy()
    want = np.zeros((batch, m.d_inner, length))
    for k in range(length):
        h = A_bar * h + B_bar * xn[:, :, k, None]
        want[:, :, k] = 2 * (C * h).sum(-1).real + D * xn[:, :, k]
    for ssm in (m._ssm_conv, m._ssm_scan):
        y, h_final = ssm(x, h0, True)
        np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(h_final.detach().numpy(), h, rtol=1e-10, atol=1e-10)


def test_kernel_against_naive_sum():
    """K_k = sum_n 2 Re(C_n exp(dt A_n)^k B̄_n), term by term in Python complex arithmetic."""
    m = random_s4d(d_model=2, d_state=6)
    length = 12
    dt, A, B, C, _ = params_np(m)
    K = m.kernel(length).detach().numpy()  # (D_inner, L)
    for d in range(m.d_inner):
        for k in range(length):
            total = 0.0
            for n in range(m.n_modes):
                a_bar = complex(np.exp(dt[d] * A[d, n]))
                b_bar = (a_bar - 1) / complex(A[d, n]) * complex(B[d, n])
                total += 2 * (complex(C[d, n]) * a_bar ** k * b_bar).real
            assert abs(K[d, k] - total) <= 1e-12 * max(1.0, abs(total))


def test_conv_mode_is_the_kernel_convolution():
    """y_t = sum_j K_j x_{t-j} + D x_t, the direct O(L^2) sum."""
    m = random_s4d()
    x = torch.randn(2, m.d_inner, 17, dtype=torch.float64)
    y, _ = m._ssm_conv(x, None, False)
    K, D = m.kernel(17).detach(), m.D.detach()
    want = torch.zeros_like(x)
    for t in range(17):
        for j in range(t + 1):
            want[..., t] += K[:, j] * x[..., t - j]
    want += D[:, None] * x
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


def test_s4d_lin_init():
    m = S4D(4, d_state=8)
    A = torch.complex(-torch.exp(m.A_log_real), m.A_imag)
    n = torch.arange(4, dtype=torch.float32)
    torch.testing.assert_close(A, torch.complex(torch.full((8, 4), -0.5), (torch.pi * n).expand(8, 4)))
    dt = torch.exp(m.log_dt)
    assert dt.min() >= 0.001 - 1e-7 and dt.max() <= 0.1 + 1e-7


@pytest.mark.parametrize("mode", ["conv", "recurrent"])
@pytest.mark.parametrize("gate", [True, False])
def test_step_continues_a_prefix_exactly(mode, gate):
    m = random_s4d(gate=gate)
    m.mode = mode
    L, k = 21, 8
    x = torch.randn(2, L, m.d_model, dtype=torch.float64)
    full = m(x)
    cache = m.allocate_state(2)
    head = m(x[:, :k], cache)
    tail = torch.stack([m.step(x[:, t], cache) for t in range(k, L)], dim=1)
    torch.testing.assert_close(torch.cat([head, tail], dim=1), full, rtol=1e-10, atol=1e-10)
    # and a forward from the cache continues like the steps did
    cache2 = m.allocate_state(2)
    m(x[:, :k], cache2)
    torch.testing.assert_close(m(x[:, k:], cache2), full[:, k:], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cache2.ssm, cache.ssm, rtol=1e-10, atol=1e-10)


def test_gradients_flow_and_agree_between_modes():
    m = random_s4d()
    x = torch.randn(2, 15, m.d_model, dtype=torch.float64, requires_grad=True)
    grads, state0 = {}, random_state(m, 2)
    for mode in ("conv", "recurrent"):
        m.zero_grad()
        x.grad = None
        state = copy.deepcopy(state0)
        state.ssm.requires_grad_(True)
        y, final = m.forward_with_states(x, state, mode=mode)
        (y.square().sum() + final.ssm.square().sum()).backward()
        grads[mode] = {n: p.grad.clone() for n, p in m.named_parameters()}
        grads[mode]["x"], grads[mode]["h0"] = x.grad.clone(), state.ssm.grad.clone()
    for name, g in grads["conv"].items():
        assert torch.isfinite(g).all() and g.abs().max() > 0, name
        torch.testing.assert_close(g, grads["recurrent"][name], rtol=1e-8, atol=1e-10, msg=name)


def test_state_has_the_mamba_mixer_size():
    s4d, mamba = S4D(8, d_state=16), Mamba(8, d_state=16)
    a, b = s4d.allocate_state(3), mamba.allocate_state(3)
    assert a.conv.shape == b.conv.shape and a.ssm.shape == b.ssm.shape and a.ssm.dtype == b.ssm.dtype


# ---- inside MambaLM ---------------------------------------------------------------------------

@pytest.mark.parametrize("gate", [True, False])
def test_lm_with_s4d_prefill_step_and_generate(gate):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=16, layer="s4d", gate=gate, d_state=8)
    model = MambaLM(cfg).double().eval()
    assert all(isinstance(layer.mixer, S4D) for layer in model.backbone.layers)
    ids = torch.randint(0, 16, (2, 13))
    full = model(ids)  # (B, L, V)
    logits, cache = model.prefill(ids[:, :6])
    torch.testing.assert_close(logits, full[:, 5], rtol=1e-9, atol=1e-9)
    for t in range(6, 13):
        torch.testing.assert_close(model.step(ids[:, t], cache), full[:, t], rtol=1e-9, atol=1e-9)
    out = model.generate(ids[:, :5], max_new_tokens=4)
    assert out.shape == (2, 9) and torch.equal(out[:, :5], ids[:, :5])
    # prompts of different lengths (packed, cu_seqlens) give what each gives alone
    outs = model.generate([[1, 2, 3], [4, 5, 6, 7, 8]], max_new_tokens=3)
    assert torch.equal(outs[0], model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3)[0])
    assert torch.equal(outs[1], model.generate(torch.tensor([[4, 5, 6, 7, 8]]), max_new_tokens=3)[0])


def test_lm_with_s4d_chunked_loss_and_checkpoint(tmp_path):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=16, layer="s4d", d_state=8)
    model = MambaLM(cfg).double()
    ids = torch.randint(0, 16, (2, 20))
    torch.testing.assert_close(model.chunked_loss(ids, ids, chunk_len=6), model(ids, targets=ids),
                               rtol=1e-10, atol=1e-10)
    model.save_pretrained(tmp_path)
    back = MambaLM.from_pretrained(tmp_path).double()
    assert back.config == cfg
    torch.testing.assert_close(back(ids), model(ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer"):
        model.save_pretrained(tmp_path / "hf", format="hf")


@pytest.mark.parametrize("layer", ["mamba", "s4d"])
def test_lm_trains_on_a_batch(layer):
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=16, layer=layer, gate=False, d_state=8)
    model = MambaLM(cfg)
    ids = torch.randint(0, 16, (4, 24))
    loss = model(ids, targets=ids)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


# ---- the gate option ----------------------------------------------------------------------------

def test_mamba_gate_default_keeps_state_dict():
    default, gated = Mamba(16), Mamba(16, gate=True)
    assert {k: v.shape for k, v in default.state_dict().items()} == {k: v.shape for k, v in gated.state_dict().items()}
    assert default.in_proj.weight.shape == (64, 16)
    assert MambaConfig().gate is True and MambaConfig().layer == "mamba"


@pytest.mark.parametrize("cls", [Mamba, S4D])
def test_ungated_mixer_is_the_gated_one_without_z(cls):
    """gate=False: in_proj makes x only and nothing gates the output. Reference: the gated mixer
    whose z half of in_proj is a constant c (zero weights, bias c) outputs SiLU(c) times the
    ungated one (out_proj has no bias): out_proj(y * SiLU(c)) = SiLU(c) out_proj(y)."""
    torch.manual_seed(1)
    gated = cls(8, d_state=8, bias=True).double()
    ungated = cls(8, d_state=8, bias=True, gate=False).double()
    assert ungated.in_proj.out_features == ungated.d_inner == gated.in_proj.out_features // 2
    with torch.no_grad():
        gated.in_proj.weight[gated.d_inner:] = 0.0
        gated.in_proj.bias[:gated.d_inner].normal_()
        gated.in_proj.bias[gated.d_inner:] = 1.5
        gated.out_proj.bias.zero_()
    sd = gated.state_dict()
    sd["in_proj.weight"] = sd["in_proj.weight"][:gated.d_inner]
    sd["in_proj.bias"] = sd["in_proj.bias"][:gated.d_inner]
    ungated.load_state_dict(sd)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    y_ungated = ungated(x)
    scale = torch.nn.functional.silu(torch.tensor(1.5, dtype=torch.float64))
    torch.testing.assert_close(gated(x), scale * y_ungated, rtol=1e-9, atol=1e-10)
    # decoding without a gate continues the forward (Mamba keeps its SSM state in fp32)
    cache = ungated.allocate_state(2)
    head = ungated(x[:, :5], cache)
    tail = torch.stack([ungated.step(x[:, t], cache) for t in range(5, 11)], dim=1)
    tol = 1e-9 if cache.ssm.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(torch.cat([head, tail], 1), y_ungated, rtol=tol, atol=tol)


def test_lm_with_ungated_mamba_generates():
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=16, gate=False)
    model = MambaLM(cfg).double().eval()
    ids = torch.randint(0, 16, (2, 10))
    full = model(ids)
    logits, cache = model.prefill(ids[:, :4])
    for t in range(4, 10):  # the SSM state is fp32
        torch.testing.assert_close(model.step(ids[:, t], cache), full[:, t], rtol=1e-6, atol=1e-6)


# ---- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"layer": "foo"}, "layer"), ({"layer": None}, "layer"), ({"gate": "yes"}, "gate"),
    ({"layer": "s4d", "d_state": 7}, "d_state"),
])
def test_bad_config_values_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MambaConfig(**kwargs)


def test_standard_formats_refuse_other_mixers():
    for cfg in (MambaConfig(layer="s4d"), MambaConfig(gate=False)):
        for convert in (cfg.to_hf, cfg.to_official):
            with pytest.raises(ValueError, match="layer="):
                convert()
        assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    assert MambaConfig.from_hf(MambaConfig().to_hf()).layer == "mamba"


@pytest.mark.parametrize("kwargs", [{"d_state": 5}, {"mode": "fft"}, {"chunk_size": 0}])
def test_bad_s4d_arguments_raise(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        S4D(8, **kwargs)
