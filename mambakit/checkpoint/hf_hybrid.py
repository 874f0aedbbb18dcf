"""transformers' hybrid checkpoints, JambaForCausalLM (Mamba-1 + attention + mixture of experts)
and BambaForCausalLM (Mamba-2 + attention), as MambaLM state dicts (the official names) and back.

The layouts differ beyond names: transformers keeps q, k and v in three projections where the
official MHA has one in_proj (q, then k, then v), and the MLP's gate and up projections apart
where the official GatedMLP has one fc1 (y = up first, the gate second). Jamba's experts come in
either layout transformers has used: one GatedMLP per expert (`experts.{e}.gate_proj`, ...: what
its save_pretrained writes) or stacked (`experts.gate_up_proj` (E, 2I, d), gate first, and
`experts.down_proj` (E, d, I)). Writing uses the per-expert one.

A key that does not convert (a part of a projection whose other parts are missing, a name
neither model has) is kept as it is, so that the strict loader reports it."""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_TOP = {"model.embed_tokens.weight": "backbone.embedding.weight", "model.final_layernorm.weight":
        "backbone.norm_f.weight", "lm_head.weight": "lm_head.weight"}
# one key to one key, inside a layer: transformers' name -> MambaLM's
_RENAMES = [
    (r"input_layernorm\.weight", "norm.weight"),
    (r"pre_ff_layernorm\.weight", "norm2.weight"),
    (r"mamba\.dt_layernorm\.weight", "mixer.x_proj.dt_norm.weight"),
    (r"mamba\.b_layernorm\.weight", "mixer.x_proj.b_norm.weight"),
    (r"mamba\.c_layernorm\.weight", "mixer.x_proj.c_norm.weight"),
    (r"mamba\.(.+)", r"mixer.\1"),
    (r"self_attn\.o_proj\.(weight|bias)", r"mixer.out_proj.\1"),
    (r"feed_forward\.down_proj\.(weight|bias)", r"mlp.fc2.\1"),
    (r"feed_forward\.router\.weight", "mlp.router.weight"),
    (r"feed_forward\.experts\.(\d+)\.down_proj\.weight", r"mlp.experts.\1.fc2.weight"),
]


def from_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Jamba or Bamba state dict (transformers' names) -> MambaLM's."""
    out: dict[str, torch.Tensor] = {}
    parts: dict[int, dict[str, torch.Tensor]] = {}  # per layer, what must be fused
    for key, value in state.items():
        match = _LAYER.fullmatch(key)
        if key in _TOP:
            out[_TOP[key]] = value
        elif match is None:
            out[key] = value
        else:
            layer, rest = int(match.group(1)), match.group(2)
            renamed = _renamed(rest)
            if renamed is None:
                parts.setdefault(layer, {})[rest] = value
            else:
                out[f"backbone.layers.{layer}.{renamed}"] = value
    for layer, held in parts.items():
        out.update(_fused(layer, held))
    return out


def _renamed(rest: str) -> str | None:
    for pattern, replacement in _RENAMES:
        if re.fullmatch(pattern, rest):
            return re.sub(pattern, replacement, rest)
    return None


def _fused(layer: int, held: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer `layer`'s projections that transformers keeps apart, fused as MambaLM holds them;
    what cannot be fused, under its own name."""
    prefix, out = f"backbone.layers.{layer}.", {}
    for kind in ("weight", "bias"):
        names = [f"self_attn.{p}_proj.{kind}" for p in "qkv"]
        if all(n in held for n in names):
            out[prefix + f"mixer.in_proj.{kind}"] = torch.cat([held.pop(n) for n in names])  # q, k, v
    for head in ["feed_forward."] + sorted({m.group(1) for m in map(
            re.compile(r"(feed_forward\.experts\.\d+\.)gate_proj\.weight").fullmatch, held) if m}):
        up, gate = head + "up_proj.weight", head + "gate_proj.weight"
        if up in held and gate in held:
            target = "mlp." + head[len("feed_forward."):]
            out[prefix + target + "fc1.weight"] = torch.cat([held.pop(up), held.pop(gate)])  # y, then the gate
    stacked_up, stacked_down = "feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"
    if stacked_up in held and stacked_down in held:
        gate_up, down = held.pop(stacked_up), held.pop(stacked_down)  # (E, 2I, d) gate first; (E, d, I)
        half = gate_up.shape[1] // 2
        for e in range(gate_up.shape[0]):
            out[prefix + f"mlp.experts.{e}.fc1.weight"] = torch.cat([gate_up[e, half:], gate_up[e, :half]])
            out[prefix + f"mlp.experts.{e}.fc2.weight"] = down[e]
    out.update({f"model.layers.{layer}.{rest}": value for rest, value in held.items()})  # left over
    return out


def to_transformers(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A MambaLM state dict (a hybrid whose config to_hf accepts) -> Jamba's or Bamba's names
    and layout; experts one GatedMLP each."""
    top = {ours: theirs for theirs, ours in _TOP.items()}
    attention = config.attention
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        match = re.fullmatch(r"backbone\.layers\.(\d+)\.(.+)", key)
        layer, rest = int(match.group(1)), match.group(2)
        prefix = f"model.layers.{layer}."
        if layer in config.attn_layer_idx and rest.startswith("mixer.in_proj."):
            kind = rest.rsplit(".", 1)[1]
            sizes = [attention.num_heads * attention.head_dim] + [attention.num_heads_kv * attention.head_dim] * 2
            for name, part in zip("qkv", value.split(sizes)):
                out[prefix + f"self_attn.{name}_proj.{kind}"] = part
        elif layer in config.attn_layer_idx and rest.startswith("mixer.out_proj."):
            out[prefix + "self_attn.o_proj." + rest.rsplit(".", 1)[1]] = value
        elif re.fullmatch(r"mlp\.(experts\.\d+\.)?fc1\.weight", rest):
            up, gate = value.chunk(2)
            head = "feed_forward." + rest[len("mlp."):-len("fc1.weight")]
            out[prefix + head + "up_proj.weight"], out[prefix + head + "gate_proj.weight"] = up, gate
        else:
            out[prefix + _transformers_name(rest)] = value
    return out


def _transformers_name(rest: str) -> str:
    """The inverse of _RENAMES for one key inside a layer."""
    for pattern, replacement in (
            (r"norm\.weight", "input_layernorm.weight"), (r"norm2\.weight", "pre_ff_layernorm.weight"),
            (r"mixer\.x_proj\.(dt|b|c)_norm\.weight", r"mamba.\1_layernorm.weight"),
            (r"mixer\.(.+)", r"mamba.\1"), (r"mlp\.fc2\.(weight|bias)", r"feed_forward.down_proj.\1"),
            (r"mlp\.router\.weight", "feed_forward.router.weight"),
            (r"mlp\.experts\.(\d+)\.fc2\.weight", r"feed_forward.experts.\1.down_proj.weight")):
        if re.fullmatch(pattern, rest):
            return re.sub(pattern, replacement, rest)
    return rest
