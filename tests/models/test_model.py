"""The Mamba mixer, Block and MambaLM: prefill-then-step equals a full forward, the cache has
a constant size, the config presets have the official shapes, and the init is the official one."""

import math

import pytest
import torch

from mambakit import Mamba, MambaConfig, MambaLM, PRESETS

SMALL = dict(d_model=32, n_layer=3, vocab_size=100, d_state=8)


@pytest.mark.parametrize("rms_norm,residual_in_fp32", [(True, True), (False, False)])
@pytest.mark.parametrize("k", [1, 5, 12])
def test_prefill_then_step_equals_full_forward(rms_norm, residual_in_fp32, k):
    model = MambaLM(MambaConfig(**SMALL, rms_norm=rms_norm, residual_in_fp32=residual_in_fp32)).eval()
    ids = torch.randint(0, 100, (2, 13))
    with torch.no_grad():
        full = model(ids)  # (2, 13, V)
        cache = model.allocate_cache(2)
        prefix = model(ids[:, :k], cache=cache)
        steps = torch.stack([model.step(ids[:, t], cache) for t in range(k, 13)], dim=1)
    torch.testing.assert_close(prefix, full[:, :k], rtol=0, atol=1e-5)
    torch.testing.assert_close(steps, full[:, k:], rtol=0, atol=1e-5)
    assert cache.seqlen == 13


def test_forward_in_pieces_with_cache_equals_full_forward():
    model = MambaLM(MambaConfig(**SMALL)).eval()
    ids = torch.randint(0, 100, (1, 40))
    with torch.no_grad():
        full = model(ids)
        cache = model.allocate_cache(1)
        pieces = torch.cat([model(ids[:, a:b], cache=cache) for a, b in ((0, 2), (2, 19), (19, 40))], dim=1)
    torch.testing.assert_close(pieces, full, rtol=0, atol=1e-5)


def test_cache_size_is_constant_in_length():
    model = MambaLM(MambaConfig(**SMALL)).eval()
    sizes = []
    for length in (4, 64, 512):
        _, cache = model.prefill(torch.randint(0, 100, (1, length)))
        sizes.append(cache.nbytes())
        d_inner = 2 * SMALL["d_model"]
        assert cache.layers[0].conv.shape == (1, d_inner, 3)
        assert cache.layers[0].ssm.shape == (1, d_inner, SMALL["d_state"])
    assert len(set(sizes)) == 1


def test_mixer_gradients_flow_to_every_parameter():
    mixer = Mamba(16, d_state=4)
    x = torch.randn(2, 9, 16, requires_grad=True)
    mixer(x).square().sum().backward()
    for name, p in list(mixer.named_parameters()) + [("x", x)]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_official_init():
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=64, n_layer=4, vocab_size=50, d_state=16)
    model = MambaLM(cfg)
    mixer = model.backbone.layers[0].mixer
    torch.testing.assert_close(mixer.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    assert torch.equal(mixer.D, torch.ones(128))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert mixer.dt_rank == math.ceil(64 / 16)
    assert mixer.dt_proj.weight.abs().max() <= mixer.dt_rank ** -0.5
    # out_proj rescaled by 1/sqrt(n_layer) relative to nn.Linear's kaiming bound 1/sqrt(fan_in)
    assert mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(128) / math.sqrt(4) + 1e-6
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert model.backbone.embedding.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("name,layers,d_model,params_m", [
    ("130m", 24, 768, 129.1), ("370m", 48, 1024, 371.5), ("790m", 48, 1536, 793.2),
    ("1.4b", 48, 2048, 1372.1), ("2.8b", 64, 2560, 2768.3)])
def test_presets_have_official_shapes(name, layers, d_model, params_m):
    cfg = MambaConfig.from_name(name)
    assert (cfg.n_layer, cfg.d_model, cfg.padded_vocab_size) == (layers, d_model, 50280)
    with torch.device("meta"):
        model = MambaLM(cfg)
    n = sum(p.numel() for p in model.parameters())  # the tied head counts once
    assert n / 1e6 == pytest.approx(params_m, rel=2e-3)


def test_tiny_preset_runs():
    assert "tiny" in PRESETS
    model = MambaLM.from_name("tiny").eval()
    logits = model(torch.randint(0, 256, (1, 10)))
    assert logits.shape == (1, 10, MambaConfig.from_name("tiny").padded_vocab_size)


def test_config_conversions_round_trip():
    cfg = MambaConfig(d_model=96, n_layer=5, vocab_size=1000, d_state=12, d_conv=3, expand=3, dt_rank=7,
                      conv_bias=False, bias=True, residual_in_fp32=False, tie_embeddings=False)
    assert MambaConfig.from_official(cfg.to_official()) == cfg
    assert MambaConfig.from_dict(cfg.to_dict()) == cfg
    back = MambaConfig.from_hf(cfg.to_hf())
    assert back.padded_vocab_size == cfg.padded_vocab_size
    assert (back.d_model, back.d_state, back.d_conv, back.expand, back.resolved_dt_rank, back.bias, back.conv_bias) == \
        (96, 12, 3, 3, 7, True, False)


def test_no_grad_forward_after_a_fused_optimizer_step_sees_the_new_parameters():
    """Regression: A = -exp(A_log) was memoised for no-grad calls, keyed on A_log's version
    counter, which torch's fused AdamW does not bump. Every evaluation after the first then ran
    with the first one's A (on the device this held Table 1's gated S6 at 0.69 accuracy while
    its training loss was 3e-4). A no-grad forward must equal a grad-enabled one after a step."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=32, d_state=4))
    ids = torch.randint(0, 32, (2, 9))
    with torch.no_grad():
        model(ids)  # a first evaluation
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, fused=True)
    model(ids).float().logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.no_grad():
        evaluated = model(ids)
    trained = model(ids).detach()
    torch.testing.assert_close(evaluated, trained, rtol=0, atol=0)
