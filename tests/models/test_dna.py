"""The DNA models: the classifier over its three backbones (the RC one gives a window and its
reverse complement the same logits, at any weights; the others do not), its checks, and the
causal MambaLM at the DNA vocabulary ("mamba_dna")."""

import pytest
import torch

from mambakit.models import MambaLM
from mambakit.models.dna import (BACKBONES, DNA_VOCAB_SIZE, DNAClassifier, DNAClassifierConfig, classifier_builder,
                                 rc_ids)
from mambakit.models.registry import create_model
from mambakit.modules.rc_mamba import rc_hidden


def model(backbone: str) -> DNAClassifier:
    m = DNAClassifier(DNAClassifierConfig(backbone=backbone, num_classes=3, d_model=16, n_layer=2, d_state=4)).double()
    with torch.no_grad():  # random weights everywhere, so that no symmetry comes from the init
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def test_rc_ids():
    ids = torch.tensor([[0, 0, 1, 2, 3, 4, 5]])  # A A C G T N |
    assert rc_ids(ids).tolist() == [[5, 4, 0, 1, 2, 3, 3]]
    assert torch.equal(rc_ids(rc_ids(ids)), ids)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_classifier_shapes_and_rc_invariance(backbone):
    m = model(backbone)
    ids = torch.randint(0, DNA_VOCAB_SIZE, (4, 29))
    with torch.no_grad():
        logits, logits_rc = m(ids), m(rc_ids(ids))
        hidden, hidden_rc = m.hidden_states(ids), m.hidden_states(rc_ids(ids))
    assert logits.shape == (4, 3)
    invariant = (logits - logits_rc).abs().max().item() < 1e-10
    equivariant = (hidden_rc - rc_hidden(hidden)).abs().max().item() < 1e-10
    assert invariant == equivariant == (backbone == "rc")


def test_classifier_trains():
    torch.manual_seed(0)
    m = DNAClassifier(DNAClassifierConfig(backbone="rc", d_model=8, n_layer=1, d_state=4))
    ids, labels = torch.randint(0, 4, (6, 12)), torch.tensor([0, 1] * 3)
    torch.nn.functional.cross_entropy(m(ids), labels).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_classifier_checks():
    with pytest.raises(ValueError, match="backbone must be one of"):
        DNAClassifier(DNAClassifierConfig(backbone="sideways"))
    with pytest.raises(ValueError, match="must be even"):
        DNAClassifier(DNAClassifierConfig(backbone="rc", d_model=15))
    with pytest.raises(ValueError, match="involution"):
        DNAClassifier(DNAClassifierConfig(complement=(0, 1, 2, 3, 4, 4)))
    with pytest.raises(ValueError, match="unknown DNAClassifierConfig field"):
        classifier_builder("rc")(depth=3)
    m = model("causal")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 6\)"):
        m(torch.tensor([[0, 6]]))
    with pytest.raises(ValueError, match="integer token ids"):
        m(torch.zeros(2, 3))


def test_dna_language_model_is_a_small_vocab_mamba_lm():
    lm = create_model("mamba_dna", d_model=16, n_layer=1, d_state=4)
    assert isinstance(lm, MambaLM) and lm.config.vocab_size == DNA_VOCAB_SIZE
    assert lm(torch.randint(0, DNA_VOCAB_SIZE, (2, 9))).shape == (2, 9, lm.config.padded_vocab_size)
