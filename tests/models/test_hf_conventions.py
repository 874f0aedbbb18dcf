"""transformers' conventions on MambaLM: `model(input_ids, labels=...)` gives a CausalLMOutput
whose loss is transformers' causal-LM loss, `generate` takes do_sample / max_length /
eos_token_id / pad_token_id / attention_mask / generation_config with transformers' meaning,
and transformers' Trainer trains a mambakit model."""

import inspect
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from mambakit import MambaConfig, MambaLM

VOCAB = 64  # a multiple of 8: the padded vocabulary is the vocabulary, as transformers sees it
IGNORE_INDEX = -100  # the labels that add no loss (transformers' and cross_entropy's ignore_index)


def tiny_lm(seed: int = 0, n_layer: int = 2) -> MambaLM:
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(d_model=16, n_layer=n_layer, vocab_size=VOCAB, d_state=4))
    with torch.no_grad():  # away from the init, so that greedy continuations are varied
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def random_ids(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def labels_with_ignored(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, 3:5] = IGNORE_INDEX
    labels[1, -1] = IGNORE_INDEX
    return labels


def hf_copy(model: MambaLM, directory):
    """transformers' MambaForCausalLM with the same weights (through the Hugging Face format)."""
    transformers = pytest.importorskip("transformers")
    model.save_pretrained(directory, format="hf")
    return transformers.MambaForCausalLM.from_pretrained(directory).eval()


# ---- forward with labels ----------------------------------------------------------------------

def test_labels_give_the_shifted_cross_entropy():
    from mambakit.models.lm import CausalLMOutput
    model, ids = tiny_lm(), random_ids()
    labels = labels_with_ignored(ids)
    out = model(input_ids=ids, labels=labels)
    assert isinstance(out, CausalLMOutput) and out.logits.shape == (2, 10, VOCAB)
    want = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits, model(ids), rtol=0, atol=0)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_labels_loss_equals_transformers_loss(tmp_path):
    """The same weights in transformers' MambaForCausalLM, and its ForCausalLMLoss."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    model, ids = tiny_lm(seed=3), random_ids(seed=4)
    labels = labels_with_ignored(ids)
    hf = hf_copy(model, tmp_path)
    with torch.no_grad():
        ours = model(input_ids=ids, labels=labels)
        theirs = hf(input_ids=ids, labels=labels)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, ForCausalLMLoss(ours.logits, labels, vocab_size=VOCAB), rtol=1e-6, atol=1e-6)


def test_the_output_reads_as_a_model_output():
    model, ids = tiny_lm(), random_ids()
    with torch.no_grad():
        out = model(ids, labels=ids)
        logits = model(ids)
    assert torch.equal(out["logits"], out.logits) and out["loss"] is out.loss
    assert out[0] is out.loss and out[1] is out.logits and len(out[1:]) == 1  # Trainer: outputs[0], outputs[1:]
    assert list(out) == out.keys() == ["loss", "logits"] and out.to_tuple() == (out.loss, out.logits)
    assert isinstance(logits, torch.Tensor)  # without labels: the logits tensor, as before
    with torch.no_grad():
        as_dict = model(ids, return_dict=True)
        loss, tupled = model(ids, labels=ids, return_dict=False)
    assert as_dict.loss is None and as_dict.keys() == ["logits"] and as_dict[0] is as_dict.logits
    with pytest.raises(KeyError):
        as_dict["loss"]
    torch.testing.assert_close(loss, out.loss, rtol=0, atol=0)
    torch.testing.assert_close(tupled, logits, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"labels": torch.zeros(2, 9, dtype=torch.long)}, ValueError, r"labels \(2, 9\) must match input_ids"),
    ({"labels": torch.full((2, 10), VOCAB)}, ValueError, "labels must be token ids in"),
    ({"labels": torch.zeros(2, 10)}, TypeError, "labels must be an integer tensor"),
    ({"labels": torch.zeros(2, 10, dtype=torch.long), "targets": torch.zeros(2, 10, dtype=torch.long)},
     ValueError, "labels= computes"),
    ({"labels": torch.zeros(2, 10, dtype=torch.long), "logits_to_keep": 1}, ValueError, "labels= computes"),
    ({"return_dict": "yes"}, TypeError, "return_dict must be"),
    ({"attention_mask": torch.tensor([[0] * 3 + [1] * 7] * 2)}, ValueError, "attention_mask must pad on the right"),
    ({"attention_mask": torch.full((2, 10), 2)}, ValueError, "attention_mask must hold only 0 and 1"),
    ({"attention_mask": torch.ones(2, 9, dtype=torch.long)}, ValueError, r"attention_mask \(2, 9\) must match"),
])
def test_bad_labels_and_masks_name_themselves(kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny_lm()(random_ids(), **kwargs)


def test_a_right_padded_batch_gives_each_sequence_its_own_logits_and_loss():
    """The collators' batches: padding on the right, labels IGNORE_INDEX there."""
    model = tiny_lm()
    short, long = random_ids(1, 6, seed=5)[0], random_ids(1, 10, seed=6)[0]
    ids = torch.stack([torch.cat([short, torch.zeros(4, dtype=torch.long)]), long])
    mask = torch.tensor([[1] * 6 + [0] * 4, [1] * 10])
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        alone = model(short[None], labels=short[None])
        alone_long = model(long[None], labels=long[None])
    torch.testing.assert_close(out.logits[0, :6], alone.logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[1], alone_long.logits[0], rtol=1e-5, atol=1e-5)
    want = (alone.loss * 5 + alone_long.loss * 9) / 14  # the mean over every predicted token
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="attention_mask goes with labels or the logits"):
        model(ids, attention_mask=mask, cache=model.allocate_cache(2))


# ---- generate ---------------------------------------------------------------------------------

def test_generate_has_its_options_in_its_signature_and_names_itself_on_a_wrong_one():
    model = tiny_lm()
    params = inspect.signature(model.generate).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for name in ("do_sample", "max_length", "eos_token_id", "pad_token_id", "attention_mask", "generation_config"):
        assert name in params, name
    with pytest.raises(TypeError, match=r"^MambaLM\.generate\(\) got an unexpected keyword argument 'foo'$"):
        model.generate(random_ids(), foo=1)


def test_do_sample_false_is_greedy_whatever_the_temperature():
    model, ids = tiny_lm(), random_ids()
    greedy = model.generate(ids, max_new_tokens=8)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, temperature=1.5, top_k=5, seed=1), greedy)
    sampled = model.generate(ids, max_new_tokens=8, do_sample=True, seed=1)  # temperature 1
    assert torch.equal(sampled, model.generate(ids, max_new_tokens=8, temperature=1.0, seed=1))
    assert not torch.equal(sampled, greedy)
    with pytest.raises(ValueError, match="do_sample=True samples, so temperature must be > 0"):
        model.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(TypeError, match="do_sample must be None, True or False"):
        model.generate(ids, max_new_tokens=2, do_sample="yes")


def test_max_length_counts_the_prompt():
    model, ids = tiny_lm(), random_ids(length=7)
    out = model.generate(ids, max_length=12)
    assert out.shape == (2, 12) and torch.equal(out, model.generate(ids, max_new_tokens=5))
    assert model.generate(ids, max_length=30, max_new_tokens=2).shape == (2, 9)  # max_new_tokens wins
    assert torch.equal(model.generate(ids, max_length=7), ids)
    rows = model.generate([ids[0, :3].tolist(), ids[1].tolist()], max_length=9)  # the longest prompt counts
    assert [len(r) for r in rows] == [5, 9]
    with pytest.raises(ValueError, match="max_length=5 counts the prompt, which already has 7 tokens"):
        model.generate(ids, max_length=5)
    with pytest.raises(ValueError, match="max_length must be an int >= 1"):
        model.generate(ids, max_length=0)


def _eos_ending_one_row(model, ids, steps):
    """A token that row 0's greedy continuation makes and row 1's never does."""
    greedy = model.generate(ids, max_new_tokens=steps)[:, ids.shape[1]:]
    only_row0 = [t for t in greedy[0].tolist() if t not in greedy[1].tolist()]
    assert only_row0, "the test needs a token that row 0 makes and row 1 does not"
    return only_row0[0], greedy


def test_eos_stops_a_row_and_pads_it_with_pad_token_id():
    model, ids = tiny_lm(), random_ids()
    eos, greedy = _eos_ending_one_row(model, ids, 10)
    pad = next(t for t in range(VOCAB) if t != eos)
    out = model.generate(ids, max_new_tokens=10, eos_token_id=eos, pad_token_id=pad)[:, ids.shape[1]:]
    end = greedy[0].tolist().index(eos)
    assert out[0, :end + 1].tolist() == greedy[0, :end + 1].tolist()
    assert (out[0, end + 1:] == pad).all() and torch.equal(out[1], greedy[1])
    as_list = model.generate(ids, max_new_tokens=10, eos_token_id=[VOCAB - 1, eos], pad_token_id=pad)
    assert torch.equal(as_list[:, ids.shape[1]:], out)  # eos_token_id may be a list, as in transformers


def test_greedy_generation_with_transformers_options_equals_transformers(tmp_path):
    """The same call to transformers' MambaForCausalLM.generate (its loop, its eos padding)."""
    model, ids = tiny_lm(seed=2), random_ids(seed=3)
    eos, _ = _eos_ending_one_row(model, ids, 8)
    pad = next(t for t in range(VOCAB) if t != eos)
    hf = hf_copy(model, tmp_path)
    options = dict(max_length=ids.shape[1] + 8, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                   attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        theirs = hf.generate(ids, **options)
    assert torch.equal(model.generate(ids, **options), theirs)


def test_a_generation_config_gives_the_options_not_passed():
    transformers = pytest.importorskip("transformers")
    model, ids = tiny_lm(), random_ids()
    eos, _ = _eos_ending_one_row(model, ids, 6)
    want = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=1)
    config = transformers.GenerationConfig(max_new_tokens=6, do_sample=False, temperature=0.7,
                                           eos_token_id=eos, pad_token_id=1)
    assert torch.equal(model.generate(ids, generation_config=config), want)
    duck = SimpleNamespace(max_length=ids.shape[1] + 6, eos_token_id=eos, pad_token_id=1)  # any such object
    assert torch.equal(model.generate(ids, generation_config=duck), want)
    assert model.generate(ids, max_new_tokens=2, generation_config=config).shape == (2, 12)  # the call wins
    with pytest.raises(ValueError, match="generation_config.num_beams=4 is not supported"):
        model.generate(ids, generation_config=transformers.GenerationConfig(num_beams=4))


# ---- training with transformers ---------------------------------------------------------------

def test_activation_checkpointing_recomputes_the_blocks_with_the_same_gradients():
    model, ids = tiny_lm(n_layer=3).train(), random_ids()
    calls = []
    for block in model.backbone.layers:
        block.register_forward_pre_hook(lambda *_: calls.append(1))
    model(ids, labels=ids).loss.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    assert len(calls) == 3
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    calls.clear()
    model(ids, labels=ids).loss.backward()
    assert len(calls) == 6  # each block ran again in the backward pass (its recomputation may stop early)
    for got, w in zip([p.grad for p in model.parameters()], want):
        torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-6)
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="use_reentrant=False"):
        model.activation_checkpointing_enable({"use_reentrant": True})


def test_transformers_trainer_trains_a_mambakit_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = tiny_lm().train()
    pattern = torch.arange(16) % 8  # a repeated pattern: easy to learn
    data = [{"input_ids": pattern.clone(), "labels": pattern.clone()} for _ in range(16)]
    before = [p.detach().clone() for p in model.parameters()]
    names = inspect.signature(transformers.TrainingArguments).parameters
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=5, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2,
                                          logging_steps=1, disable_tqdm=True, **{checkpointing: True})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    trainer.train()
    assert model.is_gradient_checkpointing  # the Trainer turned it on
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    assert len(losses) == 5 and losses[-1] < losses[0]
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert trainer.evaluate()["eval_loss"] < losses[0]
