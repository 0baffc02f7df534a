"""The K-LoRA rule: Top-K scores, γ, the time scale S(τ), comparison modes → a per-layer plan.

For a layer both LoRAs patch (DESIGN §2):

* ``ΔW_c``, ``ΔW_s``: the effective deltas (strength × alpha/rank × the kind's product, as
  :func:`klora.delta.dense_delta` builds them);
* ``K = r_c · r_s`` clamped to the number of entries (see :func:`layer_rank` for kinds without a rank);
* ``S = Σ Top-K |ΔW|`` and ``L1 = Σ |ΔW|`` for each side;
* ``γ``: ``"auto"`` (the official code: mean of the per-layer ratios ``L1_c / L1_s``, ratios ≥ 3 × that
  mean dropped, mean of the rest), ``"paper"`` (eq. 9: ``Σ_l L1_c / Σ_l L1_s``) or a number;
* ``S(τ) = α·τ + β`` (pattern ``s``: 1.5, 0.5; pattern ``s*``: 1.5, 1.275 and ``S ← S mod α``);
* content iff ``S_c > γ · S(τ) · S_s`` (strict), else style.

Scores need the dense deltas once per pair; everything after (γ, thresholds, modes) is cheap. They are
cached at two levels: per file and layer (the L1 and the sorted Top-K values of the unscaled |ΔW|,
reused by every pairing and strength) and per pair (an LRU keyed by both files' sha256, the strengths and
the scope). :func:`set_cache_size` and :func:`clear_cache` control both.

Speed: the dense product is formed once per file and layer in float32 (a matmul, cheap), then three
passes over it (abs, row sums for L1, chunk maxima) and ``topk`` over a few thousand candidates give the
exact Top-K values (:func:`top_abs_values`); no full ``topk`` over millions of entries. Only the Top
values (K floats) and the L1 are kept, never a dense ΔW. For an SDXL pair (560 attention projections,
ranks 8 and 32) this takes 7–9× less CPU time than dense ΔW + ``torch.topk`` per layer
(``benchmarks/bench_scoring.py``).
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch

from .delta import dense_delta
from .formats import LoraFile, LoraLayer

__all__ = [
    "Choice",
    "FusionOptions",
    "LayerPlan",
    "LayerScore",
    "PairScores",
    "Plan",
    "cache_info",
    "clear_cache",
    "is_attention",
    "is_text_encoder",
    "layer_rank",
    "make_plan",
    "pair_scores",
    "set_cache_size",
    "top_abs_values",
]

Choice = Literal["content", "style", "both", "none"]
Pattern = Literal["s", "s*"]
Mode = Literal["klora", "topk", "fixed", "random", "merge"]
Scope = Literal["all", "attention"]
TePolicy = Literal["both", "content", "style", "none"]

LETTERS: dict[str, str] = {"content": "C", "style": "S", "both": "B", "none": "-"}

#: α, β of each pattern (paper: ``s``; official default, supplementary material: ``s*``).
PATTERN_DEFAULTS: dict[str, tuple[float, float]] = {"s": (1.5, 0.5), "s*": (1.5, 1.275)}

#: Probability of content per layer and step in mode ``random`` (the paper's ablation).
RANDOM_CONTENT_P = 1.0 / 3.0

#: γ "auto" drops per-layer ratios at or above this multiple of their mean (the official code).
GAMMA_OUTLIER_FACTOR = 3.0

_ATTENTION = re.compile(r"(?:^|_)attn\d*_to_(?:q|k|v|out_0)$")


def is_text_encoder(key: str) -> bool:
    """Text-encoder layers: components ``te1``, ``te2`` (and ``te3``, Flux's T5)."""
    return key.partition("/")[0].startswith("te")


def is_attention(key: str) -> bool:
    """The attention projections of scope ``attention``: ``to_q``, ``to_k``, ``to_v``, ``to_out_0`` of an
    attention module (UNet ``attn1``/``attn2``, Flux ``attn``), as the official SDXL and Flux-190 paths."""
    return _ATTENTION.search(key.partition("/")[2]) is not None


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class FusionOptions:
    """Everything that shapes a plan. ``alpha``/``beta`` None: the pattern's defaults."""

    pattern: Pattern = "s"
    alpha: float | None = None
    beta: float | None = None
    gamma: Literal["auto", "paper"] | float = "auto"
    mode: Mode = "klora"
    scope: Scope = "all"
    te: TePolicy = "both"
    content_strength: float = 1.0
    style_strength: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def check(name: str, value: object, allowed: Iterable[str]) -> None:
            if value not in tuple(allowed):
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")

        check("pattern", self.pattern, PATTERN_DEFAULTS)
        check("mode", self.mode, ("klora", "topk", "fixed", "random", "merge"))
        check("scope", self.scope, ("all", "attention"))
        check("te", self.te, ("both", "content", "style", "none"))
        for name in ("alpha", "beta", "content_strength", "style_strength"):
            value = getattr(self, name)
            if value is None and name in ("alpha", "beta"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number; got {value!r}")
        if isinstance(self.gamma, str):
            check("gamma", self.gamma, ("auto", "paper"))
        elif (isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float))
              or not math.isfinite(self.gamma) or self.gamma <= 0):
            raise ValueError(f"gamma must be auto, paper or a finite number > 0; got {self.gamma!r}")
        if self.pattern == "s*" and self.resolved_alpha == 0:
            raise ValueError("pattern s* takes S(tau) modulo alpha, so alpha must not be 0")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer; got {self.seed!r}")

    @property
    def resolved_alpha(self) -> float:
        return float(PATTERN_DEFAULTS[self.pattern][0] if self.alpha is None else self.alpha)

    @property
    def resolved_beta(self) -> float:
        return float(PATTERN_DEFAULTS[self.pattern][1] if self.beta is None else self.beta)


# ------------------------------------------------------------------------------------------- Top-K sums

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
    flat = first.unsqueeze(1) + torch.arange(0, h * cols, cols)  # (k, h)
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
    """Per file and layer, independent of strength: |U| where ΔW = factor · U (see :func:`_unit_abs`)."""

    l1: float  # Σ|U| (see _l1)
    top: torch.Tensor  # the largest |U| entries, float32, descending
    numel: int


def _plain(layer: LoraLayer) -> bool:
    return layer.kind == "lora" and "mid" not in layer.tensors


def _unit_factor(layer: LoraLayer) -> float:
    """``u`` with ``ΔW = U · (strength · u)``, for the ``U`` of :func:`_unit_abs`."""
    return layer.scale if _plain(layer) else 1.0


def _unit_abs(layer: LoraLayer) -> torch.Tensor:
    """|U| as a 2-D float32 tensor of our own (see :func:`_unit_factor`).

    Plain LoRA/LoCon: ``U = up @ down`` exactly as :mod:`klora.delta` forms it; ``dense_delta`` multiplies
    by ``strength·scale`` last, so ``|ΔW| = fl32(|U| · |strength·scale|)`` bit for bit. Other kinds (Tucker
    LoCon, LoHa, LoKr, full): ``U = dense_delta(layer, 1)`` (scale included); ``strength`` then multiplies
    a rounded product, so strengths other than 1 differ from ``dense_delta(layer, strength)`` by one float32
    rounding (the selection is the same: rounding is monotone).
    """
    t = layer.tensors
    if _plain(layer):
        down = t["down"].to(torch.float32)
        r = down.shape[0]
        up = t["up"].to(torch.float32).reshape(t["up"].shape[0], r)
        return (up @ down.reshape(r, -1)).abs_()
    d = dense_delta(layer, 1.0)
    return d.reshape(d.shape[0], -1).abs_()


def _l1(a: torch.Tensor) -> float:
    """Σ a for a non-negative 2-D float32 tensor: each row summed in float32 (torch's cascade summation,
    relative error ≲ 1e-7 even for rows of thousands of entries), the row sums in float64. Converting every
    entry to float64 costs four to five times as much and only moves γ in the 8th digit."""
    return float(a.sum(1).sum(dtype=torch.float64))


class _LRU:
    """A small thread-safe LRU mapping."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[object, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: object) -> object | None:
        with self._lock:
            value = self._d.get(key)
            if value is None:
                self.misses += 1
                return None
            self._d.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: object, value: object) -> None:
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > max(self.size, 0):
                self._d.popitem(last=False)

    def resize(self, size: int) -> None:
        with self._lock:
            self.size = size
            while len(self._d) > max(size, 0):
                self._d.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._d)


_DEFAULT_PAIRS = 8
_pair_cache = _LRU(_DEFAULT_PAIRS)
_file_cache = _LRU(2 * _DEFAULT_PAIRS)


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
    if not file.sha256 or _file_cache.size <= 0:
        return {}
    table = _file_cache.get(file.sha256)
    if table is None:
        table = {}
        _file_cache.put(file.sha256, table)
    return table  # type: ignore[return-value]


def _layer_stats(table: dict[tuple, _Stats], layer: LoraLayer, k: int) -> tuple[_Stats, float]:
    """Statistics of ``layer`` with at least ``k`` Top values, and the unit factor ``u``."""
    key = (layer.key, layer.kind, tuple(layer.shape), layer.rank)
    stats = table.get(key)
    if stats is None or (stats.top.numel() < k and stats.top.numel() < stats.numel):
        a = _unit_abs(layer)
        stats = _Stats(l1=_l1(a), top=top_abs_values(a, k), numel=a.numel())
        table[key] = stats
    return stats, _unit_factor(layer)


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
    stats, u = _layer_stats(table, layer, k)
    c = abs(float(strength) * u)
    top = stats.top[:k]
    # Rounding is monotone, so fl32(|U|·c) over the Top-K of |U| is the Top-K of |U·c|, still descending;
    # for plain LoRA layers that is exactly what dense_delta(layer, strength) holds (see _unit_abs).
    score = float((top if c == 1.0 else top * c).sum(dtype=torch.float64))
    return score, stats.l1 * c


def _scored_keys(content: LoraFile, style: LoraFile, scope: Scope) -> list[str]:
    return [key for key in content.layers
            if key in style.layers and not is_text_encoder(key) and (scope == "all" or is_attention(key))]


def _layout(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1×1 conv's (out, in, 1, 1) is the (out, in) some kinds store (LoHa/LoKr on SD1.5's 1×1 proj_in)."""
    shape = tuple(shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def pair_scores(content: LoraFile, style: LoraFile, content_strength: float = 1.0,
                style_strength: float = 1.0, scope: Scope = "all") -> PairScores:
    """Scores of the layers K-LoRA decides (both files, not a text encoder, in ``scope``); cached."""
    cache_key = (content.sha256, style.sha256, float(content_strength), float(style_strength), scope)
    cacheable = bool(content.sha256 and style.sha256)
    if cacheable and (hit := _pair_cache.get(cache_key)) is not None:
        return hit  # type: ignore[return-value]
    table_c, table_s = _file_stats(content), _file_stats(style)
    out: dict[str, LayerScore] = {}
    for key in _scored_keys(content, style, scope):
        lc, ls = content.layers[key], style.layers[key]
        if _layout(lc.shape) != _layout(ls.shape):
            raise ValueError(f"{key}: the content LoRA's delta has shape {tuple(lc.shape)} but the style "
                             f"LoRA's has {tuple(ls.shape)}; are they for the same base model?")
        numel = math.prod(lc.shape)
        k = min(layer_rank(lc) * layer_rank(ls), numel)
        sc, l1c = _side(table_c, lc, content_strength, k)
        ss, l1s = _side(table_s, ls, style_strength, k)
        out[key] = LayerScore(k, sc, ss, l1c, l1s)
    scores = PairScores(out)
    if cacheable:
        _pair_cache.put(cache_key, scores)
    return scores


# ------------------------------------------------------------------------------------------------- gamma


def _gamma(scores: PairScores, option: Literal["auto", "paper"] | float) -> tuple[float, str, str]:
    """(γ, method, note). Over the scored layers (shared, denoiser, in scope).

    ``auto``: ratios ``L1_c / L1_s`` of the layers whose style delta is not all zero (a zero style delta
    has no ratio); mean ``m``; ratios ≥ 3·m dropped; γ = mean of the rest. ``paper``: ``Σ L1_c / Σ L1_s``.
    When that leaves nothing to average or gives 0 or a non-finite value (no shared layer, all style deltas
    zero, all content deltas zero), γ = 1: with a zero content delta every such layer takes style under the
    strict rule whatever γ is, so nothing that matters changes.
    """
    if not isinstance(option, str):
        return float(option), "manual", "given"
    layers = list(scores.layers.values())
    if option == "paper":
        num, den = math.fsum(s.l1_content for s in layers), math.fsum(s.l1_style for s in layers)
        g = num / den if den > 0 else math.nan
        if not (math.isfinite(g) and g > 0):
            return 1.0, "paper", "fallback 1: no shared layer with non-zero deltas on both sides"
        return g, "paper", f"sum of L1 over {len(layers)} layers"
    ratios = [s.l1_content / s.l1_style for s in layers if s.l1_style > 0]
    if ratios:
        mean = math.fsum(ratios) / len(ratios)
        kept = [r for r in ratios if r < GAMMA_OUTLIER_FACTOR * mean]
        if kept:
            g = math.fsum(kept) / len(kept)
            if math.isfinite(g) and g > 0:
                return g, "auto", f"mean of {len(kept)} layer ratios, {len(ratios) - len(kept)} dropped"
    return 1.0, "auto", "fallback 1: no shared layer with non-zero deltas on both sides"


# -------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class LayerPlan:
    """One layer of a plan.

    ``source``: ``shared`` (both files), ``content`` or ``style`` (only that file has it).
    ``constant``: the choice at every step for layers not decided per step (one file only, text encoders,
    layers outside the scope, mode ``merge``); None when ``Plan.choose`` decides per step.
    ``k``, ``score_*``, ``l1_*``: set for scored layers (shared, denoiser, in scope), else None.
    ``threshold``: mode ``klora``: θ = S_c / (γ·S_s), content while S(τ) < θ (±inf when S_s = 0: content at
    every step if S_c > 0, never if S_c = 0); mode ``topk``: S_c / S_s, content iff θ > 1; None otherwise.
    """

    key: str
    source: Literal["shared", "content", "style"]
    k: int | None = None
    score_content: float | None = None
    score_style: float | None = None
    threshold: float | None = None
    l1_content: float | None = None
    l1_style: float | None = None
    constant: Choice | None = None


def _theta(sc: float, ss: float, g: float) -> float:
    if ss > 0:
        return sc / (g * ss)
    return math.inf if sc > 0 else -math.inf


@dataclass(frozen=True)
class Plan:
    """Per-layer choices for any sampling progress τ ∈ [0, 1]."""

    options: FusionOptions
    gamma: float
    gamma_method: str
    gamma_note: str
    alpha: float
    beta: float
    layers: dict[str, LayerPlan] = field(default_factory=dict)

    def scale(self, tau: float) -> float:
        """S(τ) = α·τ + β (pattern ``s*``: modulo α)."""
        s = self.alpha * tau + self.beta
        if self.options.pattern == "s*":
            s = s % self.alpha
        return s

    def choose(self, key: str, tau: float) -> Choice:
        """Which delta layer ``key`` applies at progress ``tau`` (``i / N`` at step ``i`` of ``N``).

        Mode ``klora`` evaluates the inequality itself (not the rounded θ), so ties behave as the rule.
        Mode ``random`` draws from (seed, key, τ): τ identifies the step (the same float for the same
        ``i / N``), so the two model calls of one step agree and ``choices`` shows what a run does.
        """
        lp = self.layers[key]
        if lp.constant is not None:
            return lp.constant
        mode = self.options.mode
        if mode == "klora":
            assert lp.score_content is not None and lp.score_style is not None
            return "content" if lp.score_content > self.gamma * self.scale(tau) * lp.score_style else "style"
        if mode == "topk":
            assert lp.score_content is not None and lp.score_style is not None
            return "content" if lp.score_content > lp.score_style else "style"
        if mode == "fixed":
            return "content" if self.scale(tau) <= 1.0 else "style"
        # random: a draw that depends only on (seed, key, τ); the two calls of one step (CFG) agree.
        return "content" if _uniform(self.options.seed, key, tau) < RANDOM_CONTENT_P else "style"

    def choices(self, key: str, steps: int) -> str:
        """One letter per step ``i = 0 … steps-1`` at τ = i/steps: C content, S style, B both, - none."""
        if steps < 1:
            raise ValueError("steps must be at least 1")
        return "".join(LETTERS[self.choose(key, i / steps)] for i in range(steps))

    def flips(self, key: str, steps: int) -> list[int]:
        """Steps ``i`` whose choice differs from step ``i - 1``."""
        row = self.choices(key, steps)
        return [i for i in range(1, steps) if row[i] != row[i - 1]]

    def content_share(self, steps: int) -> list[float | None]:
        """Per step: the share of content among the layers decided per step (None if there are none)."""
        keys = [k for k, lp in self.layers.items() if lp.constant is None]
        rows = [self.choices(k, steps) for k in keys]
        return [(sum(r[i] == "C" for r in rows) / len(rows)) if rows else None for i in range(steps)]

    @property
    def k_range(self) -> tuple[int, int] | None:
        """Smallest and largest K over the scored layers."""
        ks = [lp.k for lp in self.layers.values() if lp.k is not None]
        return (min(ks), max(ks)) if ks else None


def _uniform(seed: int, key: str, tau: float) -> float:
    """A uniform number in [0, 1) from (seed, key, τ), the same in every process."""
    # The seed's 64 low bits (the same bytes as "<q" for seeds in the signed range); + 0.0: -0.0 → 0.0
    data = struct.pack("<Qd", seed % 2**64, float(tau) + 0.0) + key.encode()
    digest = hashlib.blake2b(data, digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


_TE_ALLOWED: dict[str, frozenset[str]] = {
    "both": frozenset({"content", "style"}), "content": frozenset({"content"}),
    "style": frozenset({"style"}), "none": frozenset(),
}


def _te_choice(policy: str, has_content: bool, has_style: bool) -> Choice:
    allowed = _TE_ALLOWED[policy]
    c, s = has_content and "content" in allowed, has_style and "style" in allowed
    return "both" if c and s else "content" if c else "style" if s else "none"


def make_plan(content: LoraFile, style: LoraFile, options: FusionOptions | None = None) -> Plan:
    """The plan for a content and a style LoRA.

    Layer order: the content file's layers, then those only the style file has. Denoiser layers one file
    has take that file's delta at every step. Text-encoder layers follow ``options.te`` at every step
    (a layer only one file has is applied if the policy allows that file, else ``none``). Shared denoiser
    layers outside ``options.scope`` take both deltas (as two ``<lora>`` tags would). In scope, mode
    decides: ``klora`` the rule, ``topk`` S_c > S_s, ``fixed`` content while S(τ) ≤ 1, ``random`` content
    with probability 1/3 per layer and step (seeded), ``merge`` both.
    """
    options = options or FusionOptions()
    scores = pair_scores(content, style, options.content_strength, options.style_strength, options.scope)
    g, method, note = _gamma(scores, options.gamma)
    layers: dict[str, LayerPlan] = {}
    for key in list(content.layers) + [k for k in style.layers if k not in content.layers]:
        has_c, has_s = key in content.layers, key in style.layers
        source: Literal["shared", "content", "style"] = (
            "shared" if has_c and has_s else "content" if has_c else "style")
        if is_text_encoder(key):
            layers[key] = LayerPlan(key, source, constant=_te_choice(options.te, has_c, has_s))
        elif source != "shared":
            layers[key] = LayerPlan(key, source, constant=source)
        elif key not in scores.layers:
            layers[key] = LayerPlan(key, source, constant="both")
        else:
            s = scores.layers[key]
            theta = (_theta(s.score_content, s.score_style, g) if options.mode == "klora"
                     else _theta(s.score_content, s.score_style, 1.0) if options.mode == "topk" else None)
            layers[key] = LayerPlan(
                key, source, k=s.k, score_content=s.score_content, score_style=s.score_style,
                threshold=theta, l1_content=s.l1_content, l1_style=s.l1_style,
                constant="both" if options.mode == "merge" else None,
            )
    return Plan(options, g, method, note, options.resolved_alpha, options.resolved_beta, layers)
