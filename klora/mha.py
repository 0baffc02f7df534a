"""Deltas on an ``nn.MultiheadAttention`` (OpenCLIP's text encoder: SDXL's te2, SD2's te), out of place.

OpenCLIP keeps q, k and v fused in the parameter ``in_proj_weight`` and uses ``out_proj.weight`` without
calling ``out_proj``, so no Linear hook can reach them. :class:`MhaHook`, a forward hook on the attention
module, recomputes its output with ``W + ΔW`` built out of place from the weights as they are at that moment
(a host's own LoRA has already been patched in). Exact, writes no weight, and costs a second attention per
text-encoder layer when a prompt is encoded. The parts are addressed by :class:`klora.apply.Target` with
``part`` = ``q``, ``k``, ``v`` or ``out``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from klora.delta import dense_delta, low_rank
from klora.layers import LoraFile, LoraLayer

if TYPE_CHECKING:
    from klora.apply import StepClock
    from klora.fusion import Plan

PARTS = ("q", "k", "v", "out")


class MhaHook:
    """Forward hook of one ``nn.MultiheadAttention``: its output recomputed with the chosen deltas added to
    ``in_proj_weight`` (q, k, v rows) and ``out_proj.weight``. Returns None (output untouched) when the plan
    chooses nothing for this module at the clock's τ."""

    def __init__(self, module: nn.MultiheadAttention, keys: dict[str, str], plan: Plan,
                 content: LoraFile, style: LoraFile, clock: StepClock) -> None:
        self.keys = keys  # part → canonical key
        self.plan = plan
        self.clock = clock
        self.factors: dict[tuple[str, str], tuple[torch.Tensor, ...]] = {}
        opts = plan.options
        for part, key in keys.items():
            for side, file, strength in (("content", content, opts.content_strength),
                                         ("style", style, opts.style_strength)):
                layer = file.layers.get(key)
                if layer is not None:
                    self.factors[(part, side)] = self._prepare(layer, strength, module.embed_dim)

    @staticmethod
    def _prepare(layer: LoraLayer, strength: float, dim: int) -> tuple[torch.Tensor, ...]:
        lr = low_rank(layer, strength)
        if lr is not None and lr.mid is None:
            return (lr.up.float().reshape(dim, -1), lr.down.float().reshape(-1, dim))
        return (dense_delta(layer, strength).float().reshape(dim, dim),)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for f in self.factors.values() for t in f)

    def _delta(self, part: str, device: torch.device) -> torch.Tensor | None:
        key = self.keys.get(part)
        if key is None:
            return None
        choice = self.plan.choose(key, self.clock.tau)
        sides = {"both": ("content", "style"), "content": ("content",), "style": ("style",)}.get(choice, ())
        total = None
        for side in sides:
            f = self.factors.get((part, side))
            if f is None:
                continue
            d = f[0].to(device) @ f[1].to(device) if len(f) == 2 else f[0].to(device)
            total = d if total is None else total + d
        return total

    def __call__(self, module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> Any:
        w_in, w_out = module.in_proj_weight, module.out_proj.weight
        deltas = {part: self._delta(part, w_in.device) for part in PARTS}
        if all(d is None for d in deltas.values()):
            return None
        dim = module.embed_dim
        d_in = w_in.new_zeros(w_in.shape, dtype=torch.float32)
        for i, part in enumerate(("q", "k", "v")):
            if deltas[part] is not None:
                d_in[i * dim:(i + 1) * dim] = deltas[part]
        new_in = (w_in.float() + d_in).to(w_in.dtype)
        new_out = w_out if deltas["out"] is None else (w_out.float() + deltas["out"]).to(w_out.dtype)
        return forward(module, args, kwargs, new_in, new_out)


def _arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
               attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
               is_causal: bool = False) -> dict[str, Any]:
    """The call's arguments by name, with torch's defaults. Spelled out rather than read from
    ``nn.MultiheadAttention.forward``: a host may have replaced that method with a ``(self, *args, **kwargs)``
    wrapper (A1111's builtin Lora does, extensions-builtin/Lora/lora_patches.py ``LoraPatches``)."""
    return dict(locals())


def forward(m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any],
            in_proj_weight: torch.Tensor, out_proj_weight: torch.Tensor) -> tuple[Any, Any]:
    """``nn.MultiheadAttention.forward`` (the general path) with the given projection weights."""
    a = _arguments(*args, **kwargs)
    query, key, value = a["query"], a["key"], a["value"]
    batched = query.dim() == 3
    if m.batch_first and batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, m.embed_dim, m.num_heads, in_proj_weight, m.in_proj_bias, m.bias_k, m.bias_v,
        m.add_zero_attn, m.dropout, out_proj_weight, m.out_proj.bias, training=m.training,
        key_padding_mask=a["key_padding_mask"], need_weights=a["need_weights"], attn_mask=a["attn_mask"],
        average_attn_weights=a["average_attn_weights"], is_causal=a["is_causal"])
    if m.batch_first and batched:
        out = out.transpose(1, 0)
    return out, weights
