"""torch.compile(fullgraph=True) of the whole 130m-shaped LM on CUDA, with inductor: the Triton
kernels trace as torch.library custom ops (ops/triton/scan_op.py), so the model is one graph.
Compiled inference equals eager (fp32 and bf16 autocast), and a compiled training step (forward
and backward) gives eager's loss and gradients. Random weights; no checkpoint is needed."""

import pytest
import torch

from mambakit import MambaLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MambaLM.from_name("130m", device="cuda")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def ids_of(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50277, (batch, length), generator=g).cuda()


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_compiled_inference_equals_eager(model, autocast):
    model.eval()
    ids = ids_of(2, 256)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        want = model(ids)
        got = compiled(ids)
    assert got.shape == want.shape == (2, 256, model.config.padded_vocab_size)
    assert torch.isfinite(got).all()
    assert relative_error(got, want) < (2e-2 if autocast else 1e-4)


def test_compiled_training_step_equals_eager(model):
    """targets= (mambakit's trainer) and labels= (transformers' Trainer), bf16 autocast, two
    optimizer steps of the compiled model after the eager reference's gradients."""
    model.train()
    ids = ids_of(2, 512, seed=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want_loss = model(ids, targets=ids)
    want_loss.backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = compiled(ids, targets=ids)
    loss.backward()
    assert abs(float(loss) - float(want_loss)) < 1e-2 * float(want_loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert relative_error(p.grad, want[name]) < 5e-2, name
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = compiled(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss) and out.logits.shape == (2, 512, model.config.padded_vocab_size)
