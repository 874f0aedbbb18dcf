"""`mambakit train --task dna` and `--task dna-classify` end to end through the CLI's main, on
genomes generated here: a model that learns beats the uniform 2 bits per base on a held-out
strain, the Markov baselines are printed beside it, the model is saved and `mambakit eval --task
dna` scores it; bad files are one `error:` line naming the file."""

import gzip
import json
import lzma

import numpy as np
import pytest

from mambakit.cli import main
from tests.benchmark_scripts import load_benchmark

# an order-1 chain with strong preferences (about 1.2 bits per base): learnable in a few steps
TRANSITIONS = np.array([[0.05, 0.80, 0.10, 0.05],
                        [0.10, 0.05, 0.80, 0.05],
                        [0.05, 0.10, 0.05, 0.80],
                        [0.80, 0.05, 0.05, 0.10]])


def genome(n: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    out, base = [], 0
    for u in rng.random(n):
        base = int(np.searchsorted(np.cumsum(TRANSITIONS[base]), u))
        out.append("ACGT"[min(base, 3)])
    return "".join(out)


def fasta(records: dict[str, str], width: int = 60) -> bytes:
    lines = []
    for name, seq in records.items():
        lines.append(f">{name} generated")
        lines += [seq[i:i + width] for i in range(0, len(seq), width)]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def strains(tmp_path_factory):
    """Three 'strains': plain, gzip and xz; lowercase and an N run in one of them."""
    d = tmp_path_factory.mktemp("strains")
    a = genome(3000, 0)
    (d / "strain_a.fa").write_bytes(fasta({"chr": a[:1500] + "N" * 20 + a[1500:].lower(), "plasmid": genome(300, 1)}))
    (d / "strain_b.fna.gz").write_bytes(gzip.compress(fasta({"chr": genome(3000, 2)})))
    (d / "strain_c.fasta.xz").write_bytes(lzma.compress(fasta({"chr": genome(2000, 3)})))
    return d


TINY = ["--d-model", "16", "--n-layer", "1", "--d-state", "4", "--seq-len", "64", "--batch-size", "4",
        "--eval-batches", "2"]


def summary_of(out: str) -> dict:
    return json.loads([line for line in out.splitlines() if line.startswith("{")][-1])


def test_train_and_eval_dna(strains, tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["train", "--task", "dna", "--data", str(strains), *TINY, "--max-steps", "15", "--lr", "2e-2",
                 "--markov-orders", "1,2", "--out-dir", str(out_dir)]) == 0
    captured = capsys.readouterr()
    summary = summary_of(captured.out)
    assert summary["task"] == "dna" and summary["steps_run"] == 15
    assert summary["data"]["held_out"] == [str(strains / "strain_c.fasta.xz")]  # the last strain
    assert summary["data"]["held_out_by"] == "file" and summary["data"]["bases"] == 3020 + 300 + 3000 + 2000
    assert summary["bpb"] < 1.6 and set(summary["markov_bpb"]) == {"1", "2"}  # uniform is 2.0
    assert summary["markov_bpb"]["1"] < 1.4  # the chain's own order
    assert "held-out bits per base: model" in captured.err and "order-2 Markov" in captured.err
    assert "step" in captured.err  # the progress bar
    assert {"model.safetensors", "config.json", "metrics.json", "bpb.png"} <= {p.name for p in out_dir.iterdir()}
    assert main(["eval", "--task", "dna", "--model", str(out_dir), "--data", str(strains / "strain_c.fasta.xz"),
                 "--seq-len", "64", "--windows", "4"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["bpb"] < 2.0 and 0 <= scores["accuracy"] <= 1


def test_single_file_holds_out_its_last_records(strains, capsys):
    assert main(["train", "--task", "dna", "--data", str(strains / "strain_a.fa"), *TINY, "--max-steps", "2",
                 "--markov-orders", "2", "--out-dir", "", "--no-progress"]) == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["data"]["held_out_by"] == "record"


BAD_FILES = {
    "empty.fa": b"",
    "protein.fa": b">sp|P69905|HBA_HUMAN\nMVLSPADKTNVKAAWGKVGAHAGEYGAEALERMFLSFPTTKTYFPHFDLSHGSAQVKGHGKKVADALT\n",
    "binary.fa": bytes(range(256)) * 16,
    "headless.fa": b"ACGTACGT\n",
}


@pytest.mark.parametrize("task", ["dna", "dna-classify"])
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_files_are_one_error_line(tmp_path, task, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(SystemExit) as err:
        main(["train", "--task", task, "--data", str(path), *TINY, "--out-dir", "", "--no-progress"])
    message = str(err.value.code)
    assert message.startswith("error: ") and "\n" not in message and str(path) in message


def test_bad_settings_are_one_error_line(strains, tmp_path):
    for flags, match in ((["--valid", "strain_z"], "none of the files"), (["--seq-len", "100000"], "fewer than")):
        with pytest.raises(SystemExit) as err:
            main(["train", "--task", "dna", "--data", str(strains), *TINY, *flags, "--out-dir", "", "--no-progress"])
        assert str(err.value.code).startswith("error: ") and match in str(err.value.code)
    with pytest.raises(SystemExit) as err:
        main(["train", "--task", "dna", "--data", str(tmp_path / "missing.fa"), "--no-progress"])
    assert str(err.value.code) == f"error: {tmp_path / 'missing.fa'}: no such file or directory"


@pytest.mark.parametrize("backbone", ["causal", "bidirectional", "rc"])
def test_dna_classify(strains, tmp_path, capsys, backbone):
    out_dir = tmp_path / backbone
    assert main(["train", "--task", "dna-classify", "--backbone", backbone, "--data", str(strains), *TINY,
                 "--d-model", "8", "--max-steps", "3", "--markov-order", "2", "--out-dir", str(out_dir),
                 "--no-progress"]) == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["task"] == "dna-classify" and summary["backbone"] == backbone
    assert summary["held_out_windows"] == 8 and 0 <= summary["accuracy"] <= 1
    if backbone == "rc":
        assert summary["rc_agreement"] == 1.0  # invariant by construction
    assert {"model.safetensors", "config.json", "metrics.json"} <= {p.name for p in out_dir.iterdir()}


def test_classify_benchmark_smoke_rows_and_rc_agreement(strains, tmp_path, monkeypatch):
    """benchmarks/dna_classify.py --smoke: a row per window length and backbone with the held-out
    accuracy, and the RC-equivariant classifier labels every held-out window as its reverse
    complement (at any weights), which the other two need not."""
    bench = load_benchmark("dna_classify")
    from mambakit.tasks.dna.markov import MarkovModel
    draws = []
    real = MarkovModel.sample
    monkeypatch.setattr(MarkovModel, "sample", lambda self, *a: draws.append(a[1]) or real(self, *a))
    out = tmp_path / "classify.json"
    assert bench.main(["--data", str(strains), "--smoke", "--out", str(out)]) == 0
    assert len(draws) == 4  # per length the training and the held-out chains, once for the three backbones
    result = json.loads(out.read_text())
    rows = {(r["backbone"], r["length"]): r for r in result["rows"]}
    assert set(rows) == {(b, n) for b in ("causal", "bidirectional", "rc") for n in (64, 256)}
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["bases"] == r["batch"] * r["length"] * r["steps"] for r in rows.values())
    assert rows[("rc", 64)]["rc_agreement"] == 1.0 and rows[("rc", 256)]["rc_agreement"] == 1.0
    assert out.with_suffix(".png").stat().st_size > 0


def test_context_benchmark_warms_the_length_up_with_the_same_bases_per_step(strains, monkeypatch, capsys):
    """benchmarks/dna.py --warmup-from: the Mamba model's training length doubles from the
    given length over the first half of the steps, each step with the same number of bases
    (the batch grows as the length shrinks); without it every step is at the context."""
    from mambakit.tasks.dna import task
    bench = load_benchmark("dna")
    seen = []
    real = task.train_batch
    monkeypatch.setattr(task, "train_batch", lambda stream, batch, length, *a, **k:
                        seen.append((batch, length)) or real(stream, batch, length, *a, **k))
    bench.main(["--data", str(strains), "--smoke", "--models", "mamba", "--warmup-from", "64"])  # contexts 64, 256
    assert seen == [(16, 64)] * 4 + [(16, 64), (8, 128), (4, 256), (4, 256)]  # 4096 bases in 4 steps of 1024
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["context"] == 256 and row["steps"] == 4 and row["bpb"] > 0
    seen.clear()
    bench.main(["--data", str(strains), "--smoke", "--models", "mamba"])
    assert seen == [(16, 64)] * 4 + [(4, 256)] * 4
    with pytest.raises(SystemExit):  # 64 and 256 are not 48 doubled: a stage would see fewer bases
        bench.main(["--data", str(strains), "--smoke", "--models", "mamba", "--warmup-from", "48"])
    assert "--warmup-from (48)" in capsys.readouterr().err
