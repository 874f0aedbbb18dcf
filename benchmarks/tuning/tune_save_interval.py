"""Sweep, on the device, of the interval at which the lanes forward saves states and how many
chunks the backward takes back per saved state (MAMBAKIT_SCAN_SAVE_EVERY, MAMBAKIT_SCAN_BWD_CHUNKS):
forward (with saving) and backward times at the benchmark shapes, and the saved states' size.
Each setting runs in its own process, since the kernels read the knobs once at import.

    python benchmarks/tuning/tune_save_interval.py OUT.jsonl [SAVE:CHUNKS ...]   (default 16:2 8:1 16:1 32:2)
"""
import json
import os
import subprocess
import sys


def measure(out_path: str) -> None:
    import torch
    from triton.testing import do_bench
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, os.path.dirname(os.path.dirname(here)))  # the repository root
    sys.path.insert(0, os.path.dirname(here))  # benchmarks/, for scan.py
    from scan import SHAPES, make_inputs
    from mambakit.ops.triton.scan_launch import scan_bwd, scan_fwd
    with open(out_path, "a") as out:
        for batch, length in SHAPES:
            kw = make_inputs(batch, length)
            args = [kw[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
            _, _, states = scan_fwd(*args, None, True, None, True)
            dout = torch.randn_like(kw["u"])
            fwd = do_bench(lambda: scan_fwd(*args, None, True, None, True), warmup=5, rep=30)
            bwd = do_bench(lambda: scan_bwd(*args, None, True, states, dout, None), warmup=5, rep=30)
            row = dict(save_every=int(os.environ["MAMBAKIT_SCAN_SAVE_EVERY"]),
                       bwd_chunks=int(os.environ["MAMBAKIT_SCAN_BWD_CHUNKS"]), B=batch, L=length,
                       fwd_saving_ms=round(fwd, 4), bwd_ms=round(bwd, 4),
                       saved_states_mib=round(states.nbytes / 2**20, 1))
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")


def main() -> None:
    out_path = sys.argv[1]
    if os.environ.get("_TUNE_CHILD"):
        measure(out_path)
        return
    for setting in sys.argv[2:] or ["16:2", "8:1", "16:1", "32:2"]:
        save, chunks = setting.split(":")
        env = dict(os.environ, MAMBAKIT_SCAN_SAVE_EVERY=save, MAMBAKIT_SCAN_BWD_CHUNKS=chunks, _TUNE_CHILD="1")
        subprocess.run([sys.executable, __file__, out_path], env=env, check=False)


if __name__ == "__main__":
    main()
