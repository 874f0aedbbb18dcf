"""Issue 5's properties of generation, on CPU: batched prompts of different lengths equal
one-at-a-time generation, the cache saves and resumes exactly at a constant size, sampling
options match transformers' logits processors, stop strings, streaming and bad options."""

import pytest
import torch

from mambakit import MambaConfig, MambaLM
from mambakit.generation import LMCache, SamplingOptions, process_logits
from mambakit.tokenizer import ByteTokenizer

VOCAB = 64


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, d_state=8)).eval()
    with torch.no_grad():  # larger weights than the init, so that the tokens depend on the context
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def _prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


@pytest.mark.parametrize("options", [{}, {"repetition_penalty": 1.7}], ids=["greedy", "greedy+penalty"])
def test_list_of_prompts_equals_each_alone(model, options):
    prompts = _prompts([3, 11, 1, 6])
    batched = model.generate(prompts, max_new_tokens=10, **options)
    for prompt, got in zip(prompts, batched):
        alone = model.generate(prompt[None], max_new_tokens=10, **options)[0]
        assert torch.equal(got, alone)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_tensor_with_mask_equals_each_alone(model, side):
    prompts = _prompts([5, 2, 8], seed=1)
    width = 8
    ids = torch.full((3, width), 7)  # a pad id that is a real token: it must not leak
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if side == "left" else slice(0, len(p))
        ids[i, sl], mask[i, sl] = p, 1
    out = model.generate(ids, attention_mask=mask, max_new_tokens=9)
    assert out.shape == (3, width + 9) and torch.equal(out[:, :width], ids)
    for i, p in enumerate(prompts):
        alone = model.generate(p[None], max_new_tokens=9)[0, len(p):]
        assert torch.equal(out[i, width:], alone)


def test_naive_padding_would_leak(model):
    """The property above is not vacuous: running the padded rows as they are changes the tokens."""
    p = _prompts([2], seed=3)[0]
    padded = torch.cat([torch.full((6,), 7), p])[None]
    assert not torch.equal(model.generate(padded, max_new_tokens=8)[0, -8:], model.generate(p[None], max_new_tokens=8)[0, -8:])


def test_saved_cache_continues_identically(model, tmp_path):
    prompt = _prompts([9], seed=2)[0][None]
    whole = model.generate(prompt, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=4)
    # the same run, stopped after the prompt, saved, loaded and continued
    _, cache = model.prefill(prompt)
    cache.save(tmp_path / "state.safetensors")
    loaded = LMCache.load(tmp_path / "state.safetensors")
    rest = model.generate(cache=loaded, max_new_tokens=12, temperature=0.8, top_p=0.9, seed=4)
    assert torch.equal(rest, whole[:, 9:])
    # and stopped in the middle of the generation: greedy, 5 tokens, save, 7 more
    full = model.generate(prompt, max_new_tokens=12)
    _, cache = model.prefill(prompt)
    first = model.generate(cache=cache, max_new_tokens=5)  # the cache takes in all 5
    assert torch.equal(first, full[:, 9:14]) and cache.seqlen == 9 + 5
    second = model.generate(cache=LMCache.load(_save(cache, tmp_path / "mid.safetensors")), max_new_tokens=7)
    assert torch.equal(second, full[:, 14:])


def _save(cache, path):
    cache.save(path)
    return path


def test_cache_size_does_not_grow_with_length(model, tmp_path):
    sizes, nbytes = [], []
    for n in (4, 400):
        _, cache = model.prefill(_prompts([n], seed=n)[0][None])
        cache.save(tmp_path / f"c{n}.safetensors")
        sizes.append((tmp_path / f"c{n}.safetensors").stat().st_size)
        nbytes.append(cache.nbytes())
    assert nbytes[0] == nbytes[1]
    assert abs(sizes[0] - sizes[1]) <= 16  # only the header's "seqlen" text differs
    # a 130m model's whole state, whatever the conversation's length: conv + ssm states + logits
    big = MambaLM.from_name("130m", device="meta")
    cache = big.allocate_cache(1, device="meta")
    cache.last_logits = torch.empty(1, big.config.padded_vocab_size, device="meta")
    assert cache.nbytes() < 3 * 2**20, cache.nbytes()


def test_cache_continues_a_conversation(model):
    """prefill(turn 2, cache=state after turn 1) equals prefill(turn 1 + turn 2)."""
    t1, t2 = _prompts([6, 4], seed=5)
    logits, _ = model.prefill(torch.cat([t1, t2])[None])
    _, cache = model.prefill(t1[None])
    logits2, cache = model.prefill(t2[None], cache=cache)
    torch.testing.assert_close(logits2, logits, rtol=1e-5, atol=1e-5)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="not a mambakit cache"):
        LMCache.load(tmp_path / "w.safetensors")
    with pytest.raises(FileNotFoundError):
        LMCache.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("opts", [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
                                  dict(temperature=1.0, min_p=0.2), dict(temperature=0.9, repetition_penalty=1.5),
                                  dict(temperature=0.6, top_k=20, top_p=0.5, min_p=0.05, repetition_penalty=0.8)])
def test_logits_processing_matches_transformers(opts):
    transformers = pytest.importorskip("transformers")
    from transformers import generation as tg
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, generator=g) * 3
    ids = torch.randint(0, 40, (3, 7), generator=g)
    seen = torch.zeros(3, 40, dtype=torch.bool)
    seen[torch.arange(3)[:, None], ids] = True
    procs = []
    if "repetition_penalty" in opts:
        procs.append(tg.RepetitionPenaltyLogitsProcessor(opts["repetition_penalty"]))
    procs.append(tg.TemperatureLogitsWarper(opts["temperature"]))
    if "top_k" in opts:
        procs.append(tg.TopKLogitsWarper(opts["top_k"]))
    if "top_p" in opts:
        procs.append(tg.TopPLogitsWarper(opts["top_p"]))
    if "min_p" in opts:
        procs.append(tg.MinPLogitsWarper(opts["min_p"]))
    expected = logits.clone()
    for p in procs:
        expected = p(ids, expected)
    got = process_logits(logits.clone(), SamplingOptions(**opts), seen)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])
    del transformers


def test_sampling_seeded_and_reproducible(model):
    p = _prompts([5], seed=6)[0][None]
    a = model.generate(p, max_new_tokens=15, temperature=1.0, top_p=0.95, min_p=0.01, seed=3)
    b = model.generate(p, max_new_tokens=15, temperature=1.0, top_p=0.95, min_p=0.01, seed=3)
    c = model.generate(p, max_new_tokens=15, temperature=1.0, top_p=0.95, min_p=0.01, seed=9)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stream_yields_what_generate_returns(model):
    p = _prompts([4], seed=7)[0][None]
    streamed = torch.stack(list(model.generate(p, max_new_tokens=6, stream=True)), dim=1)
    assert torch.equal(torch.cat([p, streamed], dim=1), model.generate(p, max_new_tokens=6))


def test_stop_strings(model):
    tok = ByteTokenizer()
    p = _prompts([4], seed=8)[0][None]
    full = model.generate(p, max_new_tokens=20)[0, 4:].tolist()
    target = tok.decode(full[3:5])  # a stop string that the greedy text contains
    out = model.generate([p[0]], max_new_tokens=20, stop=target, tokenizer=tok)[0][4:].tolist()
    assert target in tok.decode(out) and target not in tok.decode(out[:-1]) and out == full[:len(out)]


def test_eos_per_row_in_a_batch(model):
    prompts = _prompts([3, 7], seed=9)
    alone = [model.generate(p[None], max_new_tokens=8)[0, len(p):].tolist() for p in prompts]
    eos = alone[0][2]  # row 0 stops at its third token
    out = model.generate(prompts, max_new_tokens=8, eos_token_id=eos)
    assert out[0][3:].tolist() == alone[0][:alone[0].index(eos) + 1]
    expect1 = alone[1][:alone[1].index(eos) + 1] if eos in alone[1] else alone[1]
    assert out[1][7:].tolist() == expect1


@pytest.mark.parametrize("kwargs,error,match", [
    ({"top_p": 0.0}, ValueError, "top_p"), ({"min_p": 1.5}, ValueError, "min_p"),
    ({"repetition_penalty": 0}, ValueError, "repetition_penalty"), ({"stop": "x"}, ValueError, "tokenizer"),
    ({"stop": [""], "tokenizer": ByteTokenizer()}, ValueError, "stop"),
])
def test_bad_options(model, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("ids,mask,match", [
    ([[1, 2], []], None, "prompt 1 is empty"),
    (torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]), "gap"),
    (torch.ones(2, 4, dtype=torch.long), torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "no ones"),
    (torch.ones(2, 4, dtype=torch.long), torch.ones(2, 3), "shaped like"),
    ([[1, 2]], torch.ones(1, 2), "attention_mask goes with"),
])
def test_bad_prompts(model, ids, mask, match):
    with pytest.raises(ValueError, match=match):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_cache_without_logits_needs_input(model):
    cache = model.allocate_cache(1)
    with pytest.raises(ValueError, match="next-token logits"):
        model.generate(cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="input_ids, a cache"):
        model.generate(max_new_tokens=2)
