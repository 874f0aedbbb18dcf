"""The bidirectional Mamba mixer of Vision Mamba (Zhu et al. 2024, "bimamba v2").

One in_proj and one out_proj are shared; each direction has its own conv1d, x_proj, dt_proj,
A_log and D (the backward ones carry a `_b` suffix, as Vim names them). The forward direction
scans the tokens 0..L-1, the backward one scans L-1..0, and the two outputs, put back in token
order, are added (and halved with divide_out, Vim's `if_devide_out`) before out_proj:

    x, z = in_proj(h)
    y_f = scan_f(x, z)                          # causal over 0..L-1
    y_b = flip(scan_b(flip(x), flip(z)))        # causal over L-1..0
    out = out_proj((y_f + y_b) / 2)

So the layer equals two single-direction `Mamba` mixers that share in_proj/out_proj, one of them
run on the time-flipped tokens: (mixer_f(h) + flip(mixer_b(flip(h)))) / 2.

The fused path (the default) runs both directions in one depthwise-conv call and one selective
scan call by stacking them along the channel axis (2 * D_inner channels, grouped B/C with two
groups), and gates by SiLU(z) once after the two are added (the gate is per token, so
gate(y_f) + flip(gate'(y_b')) = (y_f + flip(y_b')) * SiLU(z)). `forward(h, fused=False)` is the
readable reference: two explicit single-direction calls.

Without autograd the layer runs an inference path: on CUDA (the Triton kernels) the fused op
`ops.bimamba_inference`, which flips nothing (the backward direction's conv runs anti-causally
and its scan backward in time, over rows padded to 16 steps), with the weights it takes made
once per version of the parameters (`padded_weights`); elsewhere `_fused_inference`, the fused
path holding less memory at once.

The fused paths take the submodules' weights only where every one is plain (`state.is_plain`);
a wrapped in_proj or out_proj (peft LoRA, a quantized Linear, a hook) is called, and a wrapped
per-direction conv1d, x_proj or dt_proj sends the layer to the reference, whose calls honour it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .state import at_least_fp32, causal_conv, is_plain, linear_on_channels


class BiMamba(nn.Module):
    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 divide_out: bool = True, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"BiMamba: {name} must be an int >= 1, got {v!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.divide_out = divide_out
        # the fused path pads the sequence to a multiple of this (None: 16 for CUDA tensors, else 1)
        self.pad_to: int | None = None
        # inference scans the batch in two blocks when the whole batch's Δ (B, 2*D_inner, Lp)
        # would take more than this many bytes (at 512 px and up for Vim-Ti at batch 64)
        self.scan_block_bytes = 64 * 2**20
        # the scan backend of inference: None picks the Triton kernels for CUDA tensors (the
        # padded path, `_padded_inference`); "triton" forces them (on CPU under TRITON_INTERPRET=1)
        self.backend: str | None = None
        self.layer_idx = layer_idx
        self.dt_init = (dt_min, dt_max, dt_init_floor)
        di, n, r = self.d_inner, d_state, self.dt_rank

        self.in_proj = nn.Linear(d_model, 2 * di, bias=bias, **factory)
        self.out_proj = nn.Linear(di, d_model, bias=bias, **factory)
        for s in ("", "_b"):  # forward, backward
            setattr(self, f"conv1d{s}", nn.Conv1d(di, di, d_conv, groups=di, padding=d_conv - 1,
                                                  bias=conv_bias, **factory))
            setattr(self, f"x_proj{s}", nn.Linear(di, r + 2 * n, bias=False, **factory))
            setattr(self, f"dt_proj{s}", nn.Linear(r, di, bias=True, **factory))
            a_log = nn.Parameter(torch.empty(di, n, device=device, dtype=torch.float32))
            d = nn.Parameter(torch.empty(di, device=device, dtype=torch.float32))
            a_log._no_weight_decay = d._no_weight_decay = True
            setattr(self, "A_log" if not s else "A_b_log", a_log)
            setattr(self, f"D{s}", d)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba's init for each direction: A = -(1..N), D = 1, softplus(dt bias) log-uniform
        in [dt_min, dt_max] (floored), dt_proj.weight ~ U(±1/sqrt(dt_rank))."""
        dt_min, dt_max, floor = self.dt_init
        dev = self.A_log.device
        for s, a_log in (("", self.A_log), ("_b", self.A_b_log)):
            a_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32, device=dev))
                        .expand(self.d_inner, -1))
            getattr(self, f"D{s}").fill_(1.0)
            dt_proj = getattr(self, f"dt_proj{s}")
            std = self.dt_rank ** -0.5
            nn.init.uniform_(dt_proj.weight, -std, std)
            dt = torch.exp(torch.rand(self.d_inner, device=dev) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            dt_proj.bias._no_reinit = True
            dt_proj.bias._no_weight_decay = True

    def direction_params(self, backward: bool) -> dict:
        """The per-direction parameters: conv1d, x_proj, dt_proj, A_log, D."""
        s = "_b" if backward else ""
        return {"conv1d": getattr(self, f"conv1d{s}"), "x_proj": getattr(self, f"x_proj{s}"),
                "dt_proj": getattr(self, f"dt_proj{s}"), "A_log": self.A_b_log if backward else self.A_log,
                "D": getattr(self, f"D{s}")}

    def plain_submodules(self) -> bool:
        """Whether in_proj, out_proj and both directions' conv1d, x_proj and dt_proj are plain
        (`is_plain`): the fused inference paths read their weights."""
        return is_plain(self.in_proj, nn.Linear) and is_plain(self.out_proj, nn.Linear) and self._directions_plain()

    def _directions_plain(self) -> bool:
        """Whether both directions' conv1d, x_proj and dt_proj are plain (`_fused` stacks their weights)."""
        return all(is_plain(p["conv1d"], nn.Conv1d) and is_plain(p["x_proj"], nn.Linear)
                   and is_plain(p["dt_proj"], nn.Linear)
                   for p in (self.direction_params(False), self.direction_params(True)))

    def forward(self, hidden_states: torch.Tensor, cache=None, fused: bool = True,
                length: int | None = None) -> torch.Tensor:
        """hidden_states (B, L, d_model) -> (B, L, d_model). `cache` is accepted for Block's
        call convention and must be None: a bidirectional layer has no recurrent state.
        `length`: the sequences' true length when the steps from it to L are padding (the
        encoder pads to a multiple of 16 for the Triton path); the padding never reaches the
        first `length` outputs, and its own outputs are unspecified (finite)."""
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"BiMamba expects hidden_states of shape (B, L, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        if cache is not None:
            raise ValueError("BiMamba has no recurrent state: the backward scan needs the whole sequence, "
                             "so it cannot decode token by token (cache must be None)")
        full = hidden_states.shape[1]
        if length is not None and not 1 <= length <= full:
            raise ValueError(f"BiMamba: length {length} must be in [1, {full}] (the steps given)")
        length = full if length is None else length
        if fused and self._triton_inference(hidden_states):
            if full % 16:  # pad to whole 16-step rows (one copy); the encoder pads once instead
                padded = hidden_states.new_zeros(hidden_states.shape[0], -(-full // 16) * 16, self.d_model)
                padded[:, :length] = hidden_states[:, :length]
                return self._padded_inference(padded, length)[:, :full]
            return self._padded_inference(hidden_states, length)
        if length < full:  # padding given to another path: run on the true steps only
            out = hidden_states.new_zeros(hidden_states.shape)
            out[:, :length] = self.forward(hidden_states[:, :length], fused=fused)
            return out
        batch = hidden_states.shape[0]
        # in_proj and out_proj as single 2-D GEMMs over the B*L tokens: as batched GEMMs over a
        # stride-0 weight, cuBLAS chose sm75 kernels for Vim's shapes (1.0 + 0.43 ms a layer at
        # B = 64, L = 4097 on the H200, 20 % of the model's time)
        tokens = hidden_states.reshape(batch * length, -1).t()  # (d_model, B*L)
        if fused and ops.no_autograd(hidden_states, *self.parameters()) and self.plain_submodules():
            y_cols = self._fused_inference(tokens, batch, length)  # (D_inner, B*L)
        else:
            xz = self._in_cols(slice(None), tokens).view(-1, batch, length).transpose(0, 1)  # (B, 2*D_inner, L)
            x, z = xz.split(self.d_inner, dim=1)  # (B, D_inner, L) each, L contiguous
            if fused and self._directions_plain():
                y_cols = self._fused(x, z)  # (D_inner, B*L)
            else:
                y_cols = self._reference(x, z).transpose(0, 1).reshape(self.d_inner, batch * length)
        y_rows = y_cols.t()  # (B*L, D_inner), a view
        if not is_plain(self.out_proj, nn.Linear):  # called, on y / 2: a wrapper's own terms halve too
            return self.out_proj(y_rows * 0.5 if self.divide_out else y_rows).view(batch, length, -1)
        # out_proj(y / 2) as (W / 2) y: halving the small weight (exact, a power of two) instead
        # of one more pass over the (B, D_inner, L) activations
        w_out = self.out_proj.weight * 0.5 if self.divide_out else self.out_proj.weight
        out = y_rows @ w_out.t()  # (B*L, d_model)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias.to(out.dtype)
        return out.view(batch, length, -1)  # (B, L, d_model)

    # -- inference on the Triton kernels: padded rows, nothing flipped ---------------------------

    def _triton_inference(self, hidden: torch.Tensor) -> bool:
        """Whether this call takes `_padded_inference`: no autograd, outside torch.compile, and
        the Triton kernels for these inputs (CUDA, or backend="triton" under the interpreter)."""
        if not ops.no_autograd(hidden, *self.parameters()) or hidden.dtype == torch.float64:
            return False
        if not self.plain_submodules():  # the padded path reads every weight
            return False
        if self.backend is None:
            return hidden.is_cuda and ops.triton_available()
        return ops.resolve_backend(self.backend, hidden) == "triton"

    def _padded_inference(self, hidden: torch.Tensor, length: int) -> torch.Tensor:
        """hidden (B, Lp, d_model), Lp a multiple of 16, the steps from `length` on padding ->
        (B, Lp, d_model): the fused op `ops.bimamba_inference` (ops/vision.py), in autocast's
        dtype where autocast is on."""
        weights = padded_weights(self, compute_dtype(hidden))
        return ops.bimamba_inference(hidden, weights, length, backend="triton")

    # -- the reference: two explicit single-direction scans ------------------------------------

    def _reference(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: (B, D_inner, L) -> y_f + flip(y_b), (B, D_inner, L), each y gated by its own z."""
        y_f = self._one_direction(x, z, **self.direction_params(False))  # (B, D_inner, L)
        y_b = self._one_direction(x.flip(-1), z.flip(-1), **self.direction_params(True))  # reversed time
        return y_f + y_b.flip(-1)

    def _one_direction(self, x, z, conv1d, x_proj, dt_proj, A_log, D) -> torch.Tensor:
        """What Mamba._run does between in_proj and out_proj, for one direction; a wrapped
        conv1d, x_proj or dt_proj is called."""
        x = causal_conv(conv1d, x, self.d_conv)  # (B, D_inner, L)
        x_dbl = _channels(x_proj, x)  # (B, R + 2N, L)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        A = -torch.exp(at_least_fp32(A_log))  # (D_inner, N)
        if is_plain(dt_proj, nn.Linear):  # the bias added in fp32 by the scan
            delta, delta_bias = ops.batched_linear(dt_proj.weight, dt), at_least_fp32(dt_proj.bias)  # (B, D_inner, L)
        else:
            delta, delta_bias = linear_on_channels(dt_proj, dt, contiguous_time=True), None
        return ops.selective_scan(x, delta, A, B, C, D=at_least_fp32(D), z=z, delta_bias=delta_bias,
                                  delta_softplus=True)

    # -- the fused path: both directions in one conv call and one scan call -------------------

    def _in_cols(self, rows: slice, tokens: torch.Tensor) -> torch.Tensor:
        """in_proj's output channels `rows` for the tokens (d_model, B*L), as columns (C, B*L)."""
        if not is_plain(self.in_proj, nn.Linear):  # called on the token rows (B*L, d_model)
            return self.in_proj(tokens.t())[:, rows].t().contiguous()
        out = self.in_proj.weight[rows] @ tokens
        if self.in_proj.bias is not None:
            out = out + self.in_proj.bias[rows, None].to(out.dtype)
        return out

    def _stack(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, D_inner, L) -> both directions stacked along channels, (B, 2*D_inner, Lp)."""
        # Zero steps appended after each direction's sequence change none of its L outputs (the
        # conv and the scan are causal). A length that is a multiple of 16 lets the Triton scan
        # keep each chunk's time steps in one thread with 16-byte loads; at L = 4097 (Vim's class
        # token) its loop compiles to 140 instead of 19 load instructions (sm_90 SASS).
        multiple = self.pad_to or (16 if x.is_cuda else 1)
        padded = -(-x.shape[-1] // multiple) * multiple
        return _glue(stack_directions, x.is_cuda)(x, padded)  # (B, 2*D_inner, Lp)

    def _conv_proj(self, x2: torch.Tensor):
        """The stacked directions x2 (B, 2*D_inner, Lp) through their convs and x_projs -> the conv
        outputs (B, 2*D_inner, Lp), dt (B, 2, R, Lp), B and C (B, 2, N, Lp), and the stacked
        (w_dt (2, D_inner, R), A (2*D_inner, N), D, dt_bias (2*D_inner,))."""
        batch, di, padded = x2.shape[0], x2.shape[1] // 2, x2.shape[2]
        f, b = self.direction_params(False), self.direction_params(True)
        conv_w = torch.cat([f["conv1d"].weight[:, 0], b["conv1d"].weight[:, 0]])  # (2*D_inner, K)
        conv_b = None if f["conv1d"].bias is None else torch.cat([f["conv1d"].bias, b["conv1d"].bias])
        x2 = ops.causal_conv1d(x2, conv_w, conv_b, "silu")  # (B, 2*D_inner, Lp)
        w_x = torch.stack([f["x_proj"].weight, b["x_proj"].weight]).to(x2.dtype)  # (2, R + 2N, D_inner)
        x_dbl = torch.matmul(w_x, x2.reshape(batch, 2, di, padded))  # (B, 2, R + 2N, Lp)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)  # (B, 2, R|N|N, Lp)
        w_dt = torch.stack([f["dt_proj"].weight, b["dt_proj"].weight]).to(dt.dtype)  # (2, D_inner, R)
        A = -torch.exp(at_least_fp32(torch.cat([f["A_log"], b["A_log"]])))  # (2*D_inner, N)
        D = at_least_fp32(torch.cat([f["D"], b["D"]]))  # (2*D_inner,)
        dt_bias = at_least_fp32(torch.cat([f["dt_proj"].bias, b["dt_proj"].bias]))  # (2*D_inner,)
        return x2, dt, B, C, (w_dt, A, D, dt_bias)

    def _fused(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: (B, D_inner, L) -> (y_f + flip(y_b)) * SiLU(z) as columns, (D_inner, B*L)."""
        batch, di, length = x.shape
        x2, dt, B, C, (w_dt, A, D, dt_bias) = self._conv_proj(self._stack(x))
        delta = torch.matmul(w_dt, dt).view(batch, 2 * di, -1)  # (B, 2*D_inner, Lp)
        # grouped B/C (B, G=2, N, L): channel d reads group d // D_inner, i.e. its own direction's
        y2 = ops.selective_scan(x2, delta, A, B.contiguous(), C.contiguous(), D=D, z=None,
                                delta_bias=dt_bias, delta_softplus=True)  # (B, 2*D_inner, Lp)
        return _glue(merge_directions, x.is_cuda)(y2, z, length)  # (D_inner, B*L)

    def _fused_inference(self, tokens: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """The fused path without autograd, holding less at once: the tokens (d_model, B*L) ->
        (y_f + flip(y_b)) * SiLU(z) as columns (D_inner, B*L), the same values as `_fused`.
        - x's half of in_proj first, and z's only once the directions are merged;
        - one scan for both directions, by blocks of the batch when Δ is large, each block's Δ
          formed just before its scan, and its output written over its own input (out=);
        - the merge by quarters of the channels, so that flipping y_b copies a quarter at a time.
        Counted on CPU with the kernels' allocations only (benchmarks/vision_memory.py, 512 px,
        batch 8, one block), Vim-Ti's forward peaks at half the live bytes of the training
        path's: 1.16x DeiT-Ti's, against 2.3x; measured on the H200 (batch 64), 1.02-1.04x."""
        di = self.d_inner
        x = self._in_cols(slice(0, di), tokens).view(di, batch, length).transpose(0, 1)  # (B, D_inner, L)
        x2 = self._stack(x)
        del x  # before the conv: its input and output are the layer's peak
        x2, dt, B, C, (w_dt, A, D, dt_bias) = self._conv_proj(x2)
        # both directions in one grouped scan (B/C (b, 2, N, Lp): channel d reads its direction's),
        # over the batch in two blocks when Δ is large: each block's Δ is formed just before its
        # scan, whose output goes over its input
        padded = x2.shape[-1]
        blocks = 2 if batch >= 2 and batch * 2 * di * padded * x2.element_size() > self.scan_block_bytes else 1
        step = -(-batch // blocks)
        for b0 in range(0, batch, step):
            rows = slice(b0, b0 + step)
            delta = torch.matmul(w_dt, dt[rows]).view(-1, 2 * di, padded)  # (b, 2*D_inner, Lp)
            ops.selective_scan(x2[rows], delta, A, B[rows].contiguous(), C[rows].contiguous(), D=D,
                               delta_bias=dt_bias, delta_softplus=True, out=x2[rows])
            del delta
        y = x2.new_empty(di, batch, length)  # y_f + flip(y_b) as (D_inner, B, L)
        size = di // 4 if di % 4 == 0 else di  # flip's copy: a quarter of y_b at a time
        for c0 in range(0, di, size):
            c1 = c0 + size
            torch.add(x2[:, c0:c1, :length].transpose(0, 1),
                      x2[:, di + c0:di + c1, :length].flip(-1).transpose(0, 1), out=y[c0:c1])
        del x2
        gate = F.silu(self._in_cols(slice(di, 2 * di), tokens), inplace=True)  # (D_inner, B*L)
        return y.view(di, -1).mul_(gate)


def _channels(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear over the channels of x (B, C, L) -> (B, O, L), L contiguous: on its weight
    (ops.batched_linear) where it is plain and has no bias (x_proj), else called."""
    if is_plain(linear, nn.Linear) and linear.bias is None:
        return ops.batched_linear(linear.weight, x)
    return linear_on_channels(linear, x, contiguous_time=True)


def stack_directions(x: torch.Tensor, padded: int) -> torch.Tensor:
    """x (B, D, L) -> (B, 2D, Lp): the forward direction's channels, then the backward one's
    (x reversed in time), each zero-padded at its end to Lp = padded steps."""
    batch, di, length = x.shape
    x2 = x.new_empty(batch, 2 * di, padded)
    if padded > length:
        x2[..., length:] = 0
    x2[:, :di, :length] = x
    x2[:, di:, :length] = x.flip(-1)
    return x2


def merge_directions(y2: torch.Tensor, z: torch.Tensor, length: int) -> torch.Tensor:
    """The stacked scan output y2 (B, 2D, Lp) and the gate z (B, D, L) -> (y_f + flip(y_b)) *
    SiLU(z), laid out as columns (D, B*L) so that out_proj is one GEMM over the tokens."""
    y_f, y_b = y2[..., :length].split(z.shape[1], dim=1)  # (B, D, L) each; y_b in reversed time
    y = (y_f + y_b.flip(-1)) * F.silu(z)
    return y.transpose(0, 1).reshape(z.shape[1], -1)


_COMPILED: dict = {}


def _glue(fn, cuda: bool):
    """`fn` itself, or with the knob compile_glue (MAMBAKIT_COMPILE_GLUE=1) on CUDA its
    torch.compile'd version (one generated kernel instead of separate flip, pad, add and gate
    passes). Measured on the H200 (Vim-Ti, batch 64, 1024 px): the same time as eager (141.0 against 140.4 ms a batch) with
    10 % less peak memory (3.30 against 3.68 GiB), for seconds of compilation in the first call;
    so it is off by default. Never on CPU (inductor needs a C++ compiler there) nor inside an
    outer torch.compile (which traces `fn` itself)."""
    if not cuda or torch.compiler.is_compiling() or not ops.knobs.current().compile_glue:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=True)
    return _COMPILED[fn]


def padded_weights(mixer: BiMamba, dtype: torch.dtype) -> ops.BiMambaWeights:
    """The mixer's weights for `ops.bimamba_inference` in `dtype`, kept on the mixer and made
    again when any parameter changes (its storage or its in-place version: an optimizer step,
    load_state_dict, .to())."""
    params = tuple(mixer.parameters())
    # parameters made under inference_mode keep no version counter: made again every call
    keep = not any(p.is_inference() for p in params)
    key = (dtype,) + tuple((p.data_ptr(), p._version) for p in params) if keep else None
    cached = mixer.__dict__.get("_padded_weights")
    if keep and cached is not None and cached.key == key:
        return cached
    cast = lambda t: None if t is None else t.detach().to(dtype).contiguous()  # noqa: E731
    fp32 = lambda t: t.detach().float().contiguous()  # noqa: E731
    with torch.no_grad():
        w_in, b_in = mixer.in_proj.weight, mixer.in_proj.bias
        f, b = mixer.direction_params(False), mixer.direction_params(True)
        conv_b = None if f["conv1d"].bias is None else fp32(torch.cat([f["conv1d"].bias, b["conv1d"].bias]))
        weights = ops.BiMambaWeights(
            key=key, in_proj=cast(w_in), in_proj_bias=cast(b_in),
            conv=fp32(torch.cat([f["conv1d"].weight[:, 0], b["conv1d"].weight[:, 0]])), conv_bias=conv_b,
            x_proj=(cast(f["x_proj"].weight), cast(b["x_proj"].weight)),
            dt_proj=(cast(f["dt_proj"].weight), cast(b["dt_proj"].weight)),
            A=(fp32(-torch.exp(f["A_log"].float())), fp32(-torch.exp(b["A_log"].float()))),
            D=(fp32(f["D"]), fp32(b["D"])), dt_bias=(fp32(f["dt_proj"].bias), fp32(b["dt_proj"].bias)),
            out=cast(mixer.out_proj.weight), out_bias=cast(mixer.out_proj.bias),
            out_scale=0.5 if mixer.divide_out else 1.0)
    mixer.__dict__["_padded_weights"] = weights if keep else None
    return weights


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """autocast's dtype where autocast is on for hidden's device, else hidden's own."""
    kind = hidden.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype

