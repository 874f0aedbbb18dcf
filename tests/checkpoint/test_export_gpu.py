"""format="official" read by mamba_ssm's own loader (`MambaLMHeadModel.from_pretrained`), and
mamba_ssm's own `save_pretrained` read by mambakit: the same logits to 1e-4 (fp32, on the GPU,
where mamba_ssm runs). Skipped without a CUDA device or without mamba_ssm installed."""

from __future__ import annotations

import pytest
import torch

from mambakit import PRESETS, MambaLM
from tests.checkpoint.test_checkpoint import logits_of
from tests.checkpoint.test_export import ids_for
from tests.checkpoint.weights import randomize_constants_

pytestmark = pytest.mark.gpu

OFFICIAL_EXPORTS = {
    "tiny": ("tiny", {}),
    "tiny-untied-padded-vocab-bias": ("tiny", {"tie_embeddings": False, "vocab_size": 250, "bias": True}),
    "tiny-layernorm-no-conv-bias-dt-rank": ("tiny", {"rms_norm": False, "residual_in_fp32": False,
                                                     "conv_bias": False, "dt_rank": 5}),
    "130m": ("130m", {}),
    "mamba2-tiny": ("mamba2-tiny", {}),
    "mamba2-130m": ("mamba2-130m", {}),
    # the official MHA needs flash_attn for rotary embeddings; without rotary it runs on SDPA
    "hybrid-tiny-no-rotary": ("hybrid-tiny", {"attn_cfg": {"num_heads": 4, "head_dim": 32, "rotary_emb_dim": 0,
                                                           "d_conv": 4, "qkv_proj_bias": False,
                                                           "out_proj_bias": False, "causal": True}}),
}


def mamba_lm_head_model():
    return pytest.importorskip("mamba_ssm.models.mixer_seq_simple").MambaLMHeadModel


@pytest.mark.parametrize("preset,overrides", list(OFFICIAL_EXPORTS.values()), ids=list(OFFICIAL_EXPORTS))
def test_official_export_loads_in_mamba_ssm_with_equal_logits(tmp_path, monkeypatch, preset, overrides):
    MambaLMHeadModel = mamba_lm_head_model()
    # the official Mamba-2 kernels are Triton dots without a precision, which Triton runs in tf32
    # on fp32 inputs (about 1e-3 relative per product): make them exact, as mambakit's fp32 dots
    # are, so that the comparison measures the export and not tf32 rounding (a key of Triton's cache)
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    model = randomize_constants_(MambaLM.from_name(preset, **overrides)).to("cuda").eval()
    model.save_pretrained(tmp_path, format="official")
    official = MambaLMHeadModel.from_pretrained(str(tmp_path), device="cuda", dtype=torch.float32).eval()
    ids = ids_for(model.config).to("cuda")
    with torch.no_grad():
        expected = official(ids).logits
    torch.testing.assert_close(logits_of(model, ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "130m"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_mamba_ssm_save_loads_in_mambakit_with_equal_logits(tmp_path, preset, tied):
    MambaLMHeadModel = mamba_lm_head_model()
    from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
    shape = PRESETS[preset]
    torch.manual_seed(0)
    config = OfficialConfig(d_model=shape.d_model, n_layer=shape.n_layer, vocab_size=shape.vocab_size,
                            ssm_cfg={"d_state": shape.d_state}, tie_embeddings=tied)
    official = MambaLMHeadModel(config, device="cuda", dtype=torch.float32)
    randomize_constants_(official).eval()
    official.save_pretrained(str(tmp_path))

    ours = MambaLM.from_pretrained(tmp_path, device="cuda")
    assert ours.config.tie_embeddings == tied and ours.config.padded_vocab_size == official.lm_head.weight.shape[0]
    ids = ids_for(ours.config).to("cuda")
    with torch.no_grad():
        expected = official(ids).logits
    torch.testing.assert_close(logits_of(ours, ids), expected, atol=1e-4, rtol=0)


def test_official_hybrid_decodes_through_the_compat_kv_attention_to_our_tokens(monkeypatch):
    """Without flash_attn the official MHA's decoding step masks a single query top-left (it sees
    the first key only); with mambakit.compat.flash_attn_with_kvcache in flash_attn's place, its
    CUDA-graph generate gives mambakit's greedy tokens for a batch of prompts, and its first step
    the same logits."""
    MambaLMHeadModel = mamba_lm_head_model()
    from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
    from mamba_ssm.modules import mha

    from mambakit.compat import flash_attn_with_kvcache
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    monkeypatch.setattr(mha, "flash_attn_with_kvcache", flash_attn_with_kvcache)
    preset, overrides = OFFICIAL_EXPORTS["hybrid-tiny-no-rotary"]
    # the attention's conv off: after the prompt the official MHA keeps the conv's outputs, not its
    # inputs, as the conv state, so with the conv on its decoding drifts from its own forward (about
    # 1e-2 on logits of 0.8, measured on an H200), whatever the attention kernel
    overrides = {**overrides, "attn_cfg": {**overrides["attn_cfg"], "d_conv": 0}}
    torch.manual_seed(0)
    ours = MambaLM.from_name(preset, **overrides).to("cuda").eval()
    official = MambaLMHeadModel(OfficialConfig(**ours.config.to_official()), device="cuda", dtype=torch.float32)
    official.load_state_dict(ours.state_dict())
    official.eval()
    ids = torch.randint(0, ours.config.vocab_size, (3, 20), device="cuda")
    theirs = official.generate(ids, max_length=ids.shape[1] + 24, cg=True, temperature=1.0, top_k=1,
                               output_scores=True, return_dict_in_generate=True)
    mine = ours.generate(ids, max_new_tokens=24)
    assert torch.equal(mine[:, ids.shape[1]:], theirs.sequences[:, ids.shape[1]:])
    with torch.no_grad():
        full = logits_of(ours, theirs.sequences[:, :ids.shape[1] + 1])[:, -1]
    torch.testing.assert_close(theirs.scores[1].float(), full.float(), atol=1e-5, rtol=0)
