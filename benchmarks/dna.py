"""The Mamba paper's DNA context-length experiment on real genomes: models of one size trained at
context 1k, 4k, 16k, 64k, 256k and 1M with the same number of tokens seen, each scored on a
held-out strain at its own context (held-out bits per base), Mamba against a Transformer of the
same width and depth (transformers' Llama, SDPA) where its memory allows. Past --chunk-len the
Mamba model trains chunk by chunk with its state carried (MambaLM's chunked loss: the exact
gradient in flat memory). Also reports ms and peak memory per step.

    python benchmarks/dna.py --data GENOMES [--contexts 1024 4096 ... 1048576] [--tokens-per-run 2**24]
        [--out benchmarks/results/dna_context_h200.json]
    python benchmarks/dna.py --data GENOMES --smoke     # CPU, tiny sizes: checks that the script runs
    python benchmarks/dna.py --data GENOMES --models mamba --out m.json   # one model kind at a time,
    python benchmarks/dna.py --plot m.json t.json --out both.json         # then their rows merged
    python benchmarks/dna.py --data GENOMES --models mamba --warmup-from 1024  # sequence length warmup

GENOMES: FASTA files or directories (e.g. the kleborate-examples assemblies); the last file is held out.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F


def build_mamba(args, device):
    from mambakit.models.dna import dna_lm
    torch.manual_seed(0)
    return dna_lm(d_model=args.d_model, n_layer=args.n_layer, d_state=args.d_state).to(device)


def build_transformer(args, device, max_len):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=8, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
                      num_hidden_layers=args.n_layer, num_attention_heads=max(1, args.d_model // 64),
                      max_position_embeddings=max_len, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(device)


def loss_of(model, kind, x, y, chunk_len):
    if kind == "mamba":
        return model(x, targets=y, chunk_len=chunk_len if chunk_len and chunk_len < x.shape[1] else None)
    logits = model(input_ids=x).logits.float()
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)


def train_and_score(kind, args, data, context, device):
    from mambakit.tasks.dna.task import HeldOut, model_scores, train_batch
    from mambakit.tasks.selective_copying import length_curriculum
    model = build_mamba(args, device) if kind == "mamba" else build_transformer(args, device, context + 1)
    batch = max(1, args.tokens_per_step // context)
    steps = max(1, args.tokens_per_run // (batch * context))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=steps, pct_start=0.1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    length_at = length_curriculum(context, args.warmup_from if kind == "mamba" else None, steps)
    for step in range(steps):
        length = length_at(step)  # the same bases per step at every length
        inputs, targets = train_batch(data.train, batch * context // length, length, 0, step, rc_augment=True)
        x = torch.from_numpy(inputs.astype(np.int64)).to(device)
        y = torch.from_numpy(targets).to(device)
        with autocast:
            loss = loss_of(model, kind, x, y, args.chunk_len)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    n_eval = max(1, args.eval_tokens // context)
    held = HeldOut(data.valid.even_starts(n_eval, context), context)

    class _Logits(torch.nn.Module):  # model_scores reads logits from model(x)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(input_ids=x) if kind != "mamba" else self.inner(x)
            return out.logits if hasattr(out, "logits") else out

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        scores = model_scores(_Logits(model), data.valid, held, 1, device)
    return {"model": kind, "context": context, "batch": batch, "steps": steps, "tokens": batch * context * steps,
            "bpb": scores["bpb"], "accuracy": scores["accuracy"], "ms_per_step": seconds / steps * 1e3,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "params": sum(p.numel() for p in model.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", nargs="+")
    ap.add_argument("--contexts", type=int, nargs="+", default=[2**k for k in (10, 12, 14, 16, 18, 20)])
    ap.add_argument("--tokens-per-run", type=int, default=2**24)
    ap.add_argument("--tokens-per-step", type=int, default=2**20)
    ap.add_argument("--eval-tokens", type=int, default=2**21)
    ap.add_argument("--chunk-len", type=int, default=65536, help="Mamba trains longer contexts chunk by chunk")
    ap.add_argument("--transformer-max", type=int, default=65536, help="the longest context the Transformer tries")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=8)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup-from", type=int, default=None,
                    help="sequence length warmup (Mamba only): the context doubles from this length over the "
                         "first half of the steps, with the same bases per step, as the Mamba paper's DNA runs; "
                         "a row's ms per step and peak memory then cover all its stages")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    ap.add_argument("--out", default="benchmarks/results/dna_context_h200.json")
    ap.add_argument("--models", nargs="+", choices=("mamba", "transformer"), default=["mamba", "transformer"])
    ap.add_argument("--plot", metavar="JSON", nargs="+",
                    help="only merge the rows of existing results (runs of --models one at a time) into --out, "
                         "and draw its PNG")
    args = ap.parse_args(argv)
    if args.plot:
        parts = [json.load(open(path)) for path in args.plot]
        merged = {**parts[0], "rows": sorted((r for part in parts for r in part["rows"]),
                                             key=lambda r: (r["context"], r["model"]))}
        if len(parts) > 1:
            with open(args.out, "w") as f:
                json.dump(merged, f, indent=1)
        plot(merged, (args.out if len(parts) > 1 else args.plot[0]).replace(".json", ".png"))
        return
    if not args.data:
        ap.error("--data is required (FASTA files or directories)")
    if args.smoke:
        args.contexts, args.tokens_per_run, args.tokens_per_step, args.eval_tokens = [64, 256], 4096, 1024, 2048
        args.d_model, args.n_layer, args.chunk_len, args.transformer_max = 32, 2, 128, 256
    for context in args.contexts if args.warmup_from is not None else []:
        if not doubles_to(args.warmup_from, context):  # each stage then has the same bases per step
            ap.error(f"--warmup-from ({args.warmup_from}) must be a length >= 1 that doubles to every "
                     f"context, not to {context}")
    from mambakit.tasks.dna.task import prepare_data
    device = torch.device("cpu" if args.smoke else "cuda")
    data = prepare_data(args.data, None, 0.1, max(args.contexts))
    rows = []
    for context in args.contexts:
        for kind in args.models:
            if kind == "transformer" and context > args.transformer_max:
                continue
            try:
                row = train_and_score(kind, args, data, context, device)
            except torch.OutOfMemoryError:
                row = {"model": kind, "context": context, "bpb": None, "note": "out of memory"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if not args.smoke:  # after every row: a run cut short keeps what it measured
                result = save(args, data, device, rows)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if rows and not args.smoke:
        plot(result, args.out.replace(".json", ".png"))


def doubles_to(start: int, context: int) -> bool:
    """Whether doubling from `start` reaches `context` exactly (or start is already past it)."""
    if start < 1:
        return False
    ratio = context // start
    return context <= start or (ratio * start == context and ratio & (ratio - 1) == 0)


def save(args, data, device, rows) -> dict:
    """Write the result so far to args.out and return it."""
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "data": data.describe(), "settings": {
                  k: getattr(args, k) for k in ("tokens_per_run", "tokens_per_step", "eval_tokens", "chunk_len",
                                                "d_model", "n_layer", "d_state", "lr", "warmup_from")},
              "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return result


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for kind, style in (("mamba", "-o"), ("transformer", "--s")):
        pts = [(r["context"], r["bpb"]) for r in result["rows"] if r["model"] == kind and r.get("bpb")]
        if pts:
            ax.plot(*zip(*pts), style, label=kind)
    ax.axhline(2.0, color="grey", lw=0.8, ls=":", label="uniform (2 bits)")
    ax.set(xscale="log", xlabel="context (bases)", ylabel="held-out bits per base",
           title=f"DNA, same tokens per run, {result['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
