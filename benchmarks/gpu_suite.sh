#!/usr/bin/env bash
# The GPU tests, then the four GPU comparisons against the official kernels, in one run on one
# card, from the repository root. The official mamba_ssm and causal_conv1d must be importable
# (BENCHMARKS.md, "How to reproduce on a GPU"); timm for the Vision comparison.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          # results in OUT_DIR (default benchmarks/results)
#   BASE=/path/to/another/checkout bash benchmarks/gpu_suite.sh OUT_DIR
#       # also runs the scan comparison from that checkout right after this one's (an A/B of two
#       # trees on the same card: scan_base_<card>.json)
#
# Each step has a time limit, so that a slow or stuck step does not take the rest with it.
set -uo pipefail
out=${1:-benchmarks/results}
mkdir -p "$out"
card=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
export PYTHONUNBUFFERED=1
step() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name ($(date +%T))"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | tail -8
}
python3 -c "import mamba_ssm, selective_scan_cuda, causal_conv1d_cuda; print('official', mamba_ssm.__version__)" \
    || echo "the official package is not importable: the comparisons report mambakit alone"
step gpu_tests 600 python3 -m pytest -q -m gpu -p no:cacheprovider tests
step scan 300 python3 benchmarks/scan.py --out "$out/scan_$card.json"
if [ -n "${BASE:-}" ]; then
    step scan_base 300 bash -c "cd '$BASE' && PYTHONPATH='$BASE' python3 benchmarks/scan.py --out '$PWD/$out/scan_base_$card.json'"
fi
step generate 600 python3 benchmarks/generate.py --out "$out/generate_$card.json"
step train 600 python3 benchmarks/train.py --out "$out/train_$card.json"
step vision 600 python3 benchmarks/vision.py --sizes 224 512 1024 1056 1088 1120 1184 1248 1536 2048 --iters 5 \
    --out "$out/vision_$card.json"
