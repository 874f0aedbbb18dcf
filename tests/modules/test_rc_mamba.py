"""The reverse-complement-equivariant layers: f(RC(x)) == RC(f(x)) to float64 round-off, where
RC reverses the sequence and the channels; the same check fails for layers that are not
equivariant (a plain bidirectional layer, a plain norm, RCPS without the channel reversal), so
that it cannot pass by accident."""

import pytest
import torch

from mambakit.modules.bimamba import BiMamba
from mambakit.modules.mamba import Mamba
from mambakit.modules.norm import RMSNorm
from mambakit.modules.rc_mamba import RCPS, RCBiMamba, RCRMSNorm, rc_hidden

D = 8  # both strands' halves
TOL = 1e-10


def rc_error(layer, x: torch.Tensor) -> float:
    """max |f(RC(x)) - RC(f(x))|."""
    with torch.no_grad():
        return (layer(rc_hidden(x)) - rc_hidden(layer(x))).abs().max().item()


def perturbed(layer):
    """Random weights everywhere (norm weights included), so that no symmetry comes from the init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layer


def inputs(batch=2, length=23):
    return torch.randn(batch, length, D, dtype=torch.float64)


def test_rc_hidden_is_an_involution_reversing_sequence_and_channels():
    x = inputs()
    assert torch.equal(rc_hidden(rc_hidden(x)), x)
    assert torch.equal(rc_hidden(x)[:, 0, 0], x[:, -1, -1])


def test_rc_bimamba_is_equivariant():
    layer = perturbed(RCBiMamba(D, d_state=4, dtype=torch.float64))
    x = inputs()
    assert rc_error(layer, x) < TOL
    out = layer(x)
    assert out.shape == x.shape and out.abs().max() > 1e-3  # not trivially zero


def test_rc_bimamba_gradients_are_equivariant_too():
    layer = perturbed(RCBiMamba(D, d_state=4, dtype=torch.float64))
    x = inputs()
    weight = torch.randn_like(x)
    grads = []
    for inp, w in ((x, weight), (rc_hidden(x), rc_hidden(weight))):
        layer.zero_grad()
        (layer(inp) * w).sum().backward()  # the same scalar for both: <f(x), w> = <f(RC x), RC w>
        grads.append([p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-9)


def test_rcps_makes_a_causal_mamba_equivariant():
    layer = perturbed(RCPS(Mamba(D // 2, d_state=4, dtype=torch.float64), D))
    assert rc_error(layer, inputs()) < TOL


def test_the_strands_share_one_set_of_parameters():
    rc = RCBiMamba(D, d_state=4)
    plain = BiMamba(D // 2, d_state=4)
    assert sum(p.numel() for p in rc.parameters()) == sum(p.numel() for p in plain.parameters())


def test_a_plain_bidirectional_layer_fails_the_check():
    assert rc_error(perturbed(BiMamba(D, d_state=4, dtype=torch.float64)), inputs()) > 1e-3


class NoChannelReversal(RCPS):
    """A broken RCPS: the reverse strand's half reversed in time only."""

    def forward(self, hidden, cache=None):
        half = self.d_model // 2
        out = self.mixer(torch.cat([hidden[..., :half], hidden[..., half:].flip(1)]))
        return torch.cat([out[:hidden.shape[0]], out[hidden.shape[0]:].flip(1)], dim=-1)


def test_parameter_sharing_without_the_channel_reversal_fails_the_check():
    broken = perturbed(NoChannelReversal(BiMamba(D // 2, d_state=4, dtype=torch.float64), D))
    assert rc_error(broken, inputs()) > 1e-3


def test_rc_norm_is_equivariant_and_a_plain_norm_is_not():
    assert rc_error(perturbed(RCRMSNorm(D, dtype=torch.float64)), inputs()) < TOL
    assert rc_error(perturbed(RMSNorm(D, dtype=torch.float64)), inputs()) > 1e-3


def test_bad_arguments():
    with pytest.raises(ValueError, match="d_model must be an even int"):
        RCBiMamba(7)
    with pytest.raises(ValueError, match="d_model must be an even int"):
        RCRMSNorm(3)
    layer = RCBiMamba(D, d_state=4)
    with pytest.raises(ValueError, match=r"shape \(B, L, 8\)"):
        layer(torch.randn(2, 5, 6))
    with pytest.raises(ValueError, match="no recurrent state"):
        layer(torch.randn(2, 5, D), cache=object())
