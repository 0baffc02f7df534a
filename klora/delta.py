"""The effective weight delta of a :class:`~klora.formats.LoraLayer`, and low-rank factors where cheap.

Everything is computed in float32 on the CPU tensors of the layer (files may hold fp16/bf16: products in
half precision lose the small entries that decide close Top-K comparisons). The delta is what a host adds
to the weight: ``strength × scale × product`` with ``scale = alpha / rank`` (1 without alpha or rank).

Formulas (W has shape ``layer.shape``; convs flatten to ``(out, in·kh·kw)`` and back):

* lora: ``up @ down``; Tucker/CP (``mid``): ``ΔW[o,i,k,l] = Σ_ab up[o,a] · mid[a,b,k,l] · down[b,i]``;
* loha: ``(w1a @ w1b) ⊙ (w2a @ w2b)``; Tucker: each factor is ``Σ_ij t[i,j,k,l] · wa[i,o] · wb[j,c]``
  (``wa`` (r, out), ``wb`` (r, in)) before the Hadamard product;
* lokr: ``kron(w1, w2)`` with ``w1 = w1a @ w1b`` and ``w2 = w2a @ w2b`` (or the Tucker rebuild with ``t2``)
  where the file stores factors;
* full: ``diff`` (no scale; ``diff_b`` is the bias delta, see :func:`bias_delta`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import LoraLayer


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=torch.float32)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild: t (r1, r2, k…), wa (r1, out), wb (r2, in) → (out, in, k…)."""
    return torch.einsum("ij...,ip,jq->pq...", _f32(t), _f32(wa), _f32(wb))


def _lora_product(layer: LoraLayer) -> torch.Tensor:
    down, up, mid = _f32(layer.tensors["down"]), _f32(layer.tensors["up"]), layer.tensors.get("mid")
    r = down.shape[0]
    up2 = up.reshape(up.shape[0], r)
    if mid is not None:
        return torch.einsum("oa,ab...,bi->oi...", up2, _f32(mid), down.reshape(r, -1))
    return up2 @ down.reshape(r, -1)


def _loha_product(layer: LoraLayer) -> torch.Tensor:
    t = layer.tensors
    if "t1" in t:
        p1 = _tucker(t["t1"], t["w1a"], t["w1b"])
        p2 = _tucker(t["t2"], t["w2a"], t["w2b"])
        return p1 * p2
    w1b, w2b = _f32(t["w1b"]), _f32(t["w2b"])
    p1 = _f32(t["w1a"]) @ w1b.reshape(w1b.shape[0], -1)
    p2 = _f32(t["w2a"]) @ w2b.reshape(w2b.shape[0], -1)
    return p1 * p2


def _lokr_product(layer: LoraLayer) -> torch.Tensor:
    t = layer.tensors
    w1 = _f32(t["w1"]) if "w1" in t else _f32(t["w1a"]) @ _f32(t["w1b"])
    if "w2" in t:
        w2 = _f32(t["w2"])
    elif "t2" in t:
        w2 = _tucker(t["t2"], t["w2a"], t["w2b"])
    else:
        w2b = _f32(t["w2b"])
        w2 = _f32(t["w2a"]) @ w2b.reshape(w2b.shape[0], -1)
    # kron of (a, c) with (b, d·kh·kw) orders columns as (c, d, kh, kw): the conv weight's layout.
    return torch.kron(w1, w2.reshape(w2.shape[0], -1))


def dense_delta(layer: LoraLayer, strength: float = 1.0) -> torch.Tensor:
    """The float32 ΔW (shape ``layer.shape``) a host adds to the weight: strength × scale × product."""
    if layer.kind == "lora":
        prod = _lora_product(layer)
    elif layer.kind == "loha":
        prod = _loha_product(layer)
    elif layer.kind == "lokr":
        prod = _lokr_product(layer)
    elif layer.kind == "full":
        prod = _f32(layer.tensors["diff"])
    else:  # pragma: no cover - LayerKind is closed
        raise ValueError(f"unknown layer kind {layer.kind!r}")
    # Always a new tensor (never a view of the layer's own tensors); × 1.0 is exact.
    return prod.reshape(layer.shape) * (float(strength) * layer.scale)


def bias_delta(layer: LoraLayer, strength: float = 1.0) -> torch.Tensor | None:
    """The float32 bias delta (full layers with ``diff_b``), else None."""
    b = layer.tensors.get("diff_b") if layer.kind == "full" else None
    if b is None:
        return None
    return _f32(b) * (float(strength) * layer.scale)


@dataclass(frozen=True)
class LowRank:
    """ΔW = up · [mid ·] down with strength × scale folded into ``up`` (float32).

    Linear: ``down`` (r, in), ``up`` (out, r). Conv: ``down`` (r, in, kh, kw), ``up`` (out, r, 1, 1).
    Tucker conv: ``down`` (r, in, 1, 1), ``mid`` (r, r, kh, kw), ``up`` (out, r, 1, 1) — applied as three
    convolutions (down 1×1, mid with the layer's stride/padding, up 1×1).
    """

    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None


def low_rank(layer: LoraLayer, strength: float = 1.0) -> LowRank | None:
    """Factors of a ``lora`` layer (see :class:`LowRank`); None for kinds without a cheap factorisation."""
    if layer.kind != "lora":
        return None
    t = layer.tensors
    up = _f32(t["up"]) * (float(strength) * layer.scale)
    mid = t.get("mid")
    return LowRank(down=_f32(t["down"]).contiguous(), up=up.contiguous(),
                   mid=None if mid is None else _f32(mid).contiguous())


__all__ = ["LowRank", "bias_delta", "dense_delta", "low_rank"]
