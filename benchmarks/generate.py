"""Decoding speed on the GPU: mambakit's generate (fused step kernels, CUDA graph) against the
official `MambaLMHeadModel.generate(cg=True)`, in one run, with the same random weights.

  1. ms/step and tokens/s at batch 1 and 64: 130m shape, bf16, prompt 128, 512 new, greedy.
     ms/step = (time for 512 new tokens - time for 1 new token) / 511, for both.
  2. the latency of prefilling an 8k-token prompt (time to the first new token).
  3. ms per decoded token against context length (1k .. 128k): mambakit against a Transformer of
     the same size with a KV cache (transformers' Llama, random weights, SDPA).

    python benchmarks/generate.py [--out benchmarks/results/generate_h200.json]
    python benchmarks/generate.py --decode-only --out OUT.json   # part 1 only
    python benchmarks/generate.py --smoke        # CPU, tiny sizes: checks that the script runs
    python benchmarks/generate.py --preset mamba2-130m --decode-only --out benchmarks/results/generate_mamba2_h200.json
    python benchmarks/generate.py --preset hybrid-130m --decode-only --out benchmarks/results/generate_hybrid_h200.json
    python benchmarks/generate.py --preset hybrid-130m --no-rotary --decode-only   # where flash_attn is missing

The official model is built from the preset's `MambaConfig.to_official()` with mambakit's weights
(the same names): Mamba-1, Mamba-2, or a hybrid's MHA layers, which decode with flash_attn's
flash_attn_with_kvcache; where flash_attn is not installed and the attention has no rotary
embedding, with mambakit.compat's SDPA stand-in for it (the JSON's official_attention says which). --smoke
takes the tiny preset of --preset's family (tiny, mamba2-tiny, hybrid-tiny).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time

import torch


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def ours_ms_per_step(model, ids, new, device):
    model.generate(ids, max_new_tokens=8)  # compiles the kernels, captures the graph for this batch size
    one = _timed(lambda: model.generate(ids, max_new_tokens=1), device)
    many = _timed(lambda: model.generate(ids, max_new_tokens=new), device)
    return (many - one) / (new - 1) * 1e3, one * 1e3


def official_ms_per_step(official, ids, new, device):
    def run(n):
        return official.generate(ids, max_length=ids.shape[1] + n, cg=True, temperature=1.0, top_k=1)
    run(8)
    one = _timed(lambda: run(1), device)
    many = _timed(lambda: run(new), device)
    return (many - one) / (new - 1) * 1e3, one * 1e3


def official_model(ours, device, dtype):
    """The official MambaLMHeadModel with ours's weights, and how its attention decodes: flash_attn's
    kernel, or (flash_attn not installed, attention without rotary) mambakit.compat's SDPA stand-in
    for flash_attn_with_kvcache, put into the official MHA module in its place."""
    from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    c = ours.config
    attention = None
    if c.attn_layer_idx:  # the official MHA: rotary embedding and KV-cache attention from flash_attn
        try:
            importlib.import_module("flash_attn")
            attention = "flash_attn"
        except ImportError:
            if c.attn_cfg.get("rotary_emb_dim", 0):
                raise
            from mamba_ssm.modules import mha
            from mambakit.compat import flash_attn_with_kvcache
            mha.flash_attn_with_kvcache = flash_attn_with_kvcache
            attention = "mambakit.compat.flash_attn_with_kvcache (SDPA; flash_attn not installed)"
    cfg = OfficialConfig(**c.to_official())  # Mamba-1 or Mamba-2 layers, and attention, as the preset's
    model = MambaLMHeadModel(cfg, device=device, dtype=dtype)
    model.load_state_dict(ours.state_dict())  # the same weights: the names follow the official ones
    return model.eval(), attention


def transformer_like(config, device, dtype, max_len):
    """A Llama of the Mamba's size class (12 layers x 768, 12 heads), random weights, SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=config.padded_vocab_size, hidden_size=config.d_model, intermediate_size=2048,
                      num_hidden_layers=max(1, config.n_layer // 2), num_attention_heads=max(1, config.d_model // 64),
                      max_position_embeddings=max_len + 64, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device, dtype).eval()


def _kernel_ms(fn, device) -> float:
    """The summed GPU kernel time of fn() in ms (0 on CPU): what the work costs on the device,
    without the host-side overhead that dominates an eager decode loop."""
    if device != "cuda":
        return 0.0
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3


def _kv_mib(past) -> float:
    tensors = []
    for obj in (getattr(past, "layers", None) or []):
        tensors += [t for t in (getattr(obj, "keys", None), getattr(obj, "values", None)) if torch.is_tensor(t)]
    if not tensors and hasattr(past, "key_cache"):
        tensors = list(past.key_cache) + list(past.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


@torch.no_grad()
def per_token_vs_context(model, llama, contexts, device, steps=32):
    rows = []
    for ctx in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, ctx), device=device)
        _, cache = model.prefill(ids)
        model.generate(cache=cache, max_new_tokens=4)
        ms = _timed(lambda: model.generate(cache=cache, max_new_tokens=steps), device, repeats=2) / steps * 1e3
        row = dict(context=ctx, mambakit_ms_per_token=ms, mambakit_state_mib=cache.nbytes() / 2**20,
                   mambakit_gpu_ms_per_token=_kernel_ms(lambda: model.generate(cache=cache, max_new_tokens=steps),
                                                        device) / steps)
        if llama is not None:
            out = llama(ids, use_cache=True)
            past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)

            def decode():
                nonlocal past, tok
                for _ in range(steps):
                    o = llama(tok, past_key_values=past, use_cache=True)
                    past, tok = o.past_key_values, o.logits[:, -1:].argmax(-1)
            decode()  # warm-up (the cache grows by `steps`; negligible against ctx)
            row["transformer_ms_per_token"] = _timed(decode, device, repeats=1) / steps * 1e3
            row["transformer_gpu_ms_per_token"] = _kernel_ms(decode, device) / steps
            row["transformer_kv_cache_mib"] = _kv_mib(past)
            del out, past
        print(json.dumps(row), flush=True)
        rows.append(row)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_gpu, ax_mem) = plt.subplots(1, 3, figsize=(15, 4))
    ctx = [r["context"] for r in rows]
    has_t = all("transformer_ms_per_token" in r for r in rows)
    for axis, key, label in ((ax, "ms_per_token", "wall ms per decoded token"),
                             (ax_gpu, "gpu_ms_per_token", "GPU kernel ms per decoded token"),
                             (ax_mem, None, "state / KV cache (MiB)")):
        ours = "mambakit_state_mib" if key is None else f"mambakit_{key}"
        theirs = "transformer_kv_cache_mib" if key is None else f"transformer_{key}"
        axis.plot(ctx, [r[ours] for r in rows], "o-", label="mambakit (recurrent state)")
        if has_t:
            axis.plot(ctx, [r[theirs] for r in rows], "s-", label="Transformer + KV cache (SDPA)")
        axis.set_xscale("log", base=2)
        if key is None or key == "gpu_ms_per_token":
            axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(label + " (batch 1)")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_decode(result, path):
    """ms per decoded token of both models at each batch, with the ratio over each pair."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in result["decode"] if "official_ms_per_step" in r]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    where = range(len(rows))
    ax.bar([i - 0.2 for i in where], [r["mambakit_ms_per_step"] for r in rows], 0.4, label="mambakit")
    ax.bar([i + 0.2 for i in where], [r["official_ms_per_step"] for r in rows], 0.4, label="official (cg=True)")
    tops = [max(r["mambakit_ms_per_step"], r["official_ms_per_step"]) for r in rows]
    for i, r, top in zip(where, rows, tops):
        ax.text(i, top * 1.02, f"{r['tokens_per_s_ratio']:.2f}x", ha="center")
    ax.set_ylim(0, 1.12 * max(tops))
    ax.set_xticks(list(where), [f"batch {r['batch']}" for r in rows])
    ax.set(ylabel="ms per decoding step", title=f"{result['preset']} decoding, {result['device']}, {result['dtype']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tiny_of(preset: str) -> str:
    """The tiny preset of a preset's family: mamba2-130m -> mamba2-tiny, hybrid-130m -> hybrid-tiny, 130m -> tiny."""
    family = preset.rsplit("-", 1)[0] + "-" if "-" in preset else ""
    return family + "tiny"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/generate_h200.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    ap.add_argument("--preset", default="130m",
                    help="the model's preset (mamba2-130m for Mamba-2, hybrid-130m for the hybrid)")
    ap.add_argument("--no-rotary", action="store_true",
                    help="a hybrid's attention without rotary embeddings (both models): where flash_attn is not "
                         "installed, the official MHA then decodes through mambakit.compat.flash_attn_with_kvcache")
    ap.add_argument("--no-attn-conv", action="store_true",
                    help="a hybrid's attention without its causal conv over q, k, v (both models): the official MHA "
                         "keeps the conv's outputs, not its inputs, as the conv state after the prompt, so its "
                         "decoding drifts from its own forward wherever the conv is on")
    ap.add_argument("--decode-only", action="store_true",
                    help="only part 1 (ms/step against the official generate), with its bar plot")
    ap.add_argument("--plot-decode", metavar="JSON", help="only draw the decode bar plot of an existing result")
    args = ap.parse_args()
    if args.plot_decode:
        with open(args.plot_decode) as f:
            plot_decode(json.load(f), args.plot_decode.replace(".json", ".png"))
        return
    from mambakit import MambaConfig, MambaLM
    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float32 if args.smoke else torch.bfloat16
    preset, prompt_len, new = (tiny_of(args.preset), 16, 8) if args.smoke else (args.preset, 128, 512)
    batches = (1, 4) if args.smoke else (1, 64)
    contexts = (64, 256) if args.smoke else tuple(2**k for k in range(10, 18))
    long_prompt = 256 if args.smoke else 8192
    torch.manual_seed(0)
    config = MambaConfig.from_name(preset)
    if args.no_rotary and config.attn_layer_idx:
        config = dataclasses.replace(config, attn_cfg={**config.attn_cfg, "rotary_emb_dim": 0})
    if args.no_attn_conv and config.attn_layer_idx:
        config = dataclasses.replace(config, attn_cfg={**config.attn_cfg, "d_conv": 0})
    model = MambaLM(config, device=device, dtype=dtype).eval()
    try:
        official, official_attention = (None, None) if args.smoke else official_model(model, device, dtype)
    except ImportError as err:
        print("official mamba_ssm not importable:", err)
        official, official_attention = None, None
    result = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), preset=preset, dtype=str(dtype), prompt=prompt_len, new_tokens=new,
                  rotary=bool(model.config.attn_cfg.get("rotary_emb_dim", 0)) if model.config.attn_layer_idx else None,
                  attn_conv=model.config.attn_cfg.get("d_conv", 0) if model.config.attn_layer_idx else None,
                  official_attention=official_attention, decode=[])
    for batch in batches:
        ids = torch.randint(0, model.config.vocab_size, (batch, prompt_len), device=device)
        row = dict(batch=batch)
        row["mambakit_ms_per_step"], row["mambakit_first_token_ms"] = ours_ms_per_step(model, ids, new, device)
        if official is not None:
            row["official_ms_per_step"], row["official_first_token_ms"] = official_ms_per_step(official, ids, new,
                                                                                               device)
            row["tokens_per_s_ratio"] = row["official_ms_per_step"] / row["mambakit_ms_per_step"]
            ours_ids = model.generate(ids, max_new_tokens=32)
            theirs = official.generate(ids, max_length=prompt_len + 32, cg=True, temperature=1.0, top_k=1)
            theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.sequences
            row["greedy_token_match"] = (ours_ids[:, prompt_len:] == theirs[:, prompt_len:]).float().mean().item()
        print(json.dumps(row), flush=True)
        result["decode"].append(row)
    if args.decode_only:
        if not args.smoke:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            plot_decode(result, args.out.replace(".json", ".png"))
        return
    ids = torch.randint(0, model.config.vocab_size, (1, long_prompt), device=device)
    result["prefill"] = dict(tokens=long_prompt, mambakit_ms=_timed(lambda: model.prefill(ids), device) * 1e3)
    if official is not None:
        result["prefill"]["official_first_token_ms"] = _timed(
            lambda: official.generate(ids, max_length=long_prompt + 1, cg=True, temperature=1.0, top_k=1), device) * 1e3
    print(json.dumps(result["prefill"]), flush=True)
    try:
        llama = transformer_like(model.config, device, dtype, max(contexts) + 64)
    except ImportError:
        llama = None
    result["per_token_vs_context"] = per_token_vs_context(model, llama, contexts, device, steps=4 if args.smoke else 32)
    if args.smoke:
        return
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result["per_token_vs_context"], args.out.replace(".json", ".png"))


if __name__ == "__main__":
    main()
