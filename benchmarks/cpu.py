"""mambakit against transformers on CPU, same random weights, one run: Mamba-1
(`MambaForCausalLM`) and Mamba-2 (`Mamba2ForCausalLM`), each on transformers' torch path.

130m-shaped models, fp32, 2 threads:
  - Mamba-1: d_model 768, 24 layers, d_state 16, vocab 50280
  - Mamba-2: the mamba2-130m preset (d_model 768, 24 layers, d_state 128, heads of 64, one group, vocab 50288)
Each is timed on
  - prefill of 1 x 1024 tokens (last-token logits and the recurrent state, as generation needs)
  - greedy decoding of 64 new tokens after a 32-token prompt
Both libraries load the same transformers checkpoint (save_pretrained, then from_pretrained),
and the greedy tokens must agree.

    python benchmarks/cpu.py [--arch mamba1|mamba2|both] [--threads 2]
        [--out benchmarks/results/cpu.json] [--out-mamba2 benchmarks/results/cpu_mamba2.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

VOCAB_MAMBA1, VOCAB_MAMBA2 = 50280, 50288
TITLES = {"mamba1": "130m-shaped Mamba", "mamba2": "130m-shaped Mamba-2 (mamba2-130m)"}


def interleaved_medians(fn_a, fn_b, repeat):
    """Times a and b alternately (the machine's speed drifts) and returns their median times
    and last outputs."""
    times_a, times_b = [], []
    for _ in range(repeat):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
            if fn is fn_a:
                out_a = out
            else:
                out_b = out
    med = lambda ts: sorted(ts)[len(ts) // 2]
    return med(times_a), med(times_b), out_a, out_b


def transformers_model(arch: str):
    """transformers' model of `arch` with random weights (seed 0), in eval mode."""
    torch.manual_seed(0)
    if arch == "mamba1":
        from transformers import MambaConfig, MambaForCausalLM
        return MambaForCausalLM(MambaConfig(vocab_size=VOCAB_MAMBA1, hidden_size=768, num_hidden_layers=24,
                                            state_size=16, expand=2, conv_kernel=4, use_mambapy=False)).eval()
    from transformers import Mamba2Config, Mamba2ForCausalLM
    return Mamba2ForCausalLM(Mamba2Config(
        vocab_size=VOCAB_MAMBA2, hidden_size=768, num_hidden_layers=24, state_size=128, expand=2, head_dim=64,
        num_heads=24, n_groups=1, conv_kernel=4, chunk_size=256, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True)).eval()


def compare(arch: str, args) -> dict:
    """Prefill and greedy decoding of mambakit and transformers on the same weights, interleaved."""
    from mambakit import MambaLM
    hf = transformers_model(arch)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = MambaLM.from_pretrained(d).eval()
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    long_ids = torch.randint(0, vocab, (1, args.prefill_len), generator=gen)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=gen)
    results = {}
    print(f"{TITLES[arch]}:", flush=True)
    with torch.inference_mode():
        # warm up both once on a short input
        hf(prompt, use_cache=True, logits_to_keep=1)
        ours.prefill(prompt)

        t_ours, t_hf, (logits_ours, _), out_hf = interleaved_medians(
            lambda: ours.prefill(long_ids), lambda: hf(long_ids, use_cache=True, logits_to_keep=1), args.repeat)
        err = (logits_ours - out_hf.logits[:, -1]).abs().max().item()
        results["prefill"] = {"tokens": args.prefill_len, "mambakit_s": t_ours, "transformers_s": t_hf,
                              "speedup": t_hf / t_ours, "max_abs_logit_diff": err}
        print(f"  prefill 1x{args.prefill_len}: mambakit {t_ours:.3f} s, transformers {t_hf:.3f} s, "
              f"{t_hf / t_ours:.2f}x (max |logit diff| {err:.2e})", flush=True)

        n = args.new_tokens
        t_ours, t_hf, ids_ours, ids_hf = interleaved_medians(
            lambda: ours.generate(prompt, max_new_tokens=n),
            lambda: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False), args.repeat)
        same = torch.equal(ids_ours, ids_hf)
        results["decode"] = {"prompt": args.prompt_len, "new_tokens": n,
                             "mambakit_ms_per_token": t_ours / n * 1e3, "transformers_ms_per_token": t_hf / n * 1e3,
                             "speedup": t_hf / t_ours, "same_greedy_tokens": same}
        print(f"  greedy decode {n} tokens: mambakit {t_ours / n * 1e3:.1f} ms/token, transformers "
              f"{t_hf / n * 1e3:.1f} ms/token, {t_hf / t_ours:.2f}x (same tokens: {same})", flush=True)
        if not same:
            raise SystemExit(f"{arch}: mambakit's greedy tokens differ from transformers' on the same weights")
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["mamba1", "mamba2", "both"], default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results/cpu.json", help="Mamba-1's results")
    ap.add_argument("--out-mamba2", default="benchmarks/results/cpu_mamba2.json", help="Mamba-2's results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    for arch in ("mamba1", "mamba2") if args.arch == "both" else (args.arch,):
        results = compare(arch, args)
        results["setup"] = {"model": f"{TITLES[arch]}, random weights", "dtype": "float32", "threads": args.threads,
                            "torch": torch.__version__, "transformers": transformers.__version__,
                            "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d")}
        out = args.out if arch == "mamba1" else args.out_mamba2
        with open(out, "w") as f:
            json.dump(results, f, indent=2)
        print("wrote", out)
        plot(results, out.replace(".json", ".png"), TITLES[arch])


def plot(results, path, title):
    import matplotlib  # a dependency of mambakit
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5))
    pre, dec = results["prefill"], results["decode"]
    for ax, name, values, unit, ratio in (
            (axes[0], f"prefill 1 x {pre['tokens']} tokens", (pre["mambakit_s"], pre["transformers_s"]), "s",
             pre["speedup"]),
            (axes[1], f"greedy decoding ({dec['new_tokens']} tokens)",
             (dec["mambakit_ms_per_token"], dec["transformers_ms_per_token"]), "ms / token", dec["speedup"])):
        bars = ax.bar(["mambakit", "transformers"], values, color=["tab:green", "tab:gray"])
        ax.bar_label(bars, fmt="%.2f")
        ax.set(title=f"{name}: {ratio:.2f}x", ylabel=unit)
    setup = results["setup"]
    fig.suptitle(f"{title} on CPU, fp32, {setup['threads']} threads (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print("wrote", path)


if __name__ == "__main__":
    main()
