"""Wrapped submodules are called, not read: a forward hook, a peft LoRA layer or a dynamically
quantized Linear on a mixer's in_proj / conv1d / x_proj / dt_proj / out_proj changes what runs,
in the forward, with states, packed, and in the one-token step; plain modules still take the
fused paths (modules/state.py, `is_plain`)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mambakit import MambaConfig, MambaLM, ops
from mambakit.modules import S4D, Mamba
from mambakit.modules import mamba as mamba_mod
from mambakit.modules import state as state_mod
from mambakit.modules import bimamba as bimamba_mod
from mambakit.modules.bimamba import BiMamba
from mambakit.ops.reference import selective_scan_ref

SUBMODULES = ["in_proj", "conv1d", "x_proj", "dt_proj", "out_proj"]
SCALE = 1.5


def _randomize(module: nn.Module, scale: float = 0.2) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


def _mixer(cls=Mamba, **kw) -> nn.Module:
    m = cls(16, d_state=4, d_conv=3, **kw)
    _randomize(m)
    return m


def _hook(module: nn.Module):
    """A forward hook that scales the module's output by SCALE."""
    return module.register_forward_hook(lambda mod, args, out: out * SCALE)


def _scaled_copy(mixer: nn.Module, name: str) -> nn.Module:
    """A plain copy of `mixer` (made before any hook) whose `name` submodule's weight and bias are
    scaled by SCALE: what the hook on it computes, with nothing wrapped."""
    ref = copy.deepcopy(mixer)
    sub = getattr(ref, name)
    with torch.no_grad():
        sub.weight.mul_(SCALE)
        if sub.bias is not None:
            sub.bias.mul_(SCALE)
    return ref


def _manual_mixer(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """The gated mixer written out: every submodule called, the scan by the reference."""
    length = h.shape[1]
    x, z = m.in_proj(h).transpose(1, 2).chunk(2, dim=1)  # (B, D, L)
    x = F.silu(m.conv1d(x)[..., :length])  # causal: padding K-1, the first L outputs
    dt, B, C = m.x_proj(x.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)  # (B, L, .)
    delta = m.dt_proj(dt).transpose(1, 2)  # (B, D, L), its bias included
    y = selective_scan_ref(x, delta, m.A(), B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
                           D=m.D.float(), z=z, delta_softplus=True)
    return m.out_proj(y.transpose(1, 2))


def _tiny_lm(**overrides) -> MambaLM:
    torch.manual_seed(0)
    config = dict(d_model=16, n_layer=2, vocab_size=32, d_state=4)
    config.update(overrides)
    return MambaLM(MambaConfig(**config))


def _steps(mixer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The first half of h through forward with a cache, the rest one token at a time through step."""
    state = mixer.allocate_state(h.shape[0])
    half = h.shape[1] // 2
    outs = [mixer(h[:, :half], cache=state)]
    outs += [mixer.step(h[:, t:t + 1], state) for t in range(half, h.shape[1])]
    return torch.cat(outs, dim=1)


# -- hooks on the Mamba mixer ------------------------------------------------------------------

@pytest.mark.parametrize("name", SUBMODULES)
@pytest.mark.parametrize("channels_first", [False, True])
def test_a_hook_on_a_submodule_changes_the_mixer_as_scaled_weights_do(name, channels_first, monkeypatch):
    """In both layouts (CPU's time-major one and CUDA's channels-first one, chosen here on the
    CPU), with and without autograd, with states and in the step: the hooked mixer equals a plain
    copy with that submodule's weights scaled, and differs from the unhooked mixer."""
    monkeypatch.setattr(mamba_mod, "_time_major", lambda t: not channels_first)
    mixer = _mixer()
    h = torch.randn(2, 9, 16)
    plain = mixer(h).detach()
    want = _scaled_copy(mixer, name)
    _hook(getattr(mixer, name))
    got = mixer(h)
    torch.testing.assert_close(got, want(h), rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3
    with torch.no_grad():  # inference: the channels-first path writes y over the conv output
        torch.testing.assert_close(mixer(h), want(h), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_steps(mixer, h), want(h), rtol=1e-5, atol=1e-5)
    out, final = mixer.forward_with_states(h)
    ref_out, ref_final = want.forward_with_states(h)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.conv, ref_final.conv, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final.ssm, ref_final.ssm, rtol=1e-5, atol=1e-5)


def test_hooked_mixer_equals_the_manual_computation_through_the_reference():
    mixer = _mixer()
    for name in ("in_proj", "out_proj"):
        _hook(getattr(mixer, name))
    h = torch.randn(2, 11, 16)
    torch.testing.assert_close(mixer(h), _manual_mixer(mixer, h), rtol=1e-5, atol=1e-5)


def test_a_hooked_conv_honours_packed_sequences_and_states():
    """cu_seqlens restart the called conv at each boundary, from each sequence's own state."""
    mixer = _mixer()
    want = _scaled_copy(mixer, "conv1d")
    _hook(mixer.conv1d)
    h = torch.randn(1, 10, 16)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    states, ref_states = mixer.allocate_state(2), want.allocate_state(2)
    for s in (states, ref_states):
        s.conv.normal_()
    ref_states.conv.copy_(states.conv)
    with torch.no_grad():
        got = mixer(h, cache=states, cu_seqlens=cu)
        expected = want(h, cache=ref_states, cu_seqlens=cu)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states.conv, ref_states.conv)
    torch.testing.assert_close(states.ssm, ref_states.ssm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["in_proj", "conv1d", "out_proj"])
def test_a_hook_on_an_s4d_submodule_is_honoured_in_forward_and_step(name):
    mixer = _mixer(S4D)
    h = torch.randn(2, 8, 16)
    want = _scaled_copy(mixer, name)
    _hook(getattr(mixer, name))
    with torch.no_grad():
        torch.testing.assert_close(mixer(h), want(h), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_steps(mixer, h), want(h), rtol=1e-5, atol=1e-5)


# -- the fused paths stay for plain modules ----------------------------------------------------

class _CountingOps:
    """Stands for `mambakit.ops` in the mixers' module namespaces: counts the calls of `counted`."""

    def __init__(self, counted):
        self.calls = {name: 0 for name in counted}

    def __getattr__(self, name):
        real = getattr(ops, name)
        if name not in self.calls:
            return real

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return real(*args, **kwargs)
        return counted


PLAIN_CALLS = {"causal_conv1d": 3, "causal_conv1d_update_": 3, "conv_proj_scan": 1, "dt_proj_state_update_": 3,
               "selective_scan_dt_proj": 1}
WRAPPED_CALLS = {  # what changes when that submodule is wrapped: the ops that read its weight
    "in_proj": {}, "out_proj": {},
    "conv1d": {"causal_conv1d": 0, "causal_conv1d_update_": 0, "conv_proj_scan": 0, "selective_scan_dt_proj": 2},
    "x_proj": {"causal_conv1d": 4, "conv_proj_scan": 0, "selective_scan_dt_proj": 2},
    "dt_proj": {"causal_conv1d": 4, "conv_proj_scan": 0, "dt_proj_state_update_": 0, "selective_scan_dt_proj": 0},
}


@pytest.mark.parametrize("name", SUBMODULES)
def test_plain_modules_take_the_fused_ops_and_wrapped_ones_are_called(name, monkeypatch):
    """The ops that take a submodule's weight run for plain modules only: the conv (forward and
    step) for conv1d, the conv + x_proj + scan op (channels-first) for conv1d / x_proj / dt_proj,
    Δ's projection inside the scan or the step for dt_proj; in_proj and out_proj leave them all
    in place. Counted where the mixer calls them (`ops` in its module's namespace)."""
    h = torch.randn(2, 6, 16)
    layout = {"channels_first": False}
    monkeypatch.setattr(mamba_mod, "_time_major", lambda t: not layout["channels_first"])

    def run(mixer):
        spy = _CountingOps(PLAIN_CALLS)
        monkeypatch.setattr(mamba_mod, "ops", spy)
        monkeypatch.setattr(state_mod, "ops", spy, raising=False)  # the shared conv helpers call it there
        with torch.no_grad():
            layout["channels_first"] = False
            mixer(h)  # time-major: the conv op
            _steps(mixer, h)  # the conv op with a state, then three steps
            layout["channels_first"] = True
            mixer(h)  # channels-first without states: conv_proj_scan
            mixer.forward_with_states(h)  # channels-first with states: the conv op, selective_scan_dt_proj
        return spy.calls

    mixer = _mixer()
    assert run(mixer) == PLAIN_CALLS
    hooked = []
    handle = getattr(mixer, name).register_forward_hook(lambda *args: hooked.append(1))
    assert run(mixer) == dict(PLAIN_CALLS, **WRAPPED_CALLS[name])
    assert len(hooked) >= 4  # the wrapped module ran in every call of the mixer
    handle.remove()
    assert run(mixer) == PLAIN_CALLS


@pytest.mark.parametrize("cls", [Mamba, BiMamba])
def test_plain_submodules_tells_whether_a_decoder_may_read_the_weights(cls):
    mixer = _mixer(cls)
    assert mixer.plain_submodules()
    handle = _hook(mixer.x_proj)
    assert not mixer.plain_submodules()
    handle.remove()
    assert mixer.plain_submodules()


def test_is_plain_rejects_subclasses_hooks_and_tensor_subclasses():
    from mambakit.modules.state import is_plain

    class MyLinear(nn.Linear):
        pass

    lin = nn.Linear(4, 4)
    assert is_plain(lin, nn.Linear)
    assert not is_plain(MyLinear(4, 4), nn.Linear)
    assert not is_plain(nn.Conv1d(4, 4, 3), nn.Linear)
    for register in (lin.register_forward_hook, lin.register_forward_pre_hook):
        handle = register(lambda *a: None)
        assert not is_plain(lin, nn.Linear)
        handle.remove()
    handle = nn.modules.module.register_module_forward_hook(lambda *a: None)
    try:
        assert not is_plain(lin, nn.Linear)  # a global hook runs on every call
    finally:
        handle.remove()
    assert is_plain(lin, nn.Linear)
    torch.nn.utils.parametrize.register_parametrization(lin, "weight", _Double())
    assert not is_plain(lin, nn.Linear)  # a parametrized module is its own class
    other = nn.Linear(4, 4)
    other.weight = nn.Parameter(_Marked(other.weight.detach()))
    assert not is_plain(other, nn.Linear)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


class _Marked(torch.Tensor):
    """A trivial tensor subclass, standing for a quantized weight (torchao's are subclasses)."""


# -- peft LoRA on a tiny MambaLM ---------------------------------------------------------------

LORA_TARGETS = ["in_proj", "x_proj", "dt_proj", "out_proj"]


def _lora(model: MambaLM):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS, lora_dropout=0.0)
    return peft.get_peft_model(model, config)


def _randomize_lora_b(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.3)


def test_lora_changes_the_output_once_lora_b_is_nonzero_and_merges_to_the_same_model():
    model = _tiny_lm()
    ids = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        base = model(ids)
    adapted = _lora(model)
    mixer = model.backbone.layers[0].mixer
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids), base)  # lora_B starts at zero
        _randomize_lora_b(adapted)
        lora_logits = adapted(ids)
    assert (lora_logits - base).abs().max() > 1e-2
    assert not mixer.plain_submodules()  # generation's planned decoder must not read these weights
    merged = adapted.merge_and_unload()
    assert all(type(getattr(mixer, n)) is nn.Linear for n in LORA_TARGETS) and mixer.plain_submodules()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), lora_logits, rtol=1e-5, atol=1e-5)


def test_lora_trains_only_its_parameters_and_lowers_the_loss():
    model = _tiny_lm(initializer_range=0.3)  # embeddings (tied to lm_head) large enough for confident logits
    adapted = _lora(model)
    ids = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(3))
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for step in range(24):
        loss = adapted(ids[:, :-1], targets=ids[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            grads = {n: p.grad for n, p in adapted.named_parameters() if p.grad is not None}
            assert set(grads) == trainable  # every LoRA parameter, and nothing else, has a gradient
            assert all(grads[n].abs().max() > 0 for n in trainable if "lora_B" in n)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    with torch.no_grad():
        adapted_logits = adapted(ids)
        steps = _logits_by_steps(model, ids[:, :6], ids[:, 6:])
    torch.testing.assert_close(steps, adapted_logits[:, 5:-1], rtol=1e-4, atol=1e-4)  # the step path honours LoRA
    merged = adapted.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), adapted_logits, rtol=1e-5, atol=1e-5)


def _logits_by_steps(model: MambaLM, prompt: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Logits for each next token: prefill the prompt, then MambaLM.step over `rest` (the readable
    decoding path, not generation's planned decoder). (B, 1 + len(rest), V)."""
    logits, cache = model.prefill(prompt)
    out = [logits]
    for t in range(rest.shape[1]):
        out.append(model.step(rest[:, t], cache))
    return torch.stack(out, dim=1)[:, :-1]


def test_a_lora_model_generates_like_its_merged_model():
    """Generation (whatever decoder it picks) runs the adapted layers."""
    model = _tiny_lm()
    adapted = _lora(model)
    _randomize_lora_b(adapted)
    prompt = torch.randint(0, 32, (2, 5))
    tokens = model.generate(prompt, max_new_tokens=8)
    merged = adapted.merge_and_unload()
    assert torch.equal(tokens, merged.generate(prompt, max_new_tokens=8))


# -- dynamic int8 quantization -----------------------------------------------------------------

def _quantized(model: MambaLM) -> MambaLM:
    quantize = getattr(torch.ao.quantization, "quantize_dynamic", None)
    if quantize is None or not torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no dynamic quantization")
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return quantize(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _trained_like_lm(**overrides) -> MambaLM:
    """A tiny LM with weights moved off the init, so that its logits are far from uniform."""
    model = _tiny_lm(**overrides).eval()
    _randomize(model, 0.1)
    return model


@pytest.mark.parametrize("bias", [False, True])
def test_a_dynamically_quantized_model_runs_close_to_fp32(bias):
    model = _trained_like_lm(bias=bias)
    quantized = _quantized(model)
    assert isinstance(quantized.backbone.layers[0].mixer.in_proj, torch.ao.nn.quantized.dynamic.Linear)
    ids = torch.randint(0, 32, (3, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want, got = model(ids), quantized(ids)
        steps = _logits_by_steps(quantized, ids[:, :8], ids[:, 8:])
    _assert_close_to_int8(got, want)
    # the step path runs the same quantized layers (its activations quantized per step, not per sequence)
    _assert_close_to_int8(steps, got[:, 7:-1])


def _assert_close_to_int8(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within int8 weights' error: a few % of the logits' norm, the same argmax almost everywhere."""
    relative = float((got - want).norm() / want.norm())
    assert relative < 0.05, relative
    agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    assert agree > 0.9, agree


def test_a_dynamically_quantized_model_generates():
    model = _trained_like_lm()
    quantized = _quantized(model)
    prompt = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(7))
    tokens = quantized.generate(prompt, max_new_tokens=8)
    assert tokens.shape == (2, 14) and torch.equal(tokens[:, :6], prompt)
    with torch.no_grad():  # each generated token is the quantized model's greedy choice on its step path
        logits = _logits_by_steps(quantized, prompt, tokens[:, 6:])
        fp32 = _logits_by_steps(model, prompt, tokens[:, 6:])
    assert torch.equal(tokens[:, 6:], logits[..., :32].argmax(-1))
    _assert_close_to_int8(logits, fp32)
    # prompts of different lengths, prefilled packed (the activations' int8 scales then span both)
    rows = quantized.generate([prompt[0], prompt[1, :4]], max_new_tokens=5)
    assert [len(r) for r in rows] == [11, 9] and torch.equal(rows[1][:4], prompt[1, :4])


def test_the_head_of_a_prefill_sees_a_contiguous_input():
    """logits_to_keep slices the last positions; a quantized head's kernel (torchao's int4
    weight-only matmul) refuses a strided input, so the slice is made contiguous first."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=32)).eval()
    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(torch.randint(0, 32, (2, 9)), logits_to_keep=1)
        model.generate(torch.randint(0, 32, (2, 5)), max_new_tokens=2)
    assert seen and all(seen), seen


# -- Vision's bidirectional mixer --------------------------------------------------------------

@pytest.mark.parametrize("name", ["in_proj", "out_proj", "conv1d_b", "x_proj", "dt_proj_b"])
def test_a_hook_on_a_bimamba_submodule_changes_it_as_scaled_weights_do(name, monkeypatch):
    """Autograd, inference (CPU's `_fused_inference`) and the unfused reference honour the hook;
    the fused inference runs only for plain submodules."""
    mixer = _mixer(BiMamba)
    want = _scaled_copy(mixer, name)
    h = torch.randn(2, 7, 16)
    calls, real = [], mixer._fused_inference
    monkeypatch.setattr(mixer, "_fused_inference", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        plain = mixer(h)
    assert calls == [1]
    _hook(getattr(mixer, name))
    got = mixer(h)
    torch.testing.assert_close(got, want(h), rtol=1e-5, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3
    with torch.no_grad():
        torch.testing.assert_close(mixer(h), want(h), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mixer(h, fused=False), want(h), rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_a_hooked_bimamba_leaves_the_padded_triton_path(monkeypatch):
    """backend="triton" (under the interpreter on CPU): the padded op reads every weight, so it
    runs for plain submodules only; a hooked out_proj takes the path that calls it."""
    if not ops.triton_available() or not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("needs triton (on CUDA or under TRITON_INTERPRET=1)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mixer = _mixer(BiMamba).to(device)
    mixer.backend = "triton"
    want = _scaled_copy(mixer, "out_proj")
    h = torch.randn(1, 16, 16, device=device)
    spy = _CountingOps(["bimamba_inference"])
    monkeypatch.setattr(bimamba_mod, "ops", spy)
    with torch.no_grad():
        plain = mixer(h)
        assert spy.calls["bimamba_inference"] == 1
        _hook(mixer.out_proj)
        got = mixer(h)
        assert spy.calls["bimamba_inference"] == 1  # the hooked mixer took the path that calls out_proj
        expected = want(h)
        assert spy.calls["bimamba_inference"] == 2  # the plain copy took the padded op
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().max() > 1e-3
