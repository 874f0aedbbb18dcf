"""Bad input is refused up front with a ValueError (wrong shape or value) or a TypeError (wrong
type or dtype) whose message names the argument, never an IndexError or RuntimeError from
deep inside a kernel, and never a silent broadcast."""

from __future__ import annotations

import re

import pytest
import torch

from mambakit import MambaConfig, MambaLM, ops

BATCH, DIM, LENGTH, N, K = 2, 4, 6, 3, 4


def _randn(*shape, **kw):
    return torch.randn(*shape, **kw)


def scan_args(**overrides):
    """Valid selective_scan arguments, with overrides applied."""
    args = dict(u=_randn(BATCH, DIM, LENGTH), delta=_randn(BATCH, DIM, LENGTH), A=-torch.rand(DIM, N),
                B=_randn(BATCH, N, LENGTH), C=_randn(BATCH, N, LENGTH), D=_randn(DIM), z=_randn(BATCH, DIM, LENGTH),
                delta_bias=_randn(DIM), initial_state=_randn(BATCH, DIM, N), delta_softplus=True,
                return_final_state=True)
    args.update(overrides)
    return args


def packed_args(cu_seqlens, **overrides):
    """Valid arguments for two sequences packed along L (batch 1), with overrides applied."""
    args = scan_args(u=_randn(1, DIM, LENGTH), delta=_randn(1, DIM, LENGTH), B=_randn(1, N, LENGTH),
                     C=_randn(1, N, LENGTH), z=_randn(1, DIM, LENGTH), initial_state=_randn(2, DIM, N),
                     cu_seqlens=cu_seqlens)
    args.update(overrides)
    return args


def scan(**overrides):
    return lambda backend: ops.selective_scan(**scan_args(**overrides), backend=backend)


def packed(cu_seqlens, **overrides):
    return lambda backend: ops.selective_scan(**packed_args(cu_seqlens, **overrides), backend=backend)


def conv(**overrides):
    args = dict(x=_randn(BATCH, DIM, LENGTH), weight=_randn(DIM, K), bias=_randn(DIM), activation="silu",
                initial_state=_randn(BATCH, DIM, K - 1), return_final_state=True)
    args.update(overrides)
    return lambda backend: ops.causal_conv1d(**args, backend=backend)


def state_update(**overrides):
    args = dict(state=_randn(BATCH, DIM, N), x=_randn(BATCH, DIM), dt=_randn(BATCH, DIM), A=-torch.rand(DIM, N),
                B=_randn(BATCH, N), C=_randn(BATCH, N), D=_randn(DIM), z=_randn(BATCH, DIM), dt_bias=_randn(DIM),
                dt_softplus=True)
    args.update(overrides)
    return lambda backend: ops.selective_state_update(**args, backend=backend)


def conv_update(**overrides):
    args = dict(x=_randn(BATCH, DIM), conv_state=_randn(BATCH, DIM, K - 1), weight=_randn(DIM, K),
                bias=_randn(DIM), activation="silu")
    args.update(overrides)
    return lambda backend: ops.causal_conv1d_update(**args, backend=backend)


def config(**fields):
    return lambda backend: MambaConfig(**{"d_model": 32, "n_layer": 2, "d_state": 8, "vocab_size": 96, **fields})


_MODEL: list[MambaLM] = []


def model() -> MambaLM:
    if not _MODEL:
        _MODEL.append(MambaLM(MambaConfig(d_model=32, n_layer=2, d_state=8, vocab_size=96)).eval())
    return _MODEL[0]


def forward(ids_factory):
    return lambda backend: model()(ids_factory())


def step(ids_factory):
    def run(backend):
        m = model()
        return m.step(ids_factory(), m.allocate_cache(BATCH))
    return run


V = 96  # the padded vocabulary of model()

# (id, call(backend), expected exception type, regex the message must match)
OP_CASES = [
    # ---- selective_scan
    ("scan-u-rank", scan(u=_randn(BATCH, DIM)), ValueError, r"\bu must have 3 dims"),
    ("scan-u-not-a-tensor", scan(u=[[[0.0]]]), TypeError, r"\bu must be a torch\.Tensor"),
    ("scan-u-integer", scan(u=torch.ones(BATCH, DIM, LENGTH, dtype=torch.int64)), TypeError,
     r"\bu must be a real floating tensor"),
    ("scan-delta-shape", scan(delta=_randn(BATCH, DIM, LENGTH - 1)), ValueError, r"\bdelta must have shape"),
    ("scan-A-first-dim", scan(A=-torch.rand(DIM + 1, N)), ValueError, r"\bA must have shape \(D=4, N\)"),
    ("scan-A-rank", scan(A=-torch.rand(DIM)), ValueError, r"\bA must have 2 dims"),
    ("scan-A-complex", scan(A=torch.complex(-torch.rand(DIM, N), torch.rand(DIM, N))), TypeError,
     r"\bA must be a real floating tensor.*complex"),
    ("scan-L-zero", scan(u=_randn(BATCH, DIM, 0), delta=_randn(BATCH, DIM, 0), B=_randn(BATCH, N, 0),
                         C=_randn(BATCH, N, 0), z=None), ValueError, r"\bu has sequence length L=0"),
    ("scan-N-too-large", scan(A=-torch.rand(DIM, 300), B=_randn(BATCH, 300, LENGTH), C=_randn(BATCH, 300, LENGTH),
                              initial_state=None), ValueError, r"\bA has N=300 states"),
    ("scan-N-zero", scan(A=-torch.rand(DIM, 0), B=_randn(BATCH, 0, LENGTH), C=_randn(BATCH, 0, LENGTH),
                         initial_state=None), ValueError, r"\bA has N=0 states"),
    ("scan-groups-not-dividing-D", scan(B=_randn(BATCH, 3, N, LENGTH), C=_randn(BATCH, 3, N, LENGTH)), ValueError,
     r"\bB has G=3 groups, which must divide D=4"),
    ("scan-B-C-ranks-differ", scan(C=_randn(BATCH, 1, N, LENGTH)), ValueError, r"\bB and C must both"),
    ("scan-B-wrong-N", scan(B=_randn(BATCH, N + 1, LENGTH)), ValueError, r"\bB must have shape \(2, 3, 6\)"),
    ("scan-C-wrong-L", scan(C=_randn(BATCH, N, LENGTH + 1)), ValueError, r"\bC must have shape \(2, 3, 6\)"),
    ("scan-D-shape", scan(D=_randn(DIM + 1)), ValueError, r"\bD must have shape \(4,\)"),
    ("scan-D-rank", scan(D=_randn(1, DIM)), ValueError, r"\bD must have 1 dims"),
    ("scan-delta_bias-shape", scan(delta_bias=_randn(DIM - 1)), ValueError, r"\bdelta_bias must have shape \(4,\)"),
    ("scan-z-shape", scan(z=_randn(BATCH, DIM, LENGTH + 1)), ValueError, r"\bz must have shape"),
    ("scan-initial_state-shape", scan(initial_state=_randn(BATCH, DIM, N + 1)), ValueError,
     r"\binitial_state must have shape \(2, 4, 3\)"),
    ("scan-D-other-device", scan(D=torch.empty(DIM, device="meta")), ValueError, r"\bD is on meta but u is on cpu"),
    ("scan-u-other-device", scan(u=torch.empty(BATCH, DIM, LENGTH, device="meta")), ValueError,
     r"\bdelta is on cpu but u is on meta"),
    ("scan-initial_state-other-device", scan(initial_state=torch.empty(BATCH, DIM, N, device="meta")), ValueError,
     r"\binitial_state is on meta"),
    ("scan-cu_seqlens-other-device", packed(torch.tensor([0, 3, LENGTH], dtype=torch.int32, device="meta")),
     ValueError, r"\bcu_seqlens is on meta"),
    ("scan-cu_seqlens-batch-2", scan(cu_seqlens=torch.tensor([0, 3, LENGTH], dtype=torch.int32),
                                     initial_state=None), ValueError, r"\bcu_seqlens needs .*batch 1, got batch 2"),
    ("scan-cu_seqlens-not-ending-at-L", packed(torch.tensor([0, 3, LENGTH - 1], dtype=torch.int32)), ValueError,
     r"\bcu_seqlens must start at 0 and end at L=6"),
    ("scan-cu_seqlens-not-starting-at-0", packed(torch.tensor([1, 3, LENGTH], dtype=torch.int32)), ValueError,
     r"\bcu_seqlens must start at 0"),
    ("scan-cu_seqlens-not-increasing", packed(torch.tensor([0, 4, 2, LENGTH], dtype=torch.int32),
                                              initial_state=None), ValueError,
     r"\bcu_seqlens must be strictly increasing"),
    ("scan-cu_seqlens-empty-sequence", packed(torch.tensor([0, 3, 3, LENGTH], dtype=torch.int64),
                                              initial_state=None), ValueError,
     r"\bcu_seqlens must be strictly increasing"),
    ("scan-cu_seqlens-float", packed(torch.tensor([0.0, 3.0, LENGTH])), TypeError,
     r"\bcu_seqlens must be int32 or int64"),
    ("scan-cu_seqlens-2d", packed(torch.tensor([[0, 3, LENGTH]], dtype=torch.int32)), ValueError,
     r"\bcu_seqlens must be 1-D"),
    ("scan-cu_seqlens-initial_state-per-sequence", packed(torch.tensor([0, 3, LENGTH], dtype=torch.int32),
                                                          initial_state=_randn(1, DIM, N)), ValueError,
     r"\binitial_state must have shape \(2, 4, 3\)"),
    ("scan-backend-unknown", lambda backend: ops.selective_scan(**scan_args(), backend="triton-" + backend),
     ValueError, r"\bbackend must be one of"),
    # ---- causal_conv1d
    ("conv-weight-shape", conv(weight=_randn(DIM + 1, K)), ValueError, r"\bweight must have shape \(D=4, K\)"),
    ("conv-weight-conv1d-layout", conv(weight=_randn(DIM, 1, K)), ValueError, r"\bweight must have 2 dims"),
    ("conv-activation", conv(activation="relu"), ValueError, r"\bactivation must be None, 'silu' or 'swish'"),
    ("conv-initial_state-shape", conv(initial_state=_randn(BATCH, DIM, K)), ValueError,
     r"\binitial_state must have shape \(2, 4, 3\)"),
    ("conv-L-zero", conv(x=_randn(BATCH, DIM, 0), initial_state=None), ValueError, r"\bx has sequence length L=0"),
    ("conv-bias-shape", conv(bias=_randn(DIM + 1)), ValueError, r"\bbias must have shape \(4,\)"),
    ("conv-x-integer", conv(x=torch.ones(BATCH, DIM, LENGTH, dtype=torch.int32)), TypeError,
     r"\bx must be a real floating tensor"),
    ("conv-weight-other-device", conv(weight=torch.empty(DIM, K, device="meta")), ValueError,
     r"\bweight is on meta"),
    # ---- selective_state_update
    ("state-update-x-shape", state_update(x=_randn(BATCH, DIM + 1)), ValueError, r"\bx must have shape \(2, 4\)"),
    ("state-update-dt-shape", state_update(dt=_randn(BATCH + 1, DIM)), ValueError, r"\bdt must have shape \(2, 4\)"),
    ("state-update-A-shape", state_update(A=-torch.rand(DIM, N + 1)), ValueError, r"\bA must have shape \(4, 3\)"),
    ("state-update-B-shape", state_update(B=_randn(BATCH, N + 1)), ValueError, r"\bB must have shape \(2, 3\)"),
    ("state-update-B-C-ranks-differ", state_update(C=_randn(BATCH, 1, N)), ValueError, r"\bB and C must both"),
    ("state-update-groups-not-dividing-D", state_update(B=_randn(BATCH, 3, N), C=_randn(BATCH, 3, N)), ValueError,
     r"\bB has G=3 groups"),
    ("state-update-z-shape", state_update(z=_randn(BATCH, DIM - 1)), ValueError, r"\bz must have shape \(2, 4\)"),
    ("state-update-dt_bias-shape", state_update(dt_bias=_randn(DIM + 2)), ValueError,
     r"\bdt_bias must have shape \(4,\)"),
    ("state-update-state-rank", state_update(state=_randn(BATCH, DIM)), ValueError, r"\bstate must have 3 dims"),
    ("state-update-state-integer", state_update(state=torch.zeros(BATCH, DIM, N, dtype=torch.int64)), TypeError,
     r"\bstate must be a real floating tensor"),
    # ---- causal_conv1d_update
    ("conv-update-weight-shape", conv_update(weight=_randn(DIM, K + 1)), ValueError,
     r"\bweight must have shape \(4, 4\)"),
    ("conv-update-x-shape", conv_update(x=_randn(BATCH, DIM + 1)), ValueError, r"\bx must have shape \(2, 4\)"),
    ("conv-update-x-batch", conv_update(x=_randn(BATCH + 1, DIM)), ValueError, r"\bx must have shape \(2, 4\)"),
    ("conv-update-bias-shape", conv_update(bias=_randn(DIM - 1)), ValueError, r"\bbias must have shape \(4,\)"),
    ("conv-update-activation", conv_update(activation="gelu"), ValueError, r"\bactivation must be"),
]

OTHER_CASES = [
    # ---- MambaConfig
    ("config-dt_min-nan", config(dt_min=float("nan")), ValueError, r"MambaConfig\.dt_min must be a finite"),
    ("config-dt_min-inf", config(dt_min=float("inf")), ValueError, r"MambaConfig\.dt_min must be a finite"),
    ("config-dt_max-inf", config(dt_max=float("inf")), ValueError, r"MambaConfig\.dt_max must be a finite"),
    ("config-norm_epsilon-zero", config(norm_epsilon=0.0), ValueError, r"MambaConfig\.norm_epsilon"),
    ("config-d_model-negative", config(d_model=-32), ValueError, r"MambaConfig\.d_model must be a positive int"),
    ("config-d_model-float", config(d_model=32.0), ValueError, r"MambaConfig\.d_model must be a positive int"),
    ("config-n_layer-bool", config(n_layer=True), ValueError, r"MambaConfig\.n_layer must be a positive int"),
    ("config-d_state-300", config(d_state=300), ValueError, r"MambaConfig\.d_state must be <= 256"),
    ("config-dt_rank-zero", config(dt_rank=0), ValueError, r"MambaConfig\.dt_rank"),
    ("config-dt_min-above-dt_max", config(dt_min=0.2, dt_max=0.1), ValueError,
     r"MambaConfig\.dt_min \(0\.2\) must be <= dt_max \(0\.1\)"),
    ("config-unknown-preset", lambda backend: MambaConfig.from_name("no-such-preset"), ValueError,
     r"unknown preset 'no-such-preset'"),
    ("config-unknown-field", lambda backend: MambaConfig.from_dict({"d_model": 32, "d_modle": 64}), ValueError,
     r"unknown MambaConfig fields: \['d_modle'\]"),
    # ---- MambaLM
    ("lm-float-ids", forward(lambda: torch.zeros(BATCH, 5)), TypeError, r"\binput_ids must be an integer tensor"),
    ("lm-list-ids", forward(lambda: [[1, 2, 3]]), TypeError, r"\binput_ids must be a torch\.Tensor"),
    ("lm-1d-ids", forward(lambda: torch.zeros(5, dtype=torch.long)), ValueError,
     r"\binput_ids must have shape \(B, L\), got \(5,\)"),
    ("lm-id-too-large", forward(lambda: torch.tensor([[1, V, 2]])), ValueError,
     rf"\binput_ids must lie in \[0, {V}\), got values in \[1, {V}\]"),
    ("lm-id-negative", forward(lambda: torch.tensor([[3, -1, 2]])), ValueError,
     rf"\binput_ids must lie in \[0, {V}\), got values in \[-1, 3\]"),
    ("lm-empty-length", forward(lambda: torch.zeros(BATCH, 0, dtype=torch.long)), ValueError,
     r"\binput_ids is empty"),
    ("lm-empty-batch", forward(lambda: torch.zeros(0, 4, dtype=torch.long)), ValueError, r"\binput_ids is empty"),
    ("lm-step-2d-ids", step(lambda: torch.zeros(BATCH, 1, dtype=torch.long)), ValueError,
     r"\binput_ids must have shape \(B,\)"),
    ("lm-step-batch-differs-from-cache", step(lambda: torch.zeros(BATCH + 1, dtype=torch.long)), ValueError,
     r"\bcache holds batch 2 but token_ids has batch 3"),
]

CASES = [pytest.param(call, backend, exc, match, id=f"{name}-{backend}")
         for name, call, exc, match in OP_CASES for backend in ops.BACKENDS]
CASES += [pytest.param(call, None, exc, match, id=name) for name, call, exc, match in OTHER_CASES]


@pytest.mark.parametrize("call,backend,exc,match", CASES)
def test_bad_input_is_refused_with_a_clear_error(call, backend, exc, match):
    with pytest.raises((ValueError, TypeError), match=match) as excinfo:
        call(backend)
    # exactly ValueError / TypeError: not a subclass, nor an IndexError or RuntimeError from inside
    assert type(excinfo.value) in (ValueError, TypeError)
    assert type(excinfo.value) is exc, f"{type(excinfo.value).__name__}: {excinfo.value}"


def test_every_op_case_fails_only_because_of_its_bad_argument():
    """The valid inputs the cases start from run, so each case fails for its one change."""
    for backend in ops.BACKENDS:
        y, h = ops.selective_scan(**scan_args(), backend=backend)
        assert y.shape == (BATCH, DIM, LENGTH) and h.shape == (BATCH, DIM, N)
        y, h = ops.selective_scan(**packed_args(torch.tensor([0, 3, LENGTH], dtype=torch.int32)), backend=backend)
        assert y.shape == (1, DIM, LENGTH) and h.shape == (2, DIM, N)
        y, s = conv()(backend)
        assert y.shape == (BATCH, DIM, LENGTH) and s.shape == (BATCH, DIM, K - 1)
        assert state_update()(backend).shape == (BATCH, DIM)
        assert state_update(B=_randn(BATCH, 2, N), C=_randn(BATCH, 2, N))(backend).shape == (BATCH, DIM)
        assert conv_update()(backend).shape == (BATCH, DIM)
    assert config()(None).d_model == 32
    assert forward(lambda: torch.tensor([[0, V - 1, 5]]))(None).shape == (1, 3, V)
    assert step(lambda: torch.zeros(BATCH, dtype=torch.long))(None).shape == (BATCH, V)
    for _, _, _, match in OP_CASES + OTHER_CASES:
        re.compile(match)
