"""generate(): greedy equals argmax of a full forward at every step, sampling is seeded."""

import pytest
import torch

from mambakit import MambaConfig, MambaLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=50, d_state=8)).eval()


def test_greedy_equals_argmax_of_full_forward(model):
    prompt = torch.randint(0, 50, (2, 6))
    out = model.generate(prompt, max_new_tokens=8)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
    with torch.no_grad():
        logits = model(out)
    torch.testing.assert_close(out[:, 6:], logits[:, 5:-1, :50].argmax(-1), rtol=0, atol=0)


def test_sampling_is_reproducible_and_respects_top_k(model):
    prompt = torch.randint(0, 50, (1, 4))
    a = model.generate(prompt, max_new_tokens=20, temperature=1.0, seed=7)
    b = model.generate(prompt, max_new_tokens=20, temperature=1.0, seed=7)
    c = model.generate(prompt, max_new_tokens=20, temperature=1.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    with torch.no_grad():
        logits = model(a)[:, 3:-1, :50]
    top1 = model.generate(prompt, max_new_tokens=20, temperature=1.0, top_k=1, seed=7)
    with torch.no_grad():
        greedy = model.generate(prompt, max_new_tokens=20)
    assert torch.equal(top1, greedy)
    assert logits.shape[1] == 20


def test_eos_stops_generation(model):
    prompt = torch.randint(0, 50, (1, 4))
    first = model.generate(prompt, max_new_tokens=1)[0, -1].item()
    out = model.generate(prompt, max_new_tokens=10, eos_token_id=first)
    assert out.shape[1] == 5


@pytest.mark.parametrize("kwargs,match", [({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
                                          ({"top_k": 0}, "top_k"), ({"max_new_tokens": -1}, "max_new_tokens")])
def test_bad_generation_options(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model.generate(torch.zeros(1, 3, dtype=torch.long), **{"max_new_tokens": 2, **kwargs})
