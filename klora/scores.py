"""Top-K scores of a LoRA pair: for each layer both patch, K, Σ Top-K |ΔW| and Σ |ΔW| of each side.

* ``ΔW = strength · scale · U``, ``U`` the kind's unscaled product (:mod:`klora.delta`);
* ``K = r_c · r_s`` clamped to the number of entries (:func:`layer_rank` for kinds without a rank), or the
  ``k`` the user gave;
* ``S = Σ Top-K |ΔW|`` and ``L1 = Σ |ΔW|`` for each side.

Only ``|U|``'s statistics depend on the file, so they are computed once per file and layer and reused by
every pairing and strength: the L1 and the K largest values of ``|U|`` (:mod:`klora.topk`: one product, a
few passes over it, exact). Rounding is monotone, so ``fl32(|U|·c)`` over the Top-K of ``|U|`` is the Top-K
of ``|U·c|``: the scores equal, bit for bit, those of the dense ``ΔW`` the hosts add
(``klora.delta.dense_delta``) on the same device, at any strength, for every kind.

Where the statistics live: in memory per file (an LRU keyed by the file's sha256 and the device type), on
disk per file when a folder is set (:func:`set_disk_cache`: the webui's cache folder, the user's for the
CLI; keyed by the sha256, :data:`klora.topk.ENGINE_VERSION`, torch's version and the device type, since
products round differently elsewhere), and per pair (an LRU keyed by both files, the strengths, the scope
and K). A restart or a second CLI run therefore reads the tables instead of forming the products again, and
finds the files' sha256 in the same folder (:func:`known_files`) instead of hashing them again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from klora import kinds, topk
from klora.cache import LRU
from klora.diskcache import DEFAULT_MAX_BYTES, FileIndex, LayerStats, StatsCache, is_sha256
from klora.keys import is_attention, is_text_encoder
from klora.layers import LoraFile, LoraLayer

__all__ = [
    "LayerScore",
    "PairScores",
    "cache_info",
    "clear_cache",
    "known_files",
    "layer_rank",
    "pair_scores",
    "set_cache_size",
    "set_disk_cache",
]


def layer_rank(layer: LoraLayer) -> int:
    """The rank K uses. A kind without a rank (``full``; LoKr with full factors) counts as full-rank:
    ``min(out, in·kh·kw)``, the rank a dense matrix of that shape has in general."""
    if layer.rank:
        return int(layer.rank)
    out = layer.shape[0]
    inner = math.prod(layer.shape[1:]) if len(layer.shape) > 1 else 1
    return int(min(out, inner))


def layer_stats(layer: LoraLayer, k: int, device: torch.device | None = None,
                workspace: topk.Workspace | None = None) -> LayerStats:
    """Σ|U| and the ``k`` largest |U| (descending, on the CPU) of one layer, computed on ``device``."""
    kind = kinds.of(layer)
    pair = kind.factors(layer)
    if pair is not None:
        up, down = (t.to(device) if device is not None else t for t in pair)
        l1, top = topk.abs_stats(up, down, k, workspace)
        numel = up.shape[0] * down.shape[1]
    else:
        u = kind.product(layer)
        u = u.to(device) if device is not None else u
        l1, top = topk.dense_abs_stats(u, k, workspace)
        numel = u.numel()
    return LayerStats(l1, top.cpu(), numel)


class _FileTable:
    """The statistics of one file's layers on one device type, and whether new ones await writing."""

    __slots__ = ("dirty", "stats")

    def __init__(self, stats: dict[str, LayerStats]) -> None:
        self.stats = stats
        self.dirty: set[str] = set()


_DEFAULT_PAIRS = 8
_pair_cache: LRU[PairScores] = LRU(_DEFAULT_PAIRS)
_file_cache: LRU[_FileTable] = LRU(2 * _DEFAULT_PAIRS)
_disk: dict[str, StatsCache] = {}  # device type → the disk store of that folder
_disk_folder: tuple[Path, int] | None = None  # (folder, max bytes), or None: no disk cache


def set_cache_size(pairs: int) -> None:
    """Keep the scores of up to ``pairs`` LoRA pairs (and per-file statistics of twice as many files) in
    memory; 0 disables the memory caches."""
    pairs = max(int(pairs), 0)
    _pair_cache.resize(pairs)
    _file_cache.resize(2 * pairs)


def set_disk_cache(folder: str | Path | None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
    """Keep per-file statistics in ``folder`` (bounded to ``max_bytes``, least recently used entries
    dropped), or on no disk (None). The same folder keeps the :func:`known_files` index."""
    global _disk_folder
    _disk.clear()
    _disk_folder = (Path(folder), int(max_bytes)) if folder is not None and max_bytes > 0 else None


def known_files() -> FileIndex | None:
    """The index of files already read and checked, in the disk cache's folder (None without a disk cache):
    pass it to :func:`klora.formats.read_lora` so that unchanged files are not hashed again."""
    return FileIndex(_disk_folder[0]) if _disk_folder is not None else None


def _disk_store(device_type: str) -> StatsCache | None:
    if _disk_folder is None:
        return None
    store = _disk.get(device_type)
    if store is None:
        folder, max_bytes = _disk_folder
        version = f"{topk.ENGINE_VERSION}|torch {torch.__version__}|{device_type}"
        store = _disk[device_type] = StatsCache(folder, version, max_bytes)
    return store


def clear_cache() -> None:
    """Forget every score held in memory (the disk cache stays)."""
    _pair_cache.clear()
    _file_cache.clear()


def cache_info() -> dict[str, int]:
    """Sizes, entries, hits and misses of the memory caches (for diagnostics and tests)."""
    return {
        "pairs": len(_pair_cache), "pair_size": _pair_cache.size, "pair_hits": _pair_cache.hits,
        "pair_misses": _pair_cache.misses, "files": len(_file_cache), "file_size": _file_cache.size,
        "file_hits": _file_cache.hits, "file_misses": _file_cache.misses,
    }


def _file_table(file: LoraFile, device_type: str) -> _FileTable:
    """The statistics table of a file (shared by all its pairings; read from disk on first use), or a
    throwaway one for a file without a hash."""
    if not file.sha256:
        return _FileTable({})

    def load() -> _FileTable:
        store = _disk_store(device_type) if is_sha256(file.sha256) else None  # files built in memory: none
        return _FileTable(store.get(file.sha256) if store is not None else {})

    return _file_cache.setdefault((file.sha256, device_type), load)


def _stats_key(layer: LoraLayer) -> str:
    return f"{layer.key}|{layer.kind}|{'x'.join(map(str, layer.shape))}|{layer.rank}"


def _layer_stats(table: _FileTable, layer: LoraLayer, k: int, device: torch.device | None,
                 workspace: topk.Workspace) -> LayerStats:
    """Statistics of ``layer`` with at least ``k`` Top values (computed again if the table has fewer)."""
    key = _stats_key(layer)
    stats = table.stats.get(key)
    if stats is None or (stats.top.numel() < k and stats.top.numel() < stats.numel):
        stats = table.stats[key] = layer_stats(layer, k, device, workspace)
        table.dirty.add(key)
    return stats


def _save(file: LoraFile, table: _FileTable, device_type: str) -> None:
    store = _disk_store(device_type)
    if store is not None and table.dirty and is_sha256(file.sha256):
        store.put(file.sha256, {key: table.stats[key] for key in table.dirty})
    table.dirty.clear()


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


def _side(stats: LayerStats, layer: LoraLayer, strength: float, k: int) -> tuple[float, float]:
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
                k: int | None = None, device: torch.device | str | None = None) -> PairScores:
    """Scores of the layers K-LoRA decides (:func:`scored_keys`); cached. ``k``: the number of entries summed
    (None: r_c·r_s per layer, the paper's K), clamped to each layer's size. ``device``: where the products
    are formed (a GPU when there is one; default the CPU). A layer whose two deltas do not fit each other
    (:func:`klora.layers.layout`) raises ``ValueError``: the files are for different models."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    cache_key = (content.sha256, style.sha256, float(content_strength), float(style_strength), scope, k,
                 dev.type)
    cacheable = bool(content.sha256 and style.sha256)
    if cacheable and (hit := _pair_cache.get(cache_key)) is not None:
        return hit
    table_c, table_s = _file_table(content, dev.type), _file_table(style, dev.type)
    workspace = topk.Workspace()
    out: dict[str, LayerScore] = {}
    for key in scored_keys(content, style, scope):
        lc, ls = content.layers[key], style.layers[key]
        if lc.layout != ls.layout:
            raise ValueError(f"{key}: the content LoRA's delta has shape {tuple(lc.shape)} but the style "
                             f"LoRA's has {tuple(ls.shape)}; are they for the same base model?")
        n = min(layer_rank(lc) * layer_rank(ls) if k is None else k, math.prod(lc.shape))
        sc, l1c = _side(_layer_stats(table_c, lc, n, dev, workspace), lc, content_strength, n)
        ss, l1s = _side(_layer_stats(table_s, ls, n, dev, workspace), ls, style_strength, n)
        out[key] = LayerScore(n, sc, ss, l1c, l1s)
    _save(content, table_c, dev.type)
    _save(style, table_s, dev.type)
    scores = PairScores(out)
    if cacheable:
        _pair_cache.put(cache_key, scores)
    return scores
