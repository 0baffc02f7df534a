"""What a layer adds to its module's weight: the effective delta ``strength × scale × U``, where ``U`` is
the kind's unscaled product (:meth:`klora.kinds.base.Kind.product`) and ``scale`` = alpha/rank (1 without
alpha or rank).

Everything is float32 on the CPU tensors of the layer (files may hold fp16/bf16: products in half
precision lose the small entries that decide close Top-K comparisons). W has shape ``layer.shape``; convs
flatten to ``(out, in·kh·kw)`` and back.
"""

from __future__ import annotations

import torch

from klora import kinds
from klora.kinds import LowRank
from klora.kinds.full import Full
from klora.layers import LoraLayer


def dense_delta(layer: LoraLayer, strength: float = 1.0) -> torch.Tensor:
    """The float32 ΔW (shape ``layer.shape``) a host adds to the weight: strength × scale × product."""
    # Always a new tensor (never a view of the layer's own tensors); × 1.0 is exact.
    return kinds.of(layer).product(layer).reshape(layer.shape) * (float(strength) * layer.scale)


def bias_delta(layer: LoraLayer, strength: float = 1.0) -> torch.Tensor | None:
    """The float32 bias delta (full layers with ``diff_b``), else None."""
    b = Full.bias(layer) if layer.kind == Full.name else None
    return None if b is None else b * (float(strength) * layer.scale)


def low_rank(layer: LoraLayer, strength: float = 1.0) -> LowRank | None:
    """Factors of a layer whose kind has them (see :class:`~klora.kinds.LowRank`); None for kinds the
    hooks apply as a dense ΔW."""
    return kinds.of(layer).low_rank(layer, strength)


__all__ = ["LowRank", "bias_delta", "dense_delta", "low_rank"]
