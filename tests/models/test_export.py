"""The whole language model (ids -> logits, on CPU the torch path of the ops) traces as one
graph: torch.compile(fullgraph=True), torch.export and the ONNX export (run in onnxruntime) give
eager's logits. The checks that read token values run eagerly only, outside any traced graph.

On CPU the compile tests use the "eager" / "aot_eager" backends: fullgraph=True is what proves
there is no graph break, and inductor's C++ code generation would take a minute here. The GPU
file (test_compile_gpu.py) compiles the 130m shape with inductor."""

import pytest
import torch

from mambakit import MambaConfig, MambaLM

VOCAB = 48


def tiny_lm(seed: int = 0) -> MambaLM:
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=VOCAB, d_state=4)).eval()


def random_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_whole_lm_compiles_in_one_graph():
    """fullgraph=True (backend "eager": dynamo's tracing alone): the id-range check used to read
    the ids (int(input_ids.min())), a graph break that fullgraph refuses."""
    model, ids = tiny_lm(), random_ids()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), model(ids), rtol=0, atol=0)
        out = compiled(ids, labels=ids)  # the transformers-style loss traces too
        want = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, want.logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="input_ids must lie in"):  # eager still checks the values
        model(torch.full((1, 3), VOCAB + 100))


def test_a_compiled_training_step_equals_eager():
    """forward and backward of the loss in one graph (backend "aot_eager": AOTAutograd traces
    the backward too): the loss and every gradient equal eager's."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=VOCAB, d_state=4)).train()
    ids = random_ids(length=8)
    model(ids, targets=ids).backward()
    want = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    loss = torch.compile(model, fullgraph=True, backend="aot_eager")(ids, targets=ids)
    loss.backward()
    torch.testing.assert_close(loss, model(ids, targets=ids), rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_torch_export_equals_eager():
    """torch.export.export of the whole model, and of its decomposed (inference) program, run
    for inference: the logits of eager."""
    model, ids = tiny_lm(), random_ids()
    with torch.no_grad():
        want = model(ids)
    program = torch.export.export(model, (ids,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(ids), want, rtol=1e-5, atol=1e-5)
    decomposed = program.run_decompositions()  # refused a mutated module-level scratch buffer before
    with torch.no_grad():
        torch.testing.assert_close(decomposed.module()(ids), want, rtol=1e-5, atol=1e-5)


def test_onnx_export_runs_in_onnxruntime():
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model, ids = tiny_lm(), random_ids()
    with torch.no_grad():
        want = model(ids)
    onnx_program = torch.onnx.export(model, (ids,), dynamo=True, verbose=False)
    runtime = ort.InferenceSession(onnx_program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in runtime.get_inputs()]
    (logits,) = runtime.run(None, {name: ids.numpy()})
    torch.testing.assert_close(torch.from_numpy(logits), want, rtol=1e-4, atol=1e-4)
