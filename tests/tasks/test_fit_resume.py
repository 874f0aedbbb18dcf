"""The task trainer's resumable state (`fit`, `--save-every`, `--resume`): a run stopped at any
step and resumed ends with exactly the parameters of an uninterrupted run; bad resumes are
clear errors."""

import pytest
import torch

from mambakit.tasks import induction_heads as ih

TINY = ["--seq-len", "16", "--d-model", "16", "--max-steps", "12", "--batch-size", "4", "--lr", "3e-3",
        "--eval-every", "6", "--eval-batches", "1", "--device", "cpu", "--no-progress"]


def _train(out_dir, *extra):
    args = ih.build_train_parser().parse_args(TINY + ["--out-dir", str(out_dir), *extra])
    model, summary, rows = ih.run(args, progress=False)
    return model, rows


def _same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_run_stopped_by_its_time_limit_and_resumed_ends_as_an_uninterrupted_one(tmp_path):
    whole, whole_rows = _train(tmp_path / "whole", "--save-every", "4")
    # a time limit this small stops every process after its first step: 12 processes in turn
    _, rows = _train(tmp_path / "parts", "--save-every", "4", "--time-limit", "1e-9")
    assert len(rows) == 1 and rows[0]["stopped_early"]
    for _ in range(40):
        model, rows = _train(tmp_path / "parts", "--resume", "--time-limit", "1e-9")
        if rows[-1]["step"] == 12:
            break
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole_rows]
    assert _same_parameters(model, whole)


def test_a_crash_between_saves_resumes_from_the_last_save(tmp_path, monkeypatch):
    whole, _ = _train(tmp_path / "whole")
    real_batch = ih.InductionHeads.batch

    def crash_at_step_7(self, batch_size, seed, step, split, device):
        if split == "train" and step == 7:
            raise KeyboardInterrupt
        return real_batch(self, batch_size, seed, step, split, device)

    monkeypatch.setattr(ih.InductionHeads, "batch", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "crash", "--save-every", "3")  # saved after steps 3 and 6
    monkeypatch.setattr(ih.InductionHeads, "batch", real_batch)
    state = torch.load(tmp_path / "crash" / "fit_state.pt", weights_only=True)
    assert state["step"] == 6
    model, rows = _train(tmp_path / "crash", "--resume")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert _same_parameters(model, whole)


def test_bad_resumes_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no training state"):
        _train(tmp_path / "empty", "--resume")
    _train(tmp_path / "run", "--save-every", "6")
    with pytest.raises(ValueError, match="already holds a training state"):
        _train(tmp_path / "run", "--save-every", "6")
    with pytest.raises(ValueError, match=r"other settings \(lr 0.003 -> 0.001\)"):
        args = ih.build_train_parser().parse_args(TINY + ["--out-dir", str(tmp_path / "run"), "--resume",
                                                          "--lr", "1e-3"])
        ih.run(args, progress=False)
    with pytest.raises(ValueError, match=r"other settings \(batch_size 4 -> 8, seq_len 16 -> 32\)"):
        _train(tmp_path / "run", "--resume", "--batch-size", "8", "--seq-len", "32")  # other batches
    with pytest.raises(ValueError, match=r"other settings \(d_model 16 -> 32\)"):
        _train(tmp_path / "run", "--resume", "--d-model", "32")
    _train(tmp_path / "run", "--resume", "--eval-batches", "2", "--time-limit", "5")  # these may change
    with pytest.raises(ValueError, match="need an --out-dir"):
        args = ih.build_train_parser().parse_args(TINY + ["--out-dir", "", "--save-every", "3"])
        ih.run(args, progress=False)
    with pytest.raises(ValueError, match="save-every must be an int >= 0"):
        _train(tmp_path / "neg", "--save-every", "-1")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "fit_state.pt").write_bytes(b"not a state")
    with pytest.raises(ValueError, match="cannot be read"):
        _train(tmp_path / "broken", "--resume")


def test_rows_hold_each_steps_loss_as_a_float_read_after_the_step(monkeypatch):
    """fit() reads the losses from the device in batches (READ_LOSSES_EVERY): every row still
    ends with its own step's loss, a float; the first one equals the loss of a fresh model of
    the same seed on batch 0, computed directly."""
    from mambakit.tasks import fit as fit_mod
    from mambakit.tasks.synthetic import ModelArgs, build_model
    monkeypatch.setattr(fit_mod, "READ_LOSSES_EVERY", 3)  # reads after steps 3 and 6, and at the end
    task = ih.InductionHeads(16)
    batch_at = lambda step: task.batch(4, 0, step, "train", "cpu")  # noqa: E731
    fresh = build_model(ModelArgs(d_model=16), ih.VOCAB_SIZE, torch.device("cpu"), seed=0)
    expected_first = ih.loss_fn(fresh, *batch_at(0)).item()
    model = build_model(ModelArgs(d_model=16), ih.VOCAB_SIZE, torch.device("cpu"), seed=0)
    cfg = fit_mod.FitConfig(max_steps=7, lr=3e-3, warmup_steps=2, eval_every=100)
    rows = fit_mod.fit(model, batch_at, ih.loss_fn, cfg, progress=False)
    assert [r["step"] for r in rows] == list(range(1, 8))
    assert all(type(r["loss"]) is float for r in rows)
    assert rows[0]["loss"] == expected_first
    assert rows[-1]["loss"] != rows[0]["loss"]


@pytest.mark.gpu
def test_on_cuda_rows_hold_their_own_losses_and_a_resume_is_exact(tmp_path, monkeypatch):
    """The same two properties on the GPU, where the losses stay on the device between reads and
    the batches are copied from pinned memory without blocking."""
    from mambakit.tasks import fit as fit_mod
    monkeypatch.setattr(fit_mod, "READ_LOSSES_EVERY", 3)
    cuda = [a if a != "cpu" else "cuda" for a in TINY]
    whole = ih.run(ih.build_train_parser().parse_args(cuda + ["--out-dir", ""]), progress=False)
    assert all(type(r["loss"]) is float for r in whole[2]) and len(whole[2]) == 12
    first = ih.run(ih.build_train_parser().parse_args(cuda + ["--out-dir", str(tmp_path), "--save-every", "5",
                                                              "--time-limit", "1e-9"]), progress=False)
    assert len(first[2]) == 1
    rest = ih.run(ih.build_train_parser().parse_args(cuda + ["--out-dir", str(tmp_path), "--resume"]),
                  progress=False)
    assert [r["step"] for r in rest[2]] == list(range(1, 13))
    torch.testing.assert_close(rest[0].state_dict(), whole[0].state_dict(), rtol=1e-5, atol=1e-6)
