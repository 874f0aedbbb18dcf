"""Fuzzing `generate`'s arguments on a tiny random model on CPU: every outcome is a result of
the right shape, dtype and ids, or a ValueError / TypeError; never another exception. And bad
`mambakit generate` flags: one `error:` line and a non-zero exit status."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mambakit import MambaConfig, MambaLM
from mambakit.cli import main
from mambakit.tokenizer import ByteTokenizer

VOCAB = 20  # padded to 24: ids 20..23 may be prompt ids but are never generated
MAX_NEW = 5

_MODEL: list[MambaLM] = []


def model() -> MambaLM:
    if not _MODEL:
        torch.manual_seed(0)
        _MODEL.append(MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4)).eval())
    return _MODEL[0]


# ---- strategies: valid arguments (edge values included), then up to two of them made wrong ------

WRONG = st.sampled_from([None, "3", b"3", [1], {"a": 1}, object(), True, 2.5, float("nan"), float("inf"),
                         -float("inf"), -1, 0, 10**30, -10**30, 10**400, torch.tensor(1)])
ANY_NUMBER = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2**70, 2**70), WRONG)
INT_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8]


@st.composite
def valid_prompt(draw):
    """(input_ids, attention_mask): a (B, L) tensor of an integer dtype, perhaps padded with a
    mask, or a list of prompts of different lengths. Ids up to the padded vocabulary (24)."""
    ids = st.integers(0, VOCAB + 3)
    if draw(st.booleans()):
        return draw(st.lists(st.lists(ids, min_size=1, max_size=5), min_size=1, max_size=3)), None
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    values = draw(st.lists(ids, min_size=batch * length, max_size=batch * length))
    tensor = torch.tensor(values).reshape(batch, length).to(draw(st.sampled_from(INT_DTYPES)))
    if not draw(st.booleans()):
        return tensor, None
    mask = torch.zeros(batch, length)
    for row in range(batch):  # one run of ones per row: left or right padding
        n = draw(st.integers(1, length))
        start = length - n if draw(st.booleans()) else 0
        mask[row, start:start + n] = 1
    return tensor, mask.to(draw(st.sampled_from([torch.long, torch.float32, torch.bool])))


@st.composite
def wrong_prompt(draw):
    """Wrong dtypes, shapes, ids, masks, prompt lists, or not a prompt at all."""
    kind = draw(st.sampled_from(["dtype", "shape", "ids", "mask", "list", "other"]))
    if kind == "dtype":
        return torch.ones(1, 3).to(draw(st.sampled_from([torch.float32, torch.bool, torch.complex64]))), None
    if kind == "shape":
        shape = draw(st.sampled_from([(2, 0), (0, 3), (4,), (), (1, 2, 2)]))
        return torch.zeros(shape, dtype=torch.long), None
    if kind == "ids":
        return torch.tensor([[1, draw(st.sampled_from([-1, -2**63, VOCAB + 4, 2**40]))]]), None
    if kind == "mask":
        mask = draw(st.sampled_from([torch.zeros(2, 3), torch.tensor([[1, 0, 1]] * 2), torch.full((2, 3), 2),
                                     torch.full((2, 3), 0.5), torch.ones(2, 4), torch.ones(2, 3, device="meta"),
                                     [[1, 1, 1]] * 2]))
        return torch.ones(2, 3, dtype=torch.long), mask
    if kind == "list":
        element = st.one_of(st.integers(-3, VOCAB + 5), st.sampled_from([1.5, "a", None, 2**64, True]))
        return draw(st.lists(st.lists(element, max_size=4), max_size=3)), None
    return draw(st.one_of(WRONG, st.just(torch.ones(1, 3, dtype=torch.long, device="meta")))), None


VALID = {
    "max_new_tokens": st.integers(0, MAX_NEW),
    "temperature": st.one_of(st.sampled_from([0, 0.0, 1e-45, 1e-30, 1e-5, 1, 1e30, 1e300]),
                             st.floats(0, 10)),
    "top_k": st.one_of(st.none(), st.integers(1, 30), st.just(10**12)),
    "top_p": st.one_of(st.none(), st.floats(0, 1, exclude_min=True), st.just(1e-300)),
    "min_p": st.one_of(st.none(), st.floats(0, 1, exclude_min=True), st.just(1e-300)),
    "repetition_penalty": st.one_of(st.none(), st.sampled_from([1e-300, 1e-30, 0.5, 1, 1.7, 1e30, 1e300]),
                                    st.floats(1e-3, 10)),
    "seed": st.one_of(st.none(), st.integers(-2**63, 2**64 - 1)),
    "eos_token_id": st.one_of(st.none(), st.integers(0, VOCAB - 1)),
    "pad_token_id": st.one_of(st.none(), st.integers(0, VOCAB - 1)),
    "stop": st.one_of(st.none(), st.text(min_size=1, max_size=2), st.lists(st.text(min_size=1, max_size=2),
                                                                           min_size=1, max_size=2)),
    "cuda_graph": st.sampled_from([None, False]),
}
WRONG_FOR = {
    "max_new_tokens": WRONG,
    "temperature": ANY_NUMBER,
    "top_k": st.one_of(st.integers(-2**70, 0), WRONG),
    "top_p": ANY_NUMBER, "min_p": ANY_NUMBER, "repetition_penalty": ANY_NUMBER,
    "seed": st.one_of(st.integers(2**64, 2**70), st.integers(-2**70, -2**63 - 1), WRONG),
    "eos_token_id": st.one_of(st.integers(-2**70, -1), st.integers(VOCAB, 2**70), WRONG),
    "pad_token_id": st.one_of(st.integers(-2**70, -1), st.integers(VOCAB, 2**70), WRONG),
    "stop": st.one_of(st.just(""), st.just([]), st.just(["a", ""]), WRONG),
    "tokenizer": st.sampled_from([object(), "bytes", None]),
    "cuda_graph": st.sampled_from([True, "yes", 1]),
}


@st.composite
def calls(draw):
    """(input_ids, attention_mask, kwargs of generate): valid, or with one or two arguments wrong."""
    kwargs = {name: draw(strategy) for name, strategy in VALID.items()}
    if kwargs["stop"] is not None:
        kwargs["tokenizer"] = ByteTokenizer()
    input_ids, attention_mask = draw(valid_prompt())
    for name in draw(st.lists(st.sampled_from(sorted(WRONG_FOR) + ["input_ids"]), max_size=2, unique=True)):
        if name == "input_ids":
            input_ids, attention_mask = draw(wrong_prompt())
        else:
            kwargs[name] = draw(WRONG_FOR[name])
    return input_ids, attention_mask, kwargs


# ---- the property ---------------------------------------------------------------------------------

def _check_new_ids(new: torch.Tensor) -> None:
    assert bool(((new >= 0) & (new < VOCAB)).all()), new


def _check_result(out, input_ids, max_new_tokens) -> None:
    if isinstance(input_ids, torch.Tensor):
        batch, length = input_ids.shape
        assert isinstance(out, torch.Tensor) and out.shape[0] == batch
        assert length + min(1, max_new_tokens) <= out.shape[1] <= length + max_new_tokens
        holds = torch.iinfo(input_ids.dtype).max >= VOCAB - 1
        assert out.dtype == (input_ids.dtype if holds else torch.int64)
        assert torch.equal(out[:, :length].long(), input_ids.long())
        _check_new_ids(out[:, length:])
    else:
        assert isinstance(out, list) and len(out) == len(input_ids)
        for prompt, row in zip(input_ids, out):
            assert row.dtype == torch.int64 and row.ndim == 1
            assert len(prompt) + min(1, max_new_tokens) <= row.numel() <= len(prompt) + max_new_tokens
            assert row[:len(prompt)].tolist() == list(prompt)
            _check_new_ids(row[len(prompt):])


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(call=calls())
def test_generate_succeeds_or_raises_a_value_or_type_error(call):
    input_ids, attention_mask, kwargs = call
    try:
        out = model().generate(input_ids, attention_mask=attention_mask, **kwargs)
    except (ValueError, TypeError):
        return
    _check_result(out, input_ids, kwargs["max_new_tokens"])


# ---- the command line -----------------------------------------------------------------------------

def _cli_error(argv: list[str], capsys) -> str:
    """Runs `mambakit generate ARGV` in this process; its one stderr line, which starts with `error:`."""
    try:
        status = main(["generate", "--max-new-tokens", "2", *argv])
        message = None
    except SystemExit as exit:
        status, message = (1, exit.code) if isinstance(exit.code, str) else (exit.code, None)
    err = capsys.readouterr().err
    lines = [line for line in (message if message is not None else err).splitlines() if line.strip()]
    assert status not in (0, None)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("argv,flag", [
    (["--repetition-penalty", "inf"], "--repetition-penalty"),
    (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--repetition-penalty", "-1.5"], "--repetition-penalty"),
    (["--stop", ""], "--stop"),
    (["--stop", "a", "--stop", ""], "--stop"),
    (["--seed", str(2**64)], "--seed"),
    (["--seed", str(-2**63 - 1)], "--seed"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-k", "0"], "--top-k"),
    (["--temperature", "inf"], "--temperature"),
    (["--eos-token-id", "-1"], "--eos-token-id"),
    (["--eos-token-id", "100000"], "--eos-token-id"),
    (["--max-prompt-tokens", "0"], "--max-prompt-tokens"),
    (["--device", "no-such-device"], "--device"),
])
def test_bad_flags_are_one_error_line_naming_the_flag(argv, flag, capsys):
    assert flag in _cli_error(argv, capsys)


def test_a_tiny_temperature_is_greedy_on_the_command_line(capsys):
    assert main(["generate", "--prompt", "xy", "--max-new-tokens", "4"]) == 0
    greedy = capsys.readouterr().out
    assert main(["generate", "--prompt", "xy", "--max-new-tokens", "4", "--temperature", "1e-45"]) == 0
    assert capsys.readouterr().out == greedy
