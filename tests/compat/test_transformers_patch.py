"""patch_transformers() on transformers' Mamba-2 family (Mamba2, Bamba, NemotronH, FalconH1,
Zamba2, GraniteMoeHybrid) and the Mamba-1 hybrids (Jamba, FalconMamba), on CPU in fp32: the
patched model gives the unpatched model's logits and greedy tokens (generate, through the cache)
while mambakit's ops do the work; in training, the fused Mamba-2 layer
(mamba_split_conv1d_scan_combined) gives the same loss and gradients; packed sequences (seq_idx)
run through the patched model; unpatch_transformers() restores every function."""

import pytest
import torch

import mambakit.ops
from mambakit import compat

transformers = pytest.importorskip("transformers")

VOCAB = 64
COMMON = dict(vocab_size=VOCAB, hidden_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def mamba2_family(name: str, groups: int):
    """A tiny random model of `name` with Mamba-2 layers of 8 heads of 8 channels, N=8, chunk 4."""
    configs = {
        "mamba2": ("Mamba2", dict(num_heads=8, head_dim=8, state_size=8, num_hidden_layers=2, expand=2,
                                  n_groups=groups, chunk_size=4, conv_kernel=4)),
        "bamba": ("Bamba", dict(num_hidden_layers=2, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                                attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=groups,
                                mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_chunk_size=4)),
        "nemotron_h": ("NemotronH", dict(layers_block_type=["mamba", "attention", "mamba"], num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=8, intermediate_size=32, ssm_state_size=8,
                                         mamba_num_heads=8, mamba_head_dim=8, n_groups=groups, conv_kernel=4,
                                         expand=2, chunk_size=4)),
        "falcon_h1": ("FalconH1", dict(num_hidden_layers=2, intermediate_size=32, num_attention_heads=4,
                                       num_key_value_heads=2, mamba_d_ssm=64, mamba_n_heads=8, mamba_d_head=8,
                                       mamba_n_groups=groups, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                                       mamba_chunk_size=4)),
        "zamba2": ("Zamba2", dict(num_hidden_layers=3, layers_block_type=["mamba", "hybrid", "mamba"], mamba_d_state=8,
                                  mamba_d_conv=4, mamba_expand=2, mamba_ngroups=groups, n_mamba_heads=8, chunk_size=4,
                                  intermediate_size=32, num_attention_heads=4, num_key_value_heads=4, num_mem_blocks=1,
                                  adapter_rank=4)),
        "granitemoehybrid": ("GraniteMoeHybrid", dict(num_hidden_layers=2, intermediate_size=32, num_attention_heads=4,
                                                      num_key_value_heads=2, layer_types=["mamba", "attention"],
                                                      num_local_experts=2, num_experts_per_tok=1,
                                                      shared_intermediate_size=32, mamba_n_heads=8, mamba_d_head=8,
                                                      mamba_n_groups=groups, mamba_d_state=8, mamba_d_conv=4,
                                                      mamba_expand=2, mamba_chunk_size=4)),
        "jamba": ("Jamba", dict(num_hidden_layers=2, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
                                attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                                num_experts=2, num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                                mamba_dt_rank=4)),
        "falcon_mamba": ("FalconMamba", dict(state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4)),
    }
    prefix, kw = configs[name]
    config_cls = getattr(transformers, f"{prefix}Config", None)
    model_cls = getattr(transformers, f"{prefix}ForCausalLM", None)
    if config_cls is None or model_cls is None:
        pytest.skip(f"this transformers has no {prefix}")
    torch.manual_seed(0)
    return model_cls(config_cls(**COMMON, **kw))


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of mambakit's ops that the compat entry points run on."""
    calls = {}
    for name in ("ssd", "ssd_state_update_", "causal_conv1d", "causal_conv1d_update", "selective_scan",
                 "selective_state_update"):
        real = getattr(mambakit.ops, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(mambakit.ops, name, counting)
    return calls


@pytest.fixture
def patched():
    """patch_transformers() for the test's model, undone after it."""
    def patch(name):
        replaced = compat.patch_transformers([name])
        assert all(r.startswith(name + ".") for r in replaced)
        return replaced
    yield patch
    compat.unpatch_transformers()


MAMBA2_FAMILY = ["mamba2", "bamba", "nemotron_h", "falcon_h1", "zamba2", "granitemoehybrid"]


@pytest.mark.parametrize("name", MAMBA2_FAMILY + ["jamba", "falcon_mamba"])
def test_patched_model_gives_the_unpatched_logits_and_tokens(name, op_calls, patched):
    model = mamba2_family(name, groups=2).eval()
    ids = torch.randint(3, VOCAB, (2, 9))
    greedy = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    with torch.no_grad():
        logits, tokens = model(ids).logits, model.generate(ids, **greedy)
    assert not op_calls  # unpatched, transformers' own torch code ran
    replaced = patched(name)
    with torch.no_grad():
        patched_logits, patched_tokens = model(ids).logits, model.generate(ids, **greedy)
    torch.testing.assert_close(patched_logits, logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(patched_tokens, tokens) and patched_tokens.shape == (2, 19)
    scan, step = ("ssd", "ssd_state_update_") if name in MAMBA2_FAMILY else ("selective_scan", "selective_state_update")
    assert op_calls.get(scan, 0) > 0 and op_calls.get(step, 0) >= 9, (replaced, op_calls)  # prefill; each new token
    assert op_calls.get("causal_conv1d", 0) + op_calls.get("causal_conv1d_update", 0) > 0


@pytest.mark.parametrize("name", MAMBA2_FAMILY)
def test_training_runs_the_fused_layer_with_the_same_loss_and_gradients(name, op_calls, patched):
    """In training without a cache the layers call mamba_split_conv1d_scan_combined, which
    transformers leaves to its step-by-step path; patched, the whole layer after in_proj is
    mambakit's (out_proj's weight used directly: the out_proj modules are not called)."""
    model = mamba2_family(name, groups=1).train()
    ids = torch.randint(3, VOCAB, (2, 9))
    out_proj_calls = []
    for module in model.modules():
        if hasattr(module, "A_log") and hasattr(module, "out_proj"):
            module.out_proj.register_forward_hook(lambda *_: out_proj_calls.append(1))

    def loss_and_grads():
        model.zero_grad()
        out = model(ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    loss, grads = loss_and_grads()
    assert out_proj_calls
    out_proj_calls.clear()
    patched(name)
    patched_loss, patched_grads = loss_and_grads()
    assert not out_proj_calls and op_calls.get("ssd", 0) > 0  # the fused path ran, on mambakit's ops
    torch.testing.assert_close(patched_loss, loss, rtol=1e-5, atol=1e-6)
    assert patched_grads.keys() == grads.keys()
    for n in grads:
        torch.testing.assert_close(patched_grads[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_packed_sequences_run_through_the_patched_model(patched):
    """transformers passes seq_idx (padding-free packing) through to the kernels; its torch
    fallback refuses it, mambakit's entry points keep the sequences apart."""
    model = mamba2_family("mamba2", groups=2).eval()
    a, b = torch.randint(3, VOCAB, (1, 5)), torch.randint(3, VOCAB, (1, 7))
    seq_idx = torch.tensor([[0] * 5 + [1] * 7], dtype=torch.int32)
    patched("mamba2")
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), seq_idx=seq_idx).logits
        alone = torch.cat([model(a).logits, model(b).logits], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_unpatch_restores_every_function():
    modules = {name: __import__(f"transformers.models.{name}.modeling_{name}", fromlist=["_"])
               for name in compat.patch.MODELS}
    before = {(m, k): v for m, mod in modules.items() for k, v in vars(mod).items() if callable(v)}
    first = compat.patch_transformers()
    again = compat.patch_transformers()  # harmless: the originals are kept once
    assert first == again and {r.split(".")[0] for r in first} >= set(MAMBA2_FAMILY)
    model, name = first[0].split(".")
    assert getattr(modules[model], name) is not before[(model, name)]
    compat.unpatch_transformers()
    after = {(m, k): v for m, mod in modules.items() for k, v in vars(mod).items() if callable(v)}
    assert after == before


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="unknown models"):
        compat.patch_transformers(["mamba3"])
