"""Plot of the long induction-heads training (results/induction_long_h200.json): accuracy against
test length at each device call's checkpoint.

    python benchmarks/plot_induction_long.py [JSON] [PNG]
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/induction_long_h200.json"
    dst = sys.argv[2] if len(sys.argv) > 2 else src.replace(".json", ".png")
    calls = json.load(open(src))["calls"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for call in calls:
        lengths = sorted(call["accuracy_bf16"], key=int)
        ax.plot([int(n) for n in lengths], [call["accuracy_bf16"][n] for n in lengths], marker="o",
                label=f"{call['steps_run']:,} steps")
    ax.axvline(256, color="grey", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test length (trained at 256)")
    ax.set_ylabel("accuracy (32 sequences, bf16)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Induction heads, Mamba 2 x 64, one training continued across device calls")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=120)
    print("wrote", dst)


if __name__ == "__main__":
    main()
