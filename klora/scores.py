"""Top-K scores of a LoRA pair: for each layer both patch, K, Σ Top-K |ΔW| and Σ |ΔW| of each side.

* ``ΔW = strength · scale · U``, ``U`` the kind's unscaled product (:mod:`klora.delta`);
* ``K = r_c · r_s`` clamped to the number of entries (:func:`layer_rank` for kinds without a rank);
* ``S = Σ Top-K |ΔW|`` and ``L1 = Σ |ΔW|`` for each side.

Only ``|U|``'s statistics depend on the file, so they are computed once per file and layer and reused by
every pairing and strength: the L1 and the K largest values of ``|U|`` (sorted). Rounding is monotone, so
``fl32(|U|·c)`` over the Top-K of ``|U|`` is the Top-K of ``|U·c|``: the scores equal, bit for bit, those of
the dense ``ΔW`` the hosts add (``klora.delta.dense_delta``), at any strength, for every kind. Caches: per
file (an LRU keyed by the file's sha256) and per pair (keyed by both files' sha256, the strengths and the
scope); :func:`set_cache_size` and :func:`clear_cache` control both.

Speed: the product is formed once per file and layer in float32 (a matmul), then three passes over it (abs,
row sums for L1, chunk maxima) and ``topk`` over a few thousand candidates give the exact Top-K values
(:func:`top_abs_values`); no full ``topk`` over millions of entries, and no dense ΔW is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from klora import kinds
from klora.cache import LRU
from klora.keys import is_attention, is_text_encoder
from klora.layers import LoraFile, LoraLayer

__all__ = [
    "LayerScore",
    "PairScores",
    "cache_info",
    "clear_cache",
    "layer_rank",
    "pair_scores",
    "set_cache_size",
    "top_abs_values",
]

# ------------------------------------------------------------------------------------------- Top-K values

#: Below this many entries a plain ``torch.topk`` is cheapest.
_DIRECT_TOPK = 16384
#: Rows folded into one chunk per level of :func:`_top`.
_FOLD = 16


def _fold_max(a: torch.Tensor, h: int) -> torch.Tensor:
    """Column-wise maxima of consecutive ``h``-row groups: (R, C) → (ceil(R/h), C); the last group may
    be shorter."""
    rows, cols = a.shape
    full = rows // h
    out = a[: full * h].view(full, h, cols).amax(1)
    if full * h == rows:
        return out
    return torch.cat([out, a[full * h:].amax(0, keepdim=True)])


def _top(a: torch.Tensor, k: int, want_index: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``k`` largest values of a 2-D tensor ``a`` (descending) and, if asked, their flat indices.

    Exact selection in three steps (recursively):

    1. chunk maxima: every ``_FOLD`` consecutive rows of one column form a chunk; ``m`` = its maximum;
    2. the ``k`` chunks with the largest maxima (found by the same procedure on the table of maxima);
    3. ``topk`` over the entries of those ``k`` chunks only (``k × _FOLD`` values).

    Why step 3 sees every value of the true Top-K: let ``t`` be the ``k``-th largest chunk maximum. The
    ``k`` chosen chunks each hold an entry ≥ ``t``, so at least ``k`` entries are ≥ ``t`` and the
    ``k``-th largest entry of ``a`` is ≥ ``t``. An entry above ``t`` lies in a chunk whose maximum is above
    ``t``; all such chunks are among the chosen (``topk`` keeps every value above its ``k``-th). Entries
    equal to ``t`` are interchangeable. So the chosen chunks contain the whole Top-K multiset, and the
    result equals ``torch.topk(a.flatten(), k).values`` element for element.
    """
    rows, cols = a.shape
    n = rows * cols
    h = _FOLD
    if n <= _DIRECT_TOPK or rows < 2 * h or -(-rows // h) * cols < k:
        v, i = torch.topk(a.reshape(-1), k)
        return v, (i if want_index else None)
    maxima = _fold_max(a, h)
    _, chunk = _top(maxima, k, True)
    assert chunk is not None
    # flat indices of the entries of each chosen chunk: rows group·h … group·h + h - 1 of one column
    first = (chunk // cols) * (h * cols) + chunk % cols
    flat = first.unsqueeze(1) + torch.arange(0, h * cols, cols, device=a.device)  # (k, h)
    if rows % h:
        outside = flat >= n  # the short last group
        vals = a.reshape(-1)[flat.clamp_max(n - 1)].masked_fill_(outside, -1.0)  # never in a Top-K of |ΔW|
    else:
        vals = a.reshape(-1)[flat]
    v, j = torch.topk(vals.reshape(-1), k)
    return v, (flat.reshape(-1)[j] if want_index else None)


def top_abs_values(abs_delta: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest entries of a non-negative tensor (|ΔW|), float32, descending.

    Equal, element for element, to ``torch.topk(abs_delta.flatten(), min(k, numel)).values``; the work is
    one pass over the entries (the chunk maxima) plus ``topk`` over a few thousand values.
    """
    a = abs_delta.reshape(abs_delta.shape[0], -1) if abs_delta.dim() > 1 else abs_delta.reshape(1, -1)
    k = min(int(k), a.numel())
    if k <= 0:
        return a.new_empty(0)
    if k == a.numel():
        return a.reshape(-1).sort(descending=True).values
    if a.shape[0] < 2 * _FOLD < a.shape[1]:  # short and wide: fold the long side instead
        a = a.t().contiguous()
    return _top(a, k, False)[0]


# ----------------------------------------------------------------------------------------- layer scores


def layer_rank(layer: LoraLayer) -> int:
    """The rank K uses. A kind without a rank (``full``; LoKr with full factors) counts as full-rank:
    ``min(out, in·kh·kw)``, the rank a dense matrix of that shape has in general."""
    if layer.rank:
        return int(layer.rank)
    out = layer.shape[0]
    inner = math.prod(layer.shape[1:]) if len(layer.shape) > 1 else 1
    return int(min(out, inner))


@dataclass(frozen=True)
class _Stats:
    """Per file and layer, independent of strength: Σ|U| and the largest |U| entries (descending)."""

    l1: float
    top: torch.Tensor
    numel: int


def _unit_abs(layer: LoraLayer) -> torch.Tensor:
    """|U| as a 2-D float32 tensor of our own (U as :func:`klora.delta.dense_delta` forms it before it
    multiplies by strength × scale)."""
    u = kinds.of(layer).product(layer)
    return u.reshape(u.shape[0], -1).abs_()


def _l1(a: torch.Tensor) -> float:
    """Σ a for a non-negative 2-D float32 tensor: each row summed in float32 (torch's cascade summation,
    relative error ≲ 1e-7 even for rows of thousands of entries), the row sums in float64. Converting every
    entry to float64 costs four to five times as much and only moves γ in the 8th digit."""
    return float(a.sum(1).sum(dtype=torch.float64))


_DEFAULT_PAIRS = 8
_pair_cache: LRU[PairScores] = LRU(_DEFAULT_PAIRS)
_file_cache: LRU[dict[tuple, _Stats]] = LRU(2 * _DEFAULT_PAIRS)


def set_cache_size(pairs: int) -> None:
    """Keep the scores of up to ``pairs`` LoRA pairs (and per-file statistics of twice as many files);
    0 disables caching."""
    pairs = max(int(pairs), 0)
    _pair_cache.resize(pairs)
    _file_cache.resize(2 * pairs)


def clear_cache() -> None:
    """Forget every cached score."""
    _pair_cache.clear()
    _file_cache.clear()


def cache_info() -> dict[str, int]:
    """Sizes, entries, hits and misses of both caches (for diagnostics and tests)."""
    return {
        "pairs": len(_pair_cache), "pair_size": _pair_cache.size, "pair_hits": _pair_cache.hits,
        "pair_misses": _pair_cache.misses, "files": len(_file_cache), "file_size": _file_cache.size,
        "file_hits": _file_cache.hits, "file_misses": _file_cache.misses,
    }


def _file_stats(file: LoraFile) -> dict[tuple, _Stats]:
    """The per-layer statistics table of a file (shared by all its pairings), or a throwaway one."""
    if not file.sha256:
        return {}
    return _file_cache.setdefault(file.sha256, dict)


def _layer_stats(table: dict[tuple, _Stats], layer: LoraLayer, k: int) -> _Stats:
    """Statistics of ``layer`` with at least ``k`` Top values (computed again if the table has fewer)."""
    key = (layer.key, layer.kind, tuple(layer.shape), layer.rank)
    stats = table.get(key)
    if stats is None or (stats.top.numel() < k and stats.top.numel() < stats.numel):
        a = _unit_abs(layer)
        stats = _Stats(l1=_l1(a), top=top_abs_values(a, k), numel=a.numel())
        table[key] = stats
    return stats


@dataclass(frozen=True)
class LayerScore:
    """Scores of one shared layer for the effective deltas: K, Σ Top-K |ΔW| and Σ |ΔW| of each side."""

    k: int
    score_content: float
    score_style: float
    l1_content: float
    l1_style: float


@dataclass(frozen=True)
class PairScores:
    """Scores of every scored layer of a pair (shared, denoiser, in scope), in plan order."""

    layers: dict[str, LayerScore]


def _side(table: dict[tuple, _Stats], layer: LoraLayer, strength: float, k: int) -> tuple[float, float]:
    stats = _layer_stats(table, layer, k)
    c = abs(float(strength) * layer.scale)
    top = stats.top[:k]
    score = float((top if c == 1.0 else top * c).sum(dtype=torch.float64))
    return score, stats.l1 * c


def scored_keys(content: LoraFile, style: LoraFile, scope: Literal["all", "attention"]) -> list[str]:
    """The layers K-LoRA decides per step: both files have them, not a text encoder, in ``scope``."""
    return [key for key in content.layers
            if key in style.layers and not is_text_encoder(key) and (scope == "all" or is_attention(key))]


def pair_scores(content: LoraFile, style: LoraFile, content_strength: float = 1.0,
                style_strength: float = 1.0, scope: Literal["all", "attention"] = "all",
                k: int | None = None) -> PairScores:
    """Scores of the layers K-LoRA decides (:func:`scored_keys`); cached. ``k``: the number of entries summed
    (None: r_c·r_s per layer, the paper's K), clamped to each layer's size. A layer whose two deltas do not
    fit each other (:func:`klora.layers.layout`) raises ``ValueError``: the files are for different models."""
    cache_key = (content.sha256, style.sha256, float(content_strength), float(style_strength), scope, k)
    cacheable = bool(content.sha256 and style.sha256)
    if cacheable and (hit := _pair_cache.get(cache_key)) is not None:
        return hit
    table_c, table_s = _file_stats(content), _file_stats(style)
    out: dict[str, LayerScore] = {}
    for key in scored_keys(content, style, scope):
        lc, ls = content.layers[key], style.layers[key]
        if lc.layout != ls.layout:
            raise ValueError(f"{key}: the content LoRA's delta has shape {tuple(lc.shape)} but the style "
                             f"LoRA's has {tuple(ls.shape)}; are they for the same base model?")
        n = min(layer_rank(lc) * layer_rank(ls) if k is None else k, math.prod(lc.shape))
        sc, l1c = _side(table_c, lc, content_strength, n)
        ss, l1s = _side(table_s, ls, style_strength, n)
        out[key] = LayerScore(n, sc, ss, l1c, l1s)
    scores = PairScores(out)
    if cacheable:
        _pair_cache.put(cache_key, scores)
    return scores
