"""Bad input to generation and to the LM's forward is a ValueError / TypeError that names the
argument or the file, never a traceback from deep inside or a silent wrong answer: a cache made
for another model, a broken cache file, generation options outside their range, and ids,
targets, cu_seqlens, logits_to_keep and meta tensors given to the model."""

import dataclasses
import os

import pytest
import torch
from safetensors.torch import save_file

from mambakit import MambaConfig, MambaLM
from mambakit.generation import LMCache
from mambakit.modules import MambaState
from mambakit.tokenizer import ByteTokenizer

VOCAB = 40
CONFIG = MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4)


def _model(**fields) -> MambaLM:
    torch.manual_seed(0)
    model = MambaLM(dataclasses.replace(CONFIG, **fields)).eval()
    with torch.no_grad():  # larger weights than the init, so that the tokens depend on the context
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture(scope="module")
def model():
    return _model()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))


# ---- a cache made for another model ------------------------------------------------------------

@pytest.mark.parametrize("n_layer", [4, 1])
def test_a_cache_with_another_layer_count_is_refused(model, prompt, n_layer):
    """A 2-layer model's cache on a 4-layer model used to run layers 3-4 from an empty state
    (zip over the layers), and one on a 1-layer model dropped a layer's state, both silently."""
    other = _model(n_layer=n_layer)
    _, cache = model.prefill(prompt)
    with pytest.raises(ValueError, match=f"the cache holds 2 layers, the model has {n_layer}"):
        other.generate(cache=cache, max_new_tokens=3)
    with pytest.raises(ValueError, match=f"the cache holds 2 layers, the model has {n_layer}"):
        other.generate(prompt, cache=cache, max_new_tokens=3)


@pytest.mark.parametrize("field,value", [("d_model", 32), ("d_state", 8), ("d_conv", 3), ("expand", 1)])
def test_a_cache_with_other_state_shapes_is_refused_naming_what_differs(model, prompt, field, value):
    """These were a RuntimeError from a tensor copy deep inside the decoder."""
    other = _model(**{field: value})
    _, cache = model.prefill(prompt)
    with pytest.raises(ValueError, match=rf"made by another model: .*{field}={getattr(CONFIG, field)} "
                                         rf"\(the model has {value}\)"):
        other.generate(cache=cache, max_new_tokens=3)
    # a cache that does not know its model (made by hand): the shapes say what differs
    anonymous = LMCache(cache.layers, cache.seqlen, cache.last_logits)
    with pytest.raises(ValueError, match=r"layer 0's (conv|ssm) state has shape .* the model needs"):
        other.generate(cache=anonymous, max_new_tokens=3)


def test_a_cache_whose_layers_disagree_on_batch_is_refused(model):
    _, one = model.prefill(torch.randint(0, VOCAB, (1, 4)))
    _, two = model.prefill(torch.randint(0, VOCAB, (2, 4)))
    mixed = LMCache([one.layers[0], two.layers[1]], 4, one.last_logits)
    with pytest.raises(ValueError, match="layer 1's states .* disagree"):
        model.generate(cache=mixed, max_new_tokens=2)


def test_a_cache_of_the_same_shapes_from_another_architecture_is_refused(model, prompt):
    """LayerNorm instead of RMSNorm: every state has the same shape, the state means something else."""
    _, cache = _model(rms_norm=False).prefill(prompt)
    with pytest.raises(ValueError, match=r"rms_norm=False \(the model has True\)"):
        model.generate(cache=cache, max_new_tokens=2)


def test_a_cache_of_another_dtype_is_refused_in_memory_and_converted_on_load(model, prompt, tmp_path):
    whole = model.generate(prompt, max_new_tokens=6)
    _, cache = model.prefill(prompt)
    double = LMCache([MambaState(s.conv.double(), s.ssm.double()) for s in cache.layers], cache.seqlen,
                     cache.last_logits, cache.architecture)
    with pytest.raises(ValueError, match="layer 0's conv state is torch.float64, the model keeps it in torch.float32"):
        model.generate(cache=double, max_new_tokens=2)
    double.save(tmp_path / "double.safetensors")
    loaded = LMCache.load(tmp_path / "double.safetensors", model=model)
    assert all(s.conv.dtype == torch.float32 and s.ssm.dtype == torch.float32 for s in loaded.layers)
    assert torch.equal(model.generate(cache=loaded, max_new_tokens=6), whole[:, 6:])


def test_load_with_a_model_checks_the_file_against_it(model, prompt, tmp_path):
    path = tmp_path / "two-layers.safetensors"
    _, cache = model.prefill(prompt)
    cache.save(path)
    with pytest.raises(ValueError, match=f"{path}: the cache holds 2 layers, the model has 4"):
        LMCache.load(path, model=_model(n_layer=4))
    with pytest.raises(ValueError, match=f"{path}: the cache was made by another model: d_state=4"):
        LMCache.load(path, model=_model(d_state=8))
    # the model it was made by: loads and continues exactly
    full = model.generate(prompt, max_new_tokens=5)
    assert torch.equal(model.generate(cache=LMCache.load(path, model=model), max_new_tokens=5), full[:, 6:])


def test_a_file_from_before_the_architecture_was_saved_still_loads(model, prompt, tmp_path):
    _, cache = model.prefill(prompt)
    tensors = {f"layers.{i}.{part}": getattr(s, part) for i, s in enumerate(cache.layers) for part in ("conv", "ssm")}
    save_file({**tensors, "last_logits": cache.last_logits}, tmp_path / "old.safetensors",
              metadata={"format": "mambakit-cache", "seqlen": "6", "n_layer": "2"})
    loaded = LMCache.load(tmp_path / "old.safetensors", model=model)
    assert loaded.architecture is None and loaded.seqlen == 6
    assert torch.equal(model.generate(cache=loaded, max_new_tokens=3), model.generate(prompt, max_new_tokens=3)[:, 6:])


# ---- a broken cache file ------------------------------------------------------------------------

def _saved(model, prompt, path):
    _, cache = model.prefill(prompt)
    cache.save(path)
    return path.read_bytes()


@pytest.mark.parametrize("damage", ["empty", "truncated", "header only", "random bytes"])
def test_a_broken_cache_file_is_a_value_error_naming_it(model, prompt, tmp_path, damage):
    data = _saved(model, prompt, tmp_path / "good.safetensors")
    broken = {"empty": b"", "truncated": data[:len(data) // 2], "header only": data[:40],
              "random bytes": os.urandom(300)}[damage]
    path = tmp_path / "broken.safetensors"
    path.write_bytes(broken)
    with pytest.raises(ValueError, match=f"{path}: not a readable cache file"):
        LMCache.load(path)


def _state_tensors(n_layer, conv_shape=(1, 32, 3)):
    tensors = {}
    for i in range(n_layer):
        tensors[f"layers.{i}.conv"] = torch.zeros(conv_shape)
        tensors[f"layers.{i}.ssm"] = torch.zeros(1, 32, 4)
    return tensors


GOOD_META = {"format": "mambakit-cache", "seqlen": "5", "n_layer": "2"}


@pytest.mark.parametrize("meta,tensors,match", [
    ({"format": "mambakit-cache", "seqlen": "5"}, _state_tensors(2), "no 'n_layer'"),
    ({**GOOD_META, "n_layer": "0"}, _state_tensors(2), "'n_layer' must be >= 1, got 0"),
    ({**GOOD_META, "n_layer": "two"}, _state_tensors(2), "'n_layer' must be an int, got 'two'"),
    ({**GOOD_META, "n_layer": "-3"}, _state_tensors(2), "'n_layer' must be >= 1"),
    ({**GOOD_META, "n_layer": "1000000000"}, _state_tensors(2), "n_layer=1000000000 .* holds 4 tensors"),
    ({**GOOD_META, "seqlen": "5.5"}, _state_tensors(2), "'seqlen' must be an int"),
    ({**GOOD_META, "n_layer": "3"}, {**_state_tensors(2), "x": torch.zeros(1), "y": torch.zeros(1)},
     "no tensor layers.2.conv"),
    ({**GOOD_META, "architecture": "{not json"}, _state_tensors(2), "'architecture' must be a JSON object"),
    (GOOD_META, _state_tensors(2, conv_shape=(1, 32)), "layer 0's conv state must have 3 dims"),
    (GOOD_META, {**_state_tensors(2), "layers.1.ssm": torch.zeros(1, 32, 4, dtype=torch.int32)},
     "layer 1's ssm state must be a floating tensor"),
])
def test_bad_cache_metadata_or_tensors_name_the_file(tmp_path, meta, tensors, match):
    path = tmp_path / "c.safetensors"
    save_file(tensors, path, metadata=meta)
    with pytest.raises((ValueError, TypeError), match=f"{path}: .*{match}"):
        LMCache.load(path)


# ---- generation options -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    ({"seed": "1"}, TypeError, "seed must be None or an int"),
    ({"seed": 1.5}, TypeError, "seed must be None or an int"),
    ({"seed": 2**64}, ValueError, "seed must fit in 64 bits"),
    ({"seed": -2**63 - 1}, ValueError, "seed must fit in 64 bits"),
    ({"pad_token_id": -1, "eos_token_id": 3}, ValueError, r"pad_token_id must be a token id in \[0, 40\)"),
    ({"pad_token_id": VOCAB}, ValueError, "pad_token_id must be a token id"),
    ({"eos_token_id": -5}, ValueError, "eos_token_id must be a token id"),
    ({"eos_token_id": VOCAB + 100}, ValueError, "eos_token_id must be a token id"),
    ({"eos_token_id": "a"}, TypeError, "eos_token_id must be None or an int"),
    ({"temperature": 10**400}, ValueError, "temperature must be a finite number"),
    ({"repetition_penalty": 10**400}, ValueError, "repetition_penalty must be None or a finite number"),
    ({"stop": 5, "tokenizer": ByteTokenizer()}, TypeError, "stop must be a string or a list of strings"),
    ({"stop": "x", "tokenizer": object()}, TypeError, "tokenizer must have a decode"),
    ({"cache": {"layers": []}}, TypeError, "cache must be an LMCache"),
])
def test_bad_generation_arguments_name_themselves(model, prompt, kwargs, error, match):
    with pytest.raises(error, match=match):
        model.generate(prompt, max_new_tokens=2, **kwargs)


@pytest.mark.parametrize("ids,mask,error,match", [
    ([[1.5, 2]], None, TypeError, "prompt 0 must be a list of int token ids"),
    ([[1, 2], ["a"]], None, TypeError, "prompt 1 must be a list of int token ids"),
    ([[1, 2**70]], None, ValueError, "prompt 0 has a token id out of the int64 range"),
    ([torch.tensor([1.0, 2.0])], None, TypeError, "prompt 0 must hold integer token ids"),
    (torch.ones(1, 3, dtype=torch.long), torch.tensor([[0.5, 1.0, 1.0]]), ValueError, "only 0 and 1"),
    (torch.ones(1, 3, dtype=torch.long, device="meta"), torch.ones(1, 3), ValueError, "input_ids is a meta tensor"),
    (torch.ones(1, 3, dtype=torch.long, device="meta"), None, ValueError, "input_ids is a meta tensor"),
])
def test_bad_prompts_name_themselves(model, ids, mask, error, match):
    with pytest.raises(error, match=match):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 5e-6])
def test_a_tiny_temperature_is_greedy(model, prompt, temperature):
    """Dividing the logits by 1e-45 made them inf and the softmax nan (a RuntimeError from
    multinomial); below MIN_TEMPERATURE sampling is greedy, its limit."""
    greedy = model.generate(prompt, max_new_tokens=8)
    assert torch.equal(model.generate(prompt, max_new_tokens=8, temperature=temperature, seed=0), greedy)


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
def test_an_extreme_repetition_penalty_still_samples_valid_tokens(model, penalty):
    """logits / 1e-300 overflow to +inf: such a row takes its argmax instead of failing."""
    every_token = torch.arange(VOCAB)[None]  # every token has been seen: all are penalised
    out = model.generate(every_token, max_new_tokens=6, temperature=1.0, repetition_penalty=penalty, seed=0)
    new = out[:, VOCAB:]
    assert new.shape == (1, 6) and bool(((new >= 0) & (new < VOCAB)).all())


def test_a_narrow_id_dtype_does_not_wrap_the_new_tokens():
    """uint8 prompts with a 300-token vocabulary: the new ids >= 256 used to wrap around."""
    model = _model(vocab_size=300)
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    wide = model.generate(prompt, max_new_tokens=12)
    assert bool((wide[:, 5:] >= 256).any())  # the property is not vacuous
    narrow = model.generate(prompt.to(torch.uint8), max_new_tokens=12)
    assert narrow.dtype == torch.int64 and torch.equal(narrow, wide)
    assert model.generate(prompt.to(torch.int16), max_new_tokens=2).dtype == torch.int16  # holds every id


# ---- the model's forward ------------------------------------------------------------------------

def test_cu_seqlens_as_a_list_equals_the_tensor(model):
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        want = model.backbone(ids, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
        got = model.backbone(ids, cu_seqlens=[0, 4, 9])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cu_seqlens,error,match", [
    ([0, 4, 8], ValueError, r"cu_seqlens must be offsets from 0 to L=9"),
    ([1, 9], ValueError, "cu_seqlens must be offsets from 0"),
    ([0, 5, 5, 9], ValueError, r"strictly increasing"),
    ([0, 6, 4, 9], ValueError, r"strictly increasing"),
    ([0], ValueError, "cu_seqlens must be offsets"),
    ([0.0, 9.0], TypeError, "cu_seqlens must be a 1-D integer tensor or a list of int offsets"),
    ("0,9", TypeError, "cu_seqlens must be a 1-D integer tensor"),
    (torch.tensor([0, 9], device="meta"), ValueError, "cu_seqlens is on meta but input_ids is on cpu"),
])
def test_bad_cu_seqlens_name_themselves(model, cu_seqlens, error, match):
    with pytest.raises(error, match=match):
        model.backbone(torch.randint(0, VOCAB, (1, 9)), cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"logits_to_keep": -2}, ValueError, "logits_to_keep must be >= 0"),
    ({"logits_to_keep": 1.5}, TypeError, "logits_to_keep must be an int"),
    ({"targets": torch.full((2, 5), VOCAB)}, ValueError, rf"targets must be token ids in \[0, {VOCAB}\) or -100"),
    ({"targets": torch.full((2, 5), -3)}, ValueError, r"targets must be token ids .* got -3"),
    ({"targets": torch.zeros(2, 5)}, TypeError, "targets must be an integer tensor"),
    ({"targets": [[0] * 5] * 2}, TypeError, "targets must be a torch.Tensor"),
    ({"targets": torch.zeros(2, 4, dtype=torch.long)}, ValueError, r"targets \(2, 4\) must match input_ids \(2, 5\)"),
    ({"targets": torch.zeros(2, 5, dtype=torch.long, device="meta")}, ValueError, "targets is a meta tensor"),
    ({"targets": torch.full((2, 5), VOCAB), "chunk_len": 2}, ValueError, "targets must be token ids"),
    ({"input_ids": torch.zeros(2, 5, dtype=torch.long, device="meta")}, ValueError, "input_ids is a meta tensor"),
])
def test_bad_forward_arguments_name_themselves(model, kwargs, error, match):
    kwargs = {"input_ids": torch.randint(0, VOCAB, (2, 5)), **kwargs}
    with pytest.raises(error, match=match):
        model(**kwargs)


def test_ignored_targets_add_no_loss(model):
    ids = torch.randint(0, VOCAB, (2, 5))
    targets = torch.randint(0, VOCAB, (2, 5))
    ignored = targets.clone()
    ignored[:, :2] = -100
    with torch.no_grad():
        logits = model(ids)
        want = torch.nn.functional.cross_entropy(logits[:, 2:].flatten(0, 1), targets[:, 2:].flatten())
        torch.testing.assert_close(model(ids, targets=ignored), want)


def test_chunked_loss_ignores_the_same_targets(model):
    """The chunked loss divided by every position, ignored ones included: another loss than forward's."""
    ids = torch.randint(0, VOCAB, (2, 8))
    targets = torch.randint(0, VOCAB, (2, 8))
    targets[0, 1:6] = -100
    with torch.no_grad():
        whole = model(ids, targets=targets)
        chunked = model(ids, targets=targets, chunk_len=3)
    torch.testing.assert_close(chunked, whole)


def test_forward_and_step_refuse_a_cache_of_another_layer_count(model):
    other = _model(n_layer=3).allocate_cache(1)
    with pytest.raises(ValueError, match="the cache holds 3 layers, the model has 2"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=other)
    with pytest.raises(ValueError, match="the cache holds 3 layers, the model has 2"):
        model.step(torch.zeros(1, dtype=torch.long), other)


def test_a_meta_model_runs_on_meta_ids():
    """Shape inference on the meta device: no value can be checked, none is read."""
    meta = MambaLM(CONFIG, device="meta")
    assert meta(torch.zeros(2, 5, dtype=torch.long, device="meta")).shape == (2, 5, meta.config.padded_vocab_size)


def test_value_checks_are_skipped_while_tracing(model, monkeypatch):
    """The checks that read values cannot run under torch.compile / torch.export: they are all
    in one helper, which returns at once while tracing."""
    bad = torch.full((1, 3), VOCAB + 100)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        model._check_values_eagerly(bad)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    model._check_values_eagerly(bad, targets=torch.full((1, 3), -7))
