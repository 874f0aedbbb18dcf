"""Decoding memory and ms/token against context length, in one run, for three models of the same
width: pure Mamba-2, a hybrid (a few attention layers among the Mamba-2 layers) and a
Transformer (every layer attention followed by a gated MLP).

    Mamba-2      the preset (mamba2-130m: 24 layers x 768), random weights
    hybrid       the same with --attn-layers of its layers attention (3 of 24, evenly spaced:
                 6, 12, 18), heads of --head-dim channels in the manner of the official
                 mamba2attn models: rotary on half of each head, a causal conv of width
                 --attn-d-conv over q, k and v, no biases; no MLP
    Transformer  --transformer-layers (default n_layer / 2: an attention + MLP block has about
                 the parameters of two Mamba blocks) of attention (full rotary, no conv, no
                 biases) + a gated MLP of --d-intermediate (default: the official GatedMLP's
                 8/3 d_model, rounded up to 128)

For each model and context length L: prefill L random tokens (--prefill-chunk tokens at a time,
the cache carried, so that the attention's masks stay small), the KV caches allocated at once for
L and the decoded tokens; then time greedy decoding through model.generate(cache=...), as
generation runs it (on the GPU the whole step is one CUDA-graph replay, the attention attending
over the cache's slots): ms/token = (time of steps + 1 new tokens - time of 1) / steps, the best
of --repeats. Reported per row: ms_per_token, the cache's bytes from the cache objects (every
state tensor's nbytes: kv_bytes for the attention layers' keys, values and lengths, ssm_bytes for
the Mamba layers' conv and SSM states), and on CUDA torch.cuda.max_memory_allocated over the
prefill and decoding (weights included; the CUDA-graph decoder keeps its own copy of the cache,
generation/cuda_graph.py, so the peak holds the cache twice). A length that runs out of memory
is recorded as "oom" and the run goes on.

    python benchmarks/hybrid_decode.py                 # CUDA, 1k..128k: results/hybrid_decode_h200.json + .png
    python benchmarks/hybrid_decode.py --contexts 1024,8192 --models mamba2,hybrid --out OUT.json
    python benchmarks/hybrid_decode.py --smoke         # CPU, tiny, 128..1024: runs/hybrid_decode_smoke.json
    python benchmarks/hybrid_decode.py --plot benchmarks/results/hybrid_decode_h200.json   # redraw the PNG
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generate import _sync, _timed  # noqa: E402  (the decoding benchmark's timing, best of N)
from mambakit import MambaLM  # noqa: E402
from mambakit.config import OFFICIAL_MLP_MULTIPLE, MambaConfig  # noqa: E402

MODELS = ("mamba2", "hybrid", "transformer")
LABELS = {"mamba2": "Mamba-2", "hybrid": "hybrid (Mamba-2 + attention)", "transformer": "Transformer"}
CUDA_CONTEXTS = (1024, 4096, 16384, 65536, 131072)
SMOKE_CONTEXTS = (128, 256, 512, 1024)


# ---- the three models ------------------------------------------------------------------------

def attention_layers(n_layer: int, count: int) -> list[int]:
    """`count` layers of n_layer spread evenly (3 of 24: 6, 12, 18; 1 of 4: 2)."""
    if not 1 <= count <= n_layer:
        raise ValueError(f"--attn-layers must be in 1..{n_layer} (the layers), got {count}")
    return [(i + 1) * n_layer // (count + 1) for i in range(count)]  # distinct: a step of n / (count + 1)


def official_mlp_width(d_model: int) -> int:
    """The official GatedMLP's default hidden width: 8/3 d_model rounded up to a multiple of 128."""
    return -(-(8 * d_model // 3) // OFFICIAL_MLP_MULTIPLE) * OFFICIAL_MLP_MULTIPLE


def model_configs(base: MambaConfig, attn_layers: int, head_dim: int, kv_heads: int | None,
                  transformer_layers: int, d_intermediate: int, attn_d_conv: int = 4) -> dict[str, MambaConfig]:
    """{"mamba2": base, "hybrid": base with attn_layers attention layers, "transformer": every
    layer attention + a gated MLP}, all of base's width. A ValueError names the flag that does
    not fit the width."""
    if base.d_model % head_dim:
        raise ValueError(f"--head-dim ({head_dim}) must divide d_model ({base.d_model})")
    heads = base.d_model // head_dim
    attn = {"num_heads": heads, "num_heads_kv": kv_heads or heads, "head_dim": head_dim, "qkv_proj_bias": False,
            "out_proj_bias": False}
    hybrid = dataclasses.replace(base, attn_layer_idx=attention_layers(base.n_layer, attn_layers),
                                 attn_cfg={**attn, "rotary_emb_dim": head_dim // 2, "d_conv": attn_d_conv})
    transformer = dataclasses.replace(base, n_layer=transformer_layers, attn_layer_idx=list(range(transformer_layers)),
                                      attn_cfg={**attn, "rotary_emb_dim": head_dim}, d_intermediate=d_intermediate)
    return {"mamba2": base, "hybrid": hybrid, "transformer": transformer}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---- the cache -------------------------------------------------------------------------------

def cache_bytes(cache) -> dict[str, int]:
    """The bytes of an LMCache's states, from the cache objects: every tensor field of every
    layer's state (an attention layer's keys, values, lengths and conv state: kv_bytes; a Mamba
    layer's conv and SSM states: ssm_bytes), and their sum, cache_bytes (the next-token logits
    not counted)."""
    from mambakit.modules import AttentionState
    kv = ssm = 0
    for state in cache.layers:
        size = sum(value.nbytes for value in (getattr(state, f.name) for f in dataclasses.fields(state))
                   if isinstance(value, torch.Tensor))
        if isinstance(state, AttentionState):
            kv += size
        else:
            ssm += size
    return {"kv_bytes": kv, "ssm_bytes": ssm, "cache_bytes": kv + ssm}


def decode_tokens(steps: int, repeats: int) -> int:
    """The tokens decode_ms_per_token feeds into the cache: a 2-token warm-up, then each repeat
    of 1 token and of steps + 1."""
    return 2 + repeats * (steps + 2)


@torch.no_grad()
def prefilled_cache(model: MambaLM, context: int, batch: int, chunk: int, slots: int, device, seed: int = 0):
    """The cache after `context` random tokens, prefilled `chunk` at a time, its KV caches
    allocated for `slots` positions from the start (no growing copies)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=generator).to(device)
    cache = None
    for start in range(0, context, chunk):
        part = ids[:, start:start + chunk]
        if cache is None:
            _, cache = model.prefill(part, max_seqlen=slots)
        else:
            model.prefill(part, cache=cache)
    return cache


# ---- timing ----------------------------------------------------------------------------------

def decode_ms_per_token(model: MambaLM, cache, steps: int, repeats: int, device) -> float:
    """ms per decoded token from `cache` through model.generate (greedy; the CUDA-graph step on
    the GPU): (time of steps + 1 new tokens - time of 1) / steps, the best of `repeats` each.
    The cache takes in every token (decode_tokens(steps, repeats) in all)."""
    def run(n: int) -> None:
        model.generate(cache=cache, max_new_tokens=n)
    run(2)  # warm-up: the kernels, and on the GPU the graph's capture for this batch and these KV slots
    one = _timed(lambda: run(1), device, repeats)
    many = _timed(lambda: run(steps + 1), device, repeats)
    return max(many - one, 0.0) / steps * 1e3


def _forget_graphs(model: MambaLM) -> None:
    """Drops the CUDA-graph decoders that generation keeps on the model (one per batch size and
    KV slots, each with its own copy of the cache), so that one context's do not stay in memory
    for the next."""
    model.__dict__.pop("_cuda_graphs", None)


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure_context(model: MambaLM, context: int, args, device) -> dict:
    """One row: prefill `context` tokens, time decoding, and read the memory; {"context",
    "status": "oom"} when it runs out of memory."""
    cuda = torch.device(device).type == "cuda"
    row = {"context": context}
    cache = None
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        slots = context + decode_tokens(args.steps, args.repeats)
        start = time.perf_counter()
        cache = prefilled_cache(model, context, args.batch, args.prefill_chunk, slots, device, args.seed)
        _sync(device)
        row["prefill_s"] = round(time.perf_counter() - start, 3)
        row.update(cache_bytes(cache))
        row["ms_per_token"] = decode_ms_per_token(model, cache, args.steps, args.repeats, device)
        row["kv_slots"] = slots if model.config.attn_layer_idx else 0
        row["max_memory_allocated"] = torch.cuda.max_memory_allocated(device) if cuda else None
    except torch.OutOfMemoryError as err:
        row = {"context": context, "status": "oom", "error": str(err).splitlines()[0][:200]}
    finally:
        del cache
        _forget_graphs(model)
        _free(device)
    return row


def run_model(name: str, config: MambaConfig, args, device, dtype) -> dict:
    """Every context length of one model; a model that does not fit at all: every row "oom"."""
    torch.manual_seed(args.seed)
    try:
        model = MambaLM(config, device=device, dtype=dtype).eval()
    except torch.OutOfMemoryError:
        _free(device)
        return {"label": LABELS[name], "rows": [{"context": c, "status": "oom"} for c in args.contexts]}
    result = {"label": LABELS[name], "n_params": n_params(model), "layer_pattern": config.layer_pattern,
              "config": config.to_dict(), "rows": []}
    for context in args.contexts:
        row = measure_context(model, context, args, device)
        print(json.dumps({"model": name, **row}), flush=True)
        result["rows"].append(row)
    del model
    _free(device)
    return result


# ---- the plot --------------------------------------------------------------------------------

def _count(n: int) -> str:
    return f"{n / 1e6:.0f}M parameters" if n >= 1e6 else f"{n / 1e3:.0f}K parameters"


def plot(result: dict, path: Path) -> None:
    """ms/token and memory (the cache; the peak allocated on CUDA) against the context length."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_ms, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, entry in result["models"].items():
        rows = [r for r in entry["rows"] if "ms_per_token" in r]
        oom = [r["context"] for r in entry["rows"] if r.get("status") == "oom"]
        label = f"{entry['label']} ({_count(entry['n_params'])})" if "n_params" in entry else entry["label"]
        line, = ax_ms.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], "o-", label=label)
        color = line.get_color()
        ax_mem.plot([r["context"] for r in rows], [r["cache_bytes"] / 2**20 for r in rows], "o-", color=color,
                    label=f"{entry['label']}: cache")
        peaks = [r for r in rows if r.get("max_memory_allocated")]
        if peaks:
            ax_mem.plot([r["context"] for r in peaks], [r["max_memory_allocated"] / 2**20 for r in peaks], "s--",
                        color=color, alpha=0.6, label=f"{entry['label']}: peak allocated")
        if oom:
            ax_ms.plot(oom, [ax_ms.get_ylim()[1]] * len(oom), "x", color=color, ms=9, label=f"{entry['label']}: oom")
    batch = result.get("batch", 1)
    for ax, ylabel in ((ax_ms, f"ms per decoded token (batch {batch})"), (ax_mem, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_ms.set_title(f"decoding, {result.get('dtype', '')} on {result.get('device', '')}")
    ax_mem.set_title("memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- the command -----------------------------------------------------------------------------

def _contexts(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of ints, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"every context length must be >= 1, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, mamba2-tiny's width, contexts 128..1024")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda, cpu with --smoke)")
    p.add_argument("--preset", default=None, help="the Mamba-2 preset (default mamba2-130m; mamba2-tiny with --smoke)")
    p.add_argument("--d-model", type=int, default=None, help="override the preset's width")
    p.add_argument("--n-layer", type=int, default=None, help="override the preset's layer count")
    p.add_argument("--attn-layers", type=int, default=None, help="the hybrid's attention layers (default 3; 1 --smoke)")
    p.add_argument("--head-dim", type=int, default=None, help="channels per attention head (default 64; 32 --smoke)")
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: as many as the query heads)")
    p.add_argument("--attn-d-conv", type=int, default=4,
                   help="the hybrid's causal conv over q, k, v (the official mamba2attn's 4; 0: none)")
    p.add_argument("--transformer-layers", type=int, default=None, help="the Transformer's layers (default n_layer/2)")
    p.add_argument("--d-intermediate", type=int, default=None,
                   help="the Transformer's MLP width (default: 8/3 d_model rounded up to 128)")
    p.add_argument("--models", default=",".join(MODELS), help=f"a comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--contexts", type=_contexts, default=None,
                   help="comma-separated context lengths (default 1024,4096,16384,65536,131072; 128..1024 --smoke)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="decoded tokens timed (default 128; 8 --smoke)")
    p.add_argument("--repeats", type=int, default=3, help="the best of this many timings")
    p.add_argument("--prefill-chunk", type=int, default=8192, help="tokens per prefill forward")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="default benchmarks/results/hybrid_decode_h200.json "
                                               "(runs/hybrid_decode_smoke.json with --smoke)")
    p.add_argument("--plot", metavar="JSON", help="only redraw the PNG of an existing result")
    return p


def resolve(args) -> argparse.Namespace:
    """The flags with the smoke / CUDA defaults filled in, checked (SystemExit `error: ...`)."""
    smoke = args.smoke
    defaults = dict(device="cpu" if smoke else "cuda", preset="mamba2-tiny" if smoke else "mamba2-130m",
                    attn_layers=1 if smoke else 3, head_dim=32 if smoke else 64,
                    contexts=SMOKE_CONTEXTS if smoke else CUDA_CONTEXTS, steps=8 if smoke else 128)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models:
        raise SystemExit(f"error: --models takes a subset of {','.join(MODELS)}, got {args.models!r}")
    args.models = models
    for name in ("batch", "steps", "repeats", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: run with --smoke (or --device cpu) on a CPU")
    return args


def configs_from_args(args) -> dict[str, MambaConfig]:
    overrides = {k: v for k, v in (("d_model", args.d_model), ("n_layer", args.n_layer)) if v is not None}
    try:
        base = MambaConfig.from_name(args.preset, **overrides)
        if base.layer != "mamba2":
            raise ValueError(f"--preset must be a Mamba-2 preset (layer mamba2), got {args.preset} ({base.layer})")
        transformer_layers = args.transformer_layers or max(1, base.n_layer // 2)
        d_intermediate = args.d_intermediate or official_mlp_width(base.d_model)
        return model_configs(base, args.attn_layers, args.head_dim, args.kv_heads, transformer_layers, d_intermediate,
                             args.attn_d_conv)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.plot:
        plot(json.loads(Path(args.plot).read_text()), Path(args.plot).with_suffix(".png"))
        return 0
    args = resolve(args)
    configs = configs_from_args(args)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    root = Path(__file__).resolve().parents[1]
    out = Path(args.out) if args.out else (root / "runs" / "hybrid_decode_smoke.json" if args.smoke
                                           else root / "benchmarks" / "results" / "hybrid_decode_h200.json")
    result = {"benchmark": "hybrid_decode", "smoke": args.smoke,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "dtype": str(dtype).replace("torch.", ""),
              "preset": args.preset, "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
              "prefill_chunk": args.prefill_chunk, "contexts": list(args.contexts),
              "cuda_graph": device.type == "cuda", "models": {}}
    start = time.perf_counter()
    for name in args.models:
        result["models"][name] = run_model(name, configs[name], args, device, dtype)
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out.with_suffix(".png"))
    print(f"total {result['total_seconds']:.0f} s; wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
