"""End-to-end training throughput: mambakit's MambaLM against the official
mamba_ssm MambaLMHeadModel, 130m shape, bf16 autocast, fused AdamW, in one run. The batches
are windows of the embedded standard-library corpus (byte tokens), the same for both models.

    python benchmarks/train.py [--out benchmarks/results/train_h200.json] [--profile 20]
    python benchmarks/train.py --device cpu --preset tiny --shapes 2x64 --steps 2   # a smoke run
    python benchmarks/train.py --compile    # also mambakit under torch.compile(fullgraph=True), beside eager
    python benchmarks/train.py --preset mamba2-130m --out benchmarks/results/train_mamba2_h200.json
    python benchmarks/train.py --preset hybrid-130m --out benchmarks/results/train_hybrid_h200.json
    python benchmarks/train.py --preset hybrid-130m --no-rotary     # where flash_attn is not installed
    python benchmarks/train.py --device cpu --preset hybrid-tiny --shapes 2x64 --steps 2  # the hybrid's smoke run
    python benchmarks/train.py --plot benchmarks/results/train_h100.json             # redraw the PNG

Writes the JSON and, beside it, a PNG of tokens/s and peak memory per shape. The official model
is built from the preset's `MambaConfig.to_official()`: Mamba-1, Mamba-2, or a hybrid's MHA
layers at attn_layer_idx (which need flash_attn for their rotary embedding; --no-rotary drops it
on both sides).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time

import torch
import torch.nn.functional as F


def official_model(config, device):
    from mamba_ssm.models.config_mamba import MambaConfig as OfficialConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    cfg = OfficialConfig(**config.to_official())  # Mamba-1 or Mamba-2 layers, and attention, as the preset's
    model = MambaLMHeadModel(cfg, device=device)
    return lambda ids: model(ids).logits, model


def ours_model(config, device):
    from mambakit import MambaLM
    model = MambaLM(config, device=device)
    return model, model


def ours_compiled_model(config, device):
    """mambakit's model in one torch.compile graph (the Triton kernels are custom ops), static
    shapes (each B x L its own graph); the warm-up steps of measure() compile it."""
    model, _ = ours_model(config, device)
    return torch.compile(model, fullgraph=True, dynamic=False), model


def measure(forward, model, batch, length, tokens, steps, device, profile=0):
    from mambakit.training.data import batch_at
    use_cuda = device == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=use_cuda)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_cuda)
    counter = iter(range(10**9))

    def step():
        x, y = batch_at(tokens, next(counter), batch, length, seed=0, device=device)
        with autocast:
            logits = forward(x)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(3):
        step()
    if use_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    if use_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**30 if use_cuda else None
    if profile:
        from torch.profiler import ProfilerActivity, profile as profiler
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if use_cuda else [])
        with profiler(activities=activities) as prof:
            step()
            if use_cuda:
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if use_cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=profile, max_name_column_width=60), flush=True)
    return {"tokens_per_s": batch * length * steps / elapsed, "peak_gib": peak, "last_loss": float(loss)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--preset", default="130m")
    ap.add_argument("--shapes", default="8x2048,2x8192")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/train_h200.json")
    ap.add_argument("--profile", type=int, default=0, help="print the top N kernels of one step of each model")
    ap.add_argument("--max-corpus-bytes", type=int, default=None)
    ap.add_argument("--plot", metavar="JSON", help="only draw the PNG of an existing result")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                    help="also measure mambakit's training step under torch.compile(fullgraph=True)")
    ap.add_argument("--no-rotary", action="store_true",
                    help="a hybrid's attention without rotary embeddings (both models): the official MHA then "
                         "trains on SDPA and needs no flash_attn")
    args = ap.parse_args()
    if args.plot:
        with open(args.plot) as f:
            plot(json.load(f), args.plot.replace(".json", ".png"))
        return
    from mambakit import MambaConfig
    from mambakit.training.data import load_corpus
    config = MambaConfig.from_name(args.preset)
    if args.no_rotary and config.attn_layer_idx:
        config = dataclasses.replace(config, attn_cfg={**config.attn_cfg, "rotary_emb_dim": 0})
    corpus = load_corpus(None, max_bytes=args.max_corpus_bytes)
    if config.vocab_size < corpus.vocab_size:  # the tiny preset: bytes, and the corpus adds EOS
        config = dataclasses.replace(config, vocab_size=corpus.vocab_size)
    builders = [("mambakit", ours_model)]
    if args.compile:
        builders.append(("mambakit_compiled", ours_compiled_model))
    if args.device == "cuda":
        try:
            importlib.import_module("mamba_ssm")
            if config.attn_layer_idx and config.attn_cfg.get("rotary_emb_dim", 0):  # the official MHA's rotary
                importlib.import_module("flash_attn")
            builders.append(("official", official_model))
        except ImportError as err:
            print("official mamba_ssm (with flash_attn for a hybrid) not importable:", err)
    rows = []
    for shape in args.shapes.split(","):
        batch, length = map(int, shape.split("x"))
        row = {"B": batch, "L": length}
        for name, build in builders:
            torch.manual_seed(0)
            forward, model = build(config, args.device)
            try:
                row[name] = measure(forward, model, batch, length, corpus.train, args.steps, args.device,
                                    args.profile if shape == args.shapes.split(",")[0] else 0)
            except torch.OutOfMemoryError:
                row[name] = "out of memory"
            del forward, model
            if args.device == "cuda":
                torch.cuda.empty_cache()
        if isinstance(row.get("official"), dict) and isinstance(row.get("mambakit"), dict):
            row["tokens_per_s_ratio"] = row["mambakit"]["tokens_per_s"] / row["official"]["tokens_per_s"]
        if isinstance(row.get("mambakit_compiled"), dict) and isinstance(row.get("mambakit"), dict):
            row["compiled_speedup"] = row["mambakit_compiled"]["tokens_per_s"] / row["mambakit"]["tokens_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"preset": args.preset, "corpus": corpus.name.split(" (")[0], "compile": args.compile,  # no host path
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "steps": args.steps, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, args.out.replace(".json", ".png"))


def plot(result, path):
    """Tokens/s (left) and peak memory (right) of both models at each B x L shape."""
    import matplotlib  # a dependency of mambakit
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    names = [n for n in ("mambakit", "mambakit_compiled", "official")
             if any(isinstance(r.get(n), dict) for r in rows)]
    colors = {"mambakit": "tab:green", "mambakit_compiled": "tab:olive", "official": "tab:gray"}
    labels = [f"{r['B']} x {r['L']}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rows))]
        for ax, key, scale, fmt in ((axes[0], "tokens_per_s", 1e-3, "%.1fk"), (axes[1], "peak_gib", 1, "%.1f")):
            values = [r[name][key] * scale if isinstance(r.get(name), dict) and r[name].get(key) else 0
                      for r in rows]
            bars = ax.bar(xs, values, width, label=name, color=colors[name])
            ax.bar_label(bars, fmt=fmt, fontsize=8)
    for j, r in enumerate(rows):
        if "tokens_per_s_ratio" in r:
            axes[0].annotate(f"{r['tokens_per_s_ratio']:.2f}x", (j, 0), xytext=(0, -28),
                             textcoords="offset points", ha="center", fontsize=9)
    for ax, ylabel, title in ((axes[0], "k tokens / s (higher is better)", "training throughput"),
                              (axes[1], "peak GiB", "peak memory")):
        ax.set_xticks(range(len(rows)), labels=labels)
        ax.set(ylabel=ylabel, title=title)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['preset']} LM, bf16 autocast, fused AdamW, {result['device']}, {result['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print("wrote", path)


if __name__ == "__main__":
    main()
