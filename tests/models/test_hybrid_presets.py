"""The hybrid presets: hybrid-130m is the Mamba-2 130m with three attention layers in the manner
of the official mamba2attn models, written in the official hybrid config.json as it is;
hybrid-tiny is its small CPU form; --arch hybrid names both. (tests/models/test_registry.py
builds every preset; tests/models/test_hybrid.py steps hybrid-tiny against its full forward.)"""

import pytest
import torch

from mambakit import MambaConfig, MambaLM, PRESETS
from mambakit.cli.flags import arch_of, presets_of
from mambakit.modules import Attention, Mamba2


def test_hybrid_130m_is_mamba2_130m_with_three_attention_layers():
    hybrid, pure = PRESETS["hybrid-130m"], PRESETS["mamba2-130m"]
    assert (hybrid.d_model, hybrid.n_layer, hybrid.layer, hybrid.d_state, hybrid.headdim) == (768, 24, "mamba2", 128, 64)
    assert hybrid.pad_vocab_size_multiple == pure.pad_vocab_size_multiple and hybrid.d_intermediate == 0
    assert hybrid.attn_layer_idx == [6, 12, 18]
    attention = hybrid.attention  # mamba2attn's: partial rotary, a qkv conv, no biases
    assert (attention.num_heads, attention.num_heads_kv, attention.head_dim) == (12, 12, 64)
    assert (attention.rotary_emb_dim, attention.d_conv) == (32, 4)
    assert not attention.qkv_proj_bias and not attention.out_proj_bias and attention.window_size is None
    model = MambaLM(hybrid, device="meta")
    assert 110e6 < sum(p.numel() for p in model.parameters()) < 140e6  # a 130m-class model
    mixers = [type(b.mixer) for b in model.backbone.layers]
    assert [i for i, m in enumerate(mixers) if m is Attention] == [6, 12, 18]
    assert mixers.count(Mamba2) == 21


@pytest.mark.parametrize("name", ["hybrid-tiny", "hybrid-130m"])
def test_the_hybrid_presets_are_official_hybrid_configs(name):
    config = PRESETS[name]
    official = config.to_official()
    assert official["ssm_cfg"]["layer"] == "Mamba2" and official["attn_layer_idx"] == config.attn_layer_idx
    assert official["attn_cfg"]["causal"] is True and official["d_intermediate"] == 0
    assert official["attn_cfg"]["num_heads"] * official["attn_cfg"]["head_dim"] == config.d_model
    assert MambaConfig.from_official(official) == config


def test_hybrid_tiny_runs_on_cpu_with_one_attention_layer():
    torch.manual_seed(0)
    model = MambaLM.from_name("hybrid-tiny").eval()
    assert model.config.layer_pattern == "mmam" and model.config.vocab_size == 256
    with torch.no_grad():
        logits = model(torch.randint(0, 256, (2, 9)))  # (B, L, V)
    assert logits.shape == (2, 9, model.config.padded_vocab_size) and torch.isfinite(logits).all()


def test_arch_hybrid_holds_the_hybrid_presets_only():
    assert presets_of("hybrid") == ["tiny", "130m"]
    assert all(arch_of(PRESETS[f"hybrid-{size}"]) == "hybrid" for size in presets_of("hybrid"))
    assert "tiny" in presets_of("mamba2") and not any(name.startswith("hybrid") for name in presets_of("mamba2"))
    assert arch_of(MambaConfig(d_model=32, n_layer=2, layer="mamba", attn_layer_idx=[1],
                               attn_cfg={"num_heads": 2})) == "hybrid"  # a Mamba-1 hybrid too
