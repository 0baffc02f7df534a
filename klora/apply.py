"""Apply a fusion plan to torch modules with forward hooks.

Each patched module gets a forward hook that adds the output of the delta the plan chooses for the
current sampling progress τ: ``up(down(x))`` for LoRA/LoCon layers (the dense ΔW is never built for
them), ``F.linear``/``F.conv2d`` with the dense ΔW for LoHa, LoKr and full layers. No weight is
written, so the hooks compose with other LoRAs the host patches into the weights, survive offloading,
and leave nothing to restore: removing the hooks is the whole clean-up.

Cost per hook call: the layer's choice is recomputed only when the clock's τ changes (one
``Plan.choose`` per layer per step, pushed to the hooks); a call reads one attribute, finds the
factors for the output's device and dtype (moved once, then cached), and runs the low-rank products.

Prepared factors outlive the hooks: the host attaches once per batch (and hires pass, XYZ cell), so a
small LRU keeps, per (file sha256, strength), the fp32 factors and their device/dtype copies, and the next
``attach`` of the same files at the same strengths prepares and uploads nothing. :func:`set_cache_size`
bounds it (in files), :func:`clear_cache` empties it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from klora import kinds
from klora.cache import LRU
from klora.delta import bias_delta, dense_delta, low_rank
from klora.deltapaths import (
    ConvDense,
    ConvGeometry,
    ConvLowRank,
    ConvTucker,
    DeltaPath,
    LinearDense,
    LinearLowRank,
    PathSum,
    combine,
)
from klora.layers import LoraFile, LoraFormatError, LoraLayer, layout

if TYPE_CHECKING:
    from klora.fusion import Plan

__all__ = [
    "Coverage",
    "Hooks",
    "ShapeMismatchError",
    "Site",
    "StepClock",
    "Target",
    "attach",
    "attached",
    "cache_info",
    "clear_cache",
    "cover",
    "hook_bytes",
    "set_cache_size",
    "site",
]


class ShapeMismatchError(LoraFormatError):
    """A LoRA layer whose delta does not fit the module (or rows) it would be added to."""


@dataclass(frozen=True)
class Target:
    """The module a canonical layer key patches. ``rows`` selects output rows of a fused layer (for example
    the q rows of a fused qkv Linear), ``None`` means the whole output. ``part`` names the projection of an
    ``nn.MultiheadAttention`` (``q``, ``k``, ``v``, ``out``), whose weights are parameters, not modules
    (:mod:`klora.mha`). ``shape``: the ``(out, in)`` of a Linear-like module that declares no
    ``in_features``/``out_features`` (quantised Linears such as GGUF's or bitsandbytes' NF4 store a packed
    weight, so only the host knows the logical shape); ignored for modules that declare them."""

    module: nn.Module
    rows: slice | None = None
    part: str | None = None
    shape: tuple[int, int] | None = None


class StepClock:
    """Sampling progress τ in [0, 1], set by the host before each model call.

    Hooks attached with this clock subscribe to it; the per-layer choices are recomputed once, when
    τ changes, never inside a forward call.
    """

    def __init__(self, tau: float = 0.0) -> None:
        self._tau = 0.0
        self._listeners: list[Callable[[float], None]] = []
        self.tau = tau

    @property
    def tau(self) -> float:
        return self._tau

    @tau.setter
    def tau(self, value: float) -> None:
        value = float(value)
        if math.isnan(value):
            raise ValueError("tau must be a number in [0, 1], got NaN")
        value = min(1.0, max(0.0, value))
        if value != self._tau:
            self._tau = value
            for listener in tuple(self._listeners):
                listener(value)

    def set_step(self, step: int, total: int, skipped: int = 0) -> float:
        """Set τ = clamp((skipped + step) / (skipped + total)) and return it.

        ``skipped`` is the number of schedule steps before this pass starts (img2img, hires fix), so
        that τ continues where the pass's starting noise sits in the full schedule.
        """
        full = skipped + total
        if full <= 0:
            raise ValueError(f"total steps must be positive, got skipped={skipped}, total={total}")
        self.tau = (skipped + step) / full
        return self._tau

    def _subscribe(self, listener: Callable[[float], None]) -> None:
        self._listeners.append(listener)

    def _unsubscribe(self, listener: Callable[[float], None]) -> None:
        # Bound methods compare equal but are new objects each time: remove by equality.
        self._listeners = [fn for fn in self._listeners if fn != listener]


# --------------------------------------------------------------------------------------------------
# Modules


@dataclass(frozen=True)
class Site:
    """What a delta must fit where it lands: the module kind, the weight shape (of the selected rows) and the
    conv geometry. Sizes come from the module's declared features/channels, or from the target's declared
    ``shape``, never from its stored weight (packed for NF4 and GGUF)."""

    conv: bool
    shape: tuple[int, ...]  # (out, in) or (out, in, kh, kw); out counts the selected rows only
    full_out: int
    rows: slice | None
    geo: ConvGeometry | None
    mha: bool = False  # a projection of an nn.MultiheadAttention (klora.mha)

    @property
    def described(self) -> str:
        if self.rows is None:
            return str(self.shape)
        return f"{self.shape} (rows {self.rows.start}:{self.rows.stop} of {self.full_out})"


def site(key: str, target: Target) -> Site:
    """The :class:`Site` of a target; ``ValueError`` for a module no hook can patch."""
    m = target.module
    if target.part is not None:
        if not isinstance(m, nn.MultiheadAttention) or target.part not in ("q", "k", "v", "out"):
            raise ValueError(f"{key}: part {target.part!r} of a {type(m).__name__}")
        dim = int(m.embed_dim)
        return Site(False, (dim, dim), dim, None, None, mha=True)
    if isinstance(m, nn.Conv2d) or (hasattr(m, "kernel_size") and hasattr(m, "in_channels")):
        kernel = tuple(m.kernel_size)
        if len(kernel) != 2:
            raise ValueError(f"{key}: only 2-D convolutions are supported, got {type(m).__name__}")
        if getattr(m, "groups", 1) != 1 or getattr(m, "transposed", False):
            raise ValueError(f"{key}: grouped and transposed convolutions are not supported")
        out, inp = int(m.out_channels), int(m.in_channels)
        geo: ConvGeometry | None = ConvGeometry.of(m, kernel)
        tail: tuple[int, ...] = kernel
        conv = True
    elif isinstance(m, nn.Linear) or (hasattr(m, "in_features") and hasattr(m, "out_features")):
        out, inp = int(m.out_features), int(m.in_features)
        geo, tail, conv = None, (), False
    elif target.shape is not None:
        if len(target.shape) != 2 or min(target.shape) <= 0:
            raise ValueError(f"{key}: a Linear's shape must be (out, in), got {target.shape!r}")
        out, inp = (int(d) for d in target.shape)
        geo, tail, conv = None, (), False
    else:
        raise ValueError(f"{key}: cannot hook a {type(m).__name__} (Linear or Conv2d expected)")
    rows = target.rows
    n = out
    if rows is not None:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise ValueError(f"{key}: rows must be a contiguous slice, got {rows!r}")
        start, stop, _ = rows.indices(out)
        n = stop - start
        if n <= 0:
            raise ValueError(f"{key}: rows {rows!r} select nothing of {out} output features")
        rows = slice(start, stop)
    return Site(conv, (n, inp, *tail), out, rows, geo)


@dataclass
class Coverage:
    """How a plan's layers map onto a model's targets."""

    mapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # no module of that name
    mismatched: list[str] = field(default_factory=list)  # a module, but a delta does not fit it
    shared_mapped: int = 0
    shared_total: int = 0

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} with no module in this model")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} whose shape does not fit")
        return ", ".join(parts)


def cover(plan: Plan, content: LoraFile, style: LoraFile, targets: Mapping[str, Target]) -> Coverage:
    """Which planned layers can be applied: a target found and every delta's :func:`layout` equal to the
    site's (the check :func:`attach` makes, without preparing anything)."""
    cov = Coverage()
    for key, lp in plan.layers.items():
        shared = lp.source == "shared"
        cov.shared_total += shared
        target = targets.get(key)
        if target is None:
            cov.missing.append(key)
            continue
        try:
            shape = layout(site(key, target).shape)
        except ValueError:
            shape = None
        if shape is None or any(f.layers[key].layout != shape for f in (content, style) if key in f.layers):
            cov.mismatched.append(key)
            continue
        cov.mapped.append(key)
        cov.shared_mapped += shared
    return cov


def hook_bytes(plan: Plan, content: LoraFile, style: LoraFile, keys: Iterable[str],
               dtype: torch.dtype) -> int:
    """Bytes the hooks of ``keys`` hold on the compute device in ``dtype``: each kind's factors (or dense
    delta, :meth:`klora.kinds.base.Kind.hook_numel`), once more for layers that apply both deltas
    (stacked)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for key in keys:
        numel = sum(kinds.of(f.layers[key]).hook_numel(f.layers[key]) for f in (content, style)
                    if key in f.layers)
        lp = plan.layers.get(key)
        total += numel * (2 if lp is not None and lp.constant == "both" else 1)
    return total * size


def _mismatch(file: LoraFile, layer: LoraLayer, site: Site, what: str) -> ShapeMismatchError:
    return ShapeMismatchError(
        file.path,
        f"{what} {tuple(layer.shape)} does not fit the module weight {site.described}; "
        "is this LoRA made for another base model?",
        key=layer.key,
    )


def _prepare(file: LoraFile, layer: LoraLayer, strength: float, site: Site) -> DeltaPath:
    """Fold scale and strength into factors shaped for ``site`` (checked), or the dense ΔW for kinds
    without a cheap factorisation. A Linear and a 1×1 conv accept each other's layouts."""
    if layer.layout != layout(site.shape):
        raise _mismatch(file, layer, site, "LoRA layer shape")
    out, inp = site.shape[:2]
    kernel = site.shape[2:]
    lr = low_rank(layer, strength)
    if lr is not None:
        down, up, mid = lr.down.float(), lr.up.float(), lr.mid
        r = down.shape[0]
        inner = r if mid is None else mid.shape[0]
        if up.shape[0] != out or up.numel() != out * inner or (mid is not None and mid.shape[1] != r):
            raise _mismatch(file, layer, site, "LoRA factors of layer shape")
        if mid is None:
            if down.numel() != r * inp * math.prod(kernel):
                raise _mismatch(file, layer, site, "LoRA down factor of layer shape")
            if not site.conv:
                return LinearLowRank(down.reshape(r, inp).contiguous(), up.reshape(out, -1).contiguous())
            assert site.geo is not None
            return ConvLowRank(down.reshape(r, inp, *kernel).contiguous(),
                                up.reshape(out, -1, 1, 1).contiguous(), site.geo)
        mid = mid.float()
        if not site.conv or down.numel() != r * inp or tuple(mid.shape[2:]) != tuple(kernel):
            raise _mismatch(file, layer, site, "LoRA Tucker factors of layer shape")
        assert site.geo is not None
        return ConvTucker(down.reshape(r, inp, 1, 1).contiguous(), mid.contiguous(),
                           up.reshape(out, -1, 1, 1).contiguous(), site.geo)
    w = dense_delta(layer, strength).float().reshape(site.shape).contiguous()
    b = bias_delta(layer, strength)
    if b is not None:
        if b.numel() != out:
            raise _mismatch(file, layer, site, "bias delta of layer shape")
        b = b.float().reshape(out).contiguous()
    if not site.conv:
        return LinearDense(w, b)
    assert site.geo is not None
    return ConvDense(w, b, site.geo)


# --------------------------------------------------------------------------------------------------
# Prepared factors kept across attaches


_UnitKey = tuple[str, float]  # (file sha256, strength)
SiteKey = tuple[Any, ...]  # (layer key, conv, weight shape, conv geometry): all a prepared path depends on


class _Bucket:
    """The prepared paths of one file at one strength (or the stacked content+style paths of two such),
    by site. ``live`` turns False when the cache drops the bucket: hooks then free the device copies of
    its paths they still hold when they are removed."""

    __slots__ = ("key", "live", "paths")

    def __init__(self, key: Any) -> None:
        self.key = key
        self.live = True
        self.paths: dict[SiteKey, DeltaPath] = {}


class _FactorCache:
    """Prepared factors of at most ``size`` (file sha256, strength) entries, least recently used dropped.

    An entry holds what ``attach`` prepared for that file at that strength: the fp32 CPU factors (dense
    ΔW only for kinds without a factorisation) of every site it was attached to, and their copies per
    device and dtype made by the hooks. Stacked content+style factors (the "both" choice) are kept per
    pair of live entries and dropped with either. So the cache holds at most what attaching the last
    ``size`` files prepared: what a generation with them held while it ran, now held between generations.
    Files without a sha256 and ``size`` 0 are not cached: the hooks then own their factors and free
    them on ``remove()``.
    """

    def __init__(self, size: int) -> None:
        self._units: LRU[_Bucket] = LRU(size, on_evict=self._evicted)
        self._pairs: dict[tuple[_UnitKey, _UnitKey], _Bucket] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _drop(bucket: _Bucket) -> None:
        bucket.live = False
        for path in bucket.paths.values():
            path.clear()
        bucket.paths.clear()

    def _evicted(self, key: Any, bucket: _Bucket) -> None:
        self._drop(bucket)
        for pk in [pk for pk in self._pairs if key in pk]:
            self._drop(self._pairs.pop(pk))

    @property
    def size(self) -> int:
        return self._units.size

    def unit(self, file: LoraFile, strength: float) -> _Bucket | None:
        if not file.sha256:
            return None
        key = (file.sha256, float(strength))
        with self._lock:
            return self._units.setdefault(key, lambda: _Bucket(key)) if self._units.size > 0 else None

    def pair(self, content: _Bucket | None, style: _Bucket | None) -> _Bucket | None:
        if content is None or style is None:
            return None
        key = (content.key, style.key)
        with self._lock:
            if not (content.live and style.live):
                return None
            bucket = self._pairs.get(key)
            if bucket is None:
                bucket = self._pairs[key] = _Bucket(key)
            return bucket

    def get(self, bucket: _Bucket, key: SiteKey) -> DeltaPath | None:
        with self._lock:
            path = bucket.paths.get(key)
            if path is None:
                self.misses += 1
            else:
                self.hits += 1
            return path

    def put(self, bucket: _Bucket, key: SiteKey, path: DeltaPath) -> None:
        with self._lock:
            if bucket.live:
                bucket.paths[key] = path

    def resize(self, size: int) -> None:
        with self._lock:
            self._units.resize(size)

    def clear(self) -> None:
        with self._lock:
            self._units.clear()
            self.hits = self.misses = 0

    def info(self) -> dict[str, int]:
        with self._lock:
            buckets = [*self._units.values(), *self._pairs.values()]
            return {"files": len(self._units), "size": self._units.size, "pairs": len(self._pairs),
                    "paths": sum(len(b.paths) for b in buckets), "hits": self.hits, "misses": self.misses}


_DEFAULT_FILES = 2  # one content+style pair at one strength each: the repeated batches of one generation
_cache = _FactorCache(_DEFAULT_FILES)


def set_cache_size(files: int) -> None:
    """Keep the prepared factors (and their device copies) of up to ``files`` (file, strength) entries
    across attaches (default 2: one pair); 0 disables the cache (every attach prepares and uploads anew)."""
    _cache.resize(max(int(files), 0))


def clear_cache() -> None:
    """Free every cached factor and device copy (for example when the model or the extension unloads).
    Hooks still attached keep working: they make new copies on their next call and free them on removal."""
    _cache.clear()


def cache_info() -> dict[str, int]:
    """Entries (``files`` of ``size``, stacked ``pairs``), prepared ``paths`` held, and path hits/misses."""
    return _cache.info()


def _site_key(key: str, site: Site) -> SiteKey:
    return (key, site.conv, site.shape, site.geo)


def _prepared(bucket: _Bucket | None, file: LoraFile, layer: LoraLayer, strength: float,
              site: Site) -> DeltaPath:
    """:func:`_prepare`, reusing the bucket's path for the same site (same tensors: same file content,
    layer, strength and weight shape)."""
    if bucket is None:
        return _prepare(file, layer, strength, site)
    key = _site_key(layer.key, site)
    path = _cache.get(bucket, key)
    if path is None:
        path = _prepare(file, layer, strength, site)
        _cache.put(bucket, key, path)
    return path


def _compiling() -> bool:
    """Whether torch.compile is tracing the caller (False on torch versions without the query)."""
    query = getattr(torch.compiler, "is_compiling", None)
    return bool(query()) if query is not None else False


class _LayerHook:
    """The forward hook of one layer key. ``active`` is the delta for the current τ (or None)."""

    __slots__ = ("_both", "_buckets", "_skey", "active", "content", "key", "rows", "style")

    def __init__(self, key: str, content: DeltaPath | None, style: DeltaPath | None, site: Site,
                 buckets: tuple[_Bucket | None, _Bucket | None, _Bucket | None] = (None, None, None),
                 site_key: SiteKey = ()) -> None:
        self.key = key
        self.content = content
        self.style = style
        self._both: DeltaPath | PathSum | None = None
        # Where content, style and the stacked "both" path are cached (None: owned by this hook).
        self._buckets = buckets
        self._skey = site_key
        self.active: DeltaPath | PathSum | None = None
        # Output rows of a fused layer: Linear features are the last dim, conv channels dim -3.
        self.rows: tuple[Any, ...] | None = None
        if site.rows is not None:
            self.rows = (..., site.rows, slice(None), slice(None)) if site.conv else (..., site.rows)

    def select(self, choice: str) -> DeltaPath | PathSum | None:
        if choice == "content":
            return self.content
        if choice == "style":
            return self.style
        if choice == "both":
            if self.content is None or self.style is None:
                return self.content or self.style
            if self._both is None:
                self._both = self._stacked()
            return self._both
        if choice == "none":
            return None
        raise ValueError(f"{self.key}: unknown choice {choice!r}")

    def _stacked(self) -> DeltaPath | PathSum:
        assert self.content is not None and self.style is not None
        bucket = self._buckets[2]
        both = None if bucket is None else _cache.get(bucket, self._skey)
        if both is None:
            both = combine(self.content, self.style)
            if bucket is not None and isinstance(both, DeltaPath):  # a PathSum holds nothing of its own
                _cache.put(bucket, self._skey, both)
        return both

    def clear(self) -> None:
        """Free the device copies this hook owns: those of paths the cache does not (or no longer) hold."""
        for p, bucket in zip((self.content, self.style, self._both), self._buckets, strict=True):
            if isinstance(p, DeltaPath) and (bucket is None or not bucket.live):
                p.clear()
        self._both = None
        self.active = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 out: torch.Tensor) -> torch.Tensor | None:
        path = self.active
        if path is None:
            return None
        x = args[0] if args else kwargs["input"]
        if x.dtype is not out.dtype:  # e.g. under autocast: compute in the dtype the module produced
            x = x.to(out.dtype)
        rows = self.rows
        # Out of place when autograd records the output (keep its graph intact) or when it is an inference
        # tensor outside inference mode (a module that entered the mode itself), which cannot be changed.
        # torch.compile cannot trace is_inference() (a graph break in every hooked layer); a compiled graph
        # makes its own tensors, so the check is left out while compiling.
        if out.requires_grad or (not _compiling() and out.is_inference()
                                 and not torch.is_inference_mode_enabled()):
            if rows is None:
                return out + path(x)
            out = out.clone()
            out[rows] += path(x)
            return out
        if rows is None:
            path.add_into(x, out)
        else:
            out[rows].add_(path(x))
        return None  # changed in place


# --------------------------------------------------------------------------------------------------
# Attaching


class Hooks:
    """Attached hooks of one plan. ``remove()`` detaches everything and may be called any number of
    times; the object is also a context manager that removes on exit."""

    def __init__(self, plan: Plan, clock: StepClock, layers: list[_LayerHook],
                 keys_missing: list[str]) -> None:
        self._plan = plan
        self._clock = clock
        self._layers = layers
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._live = False
        self.keys: tuple[str, ...] = tuple(h.key for h in layers)
        self.missing: tuple[str, ...] = tuple(keys_missing)

    @property
    def attached(self) -> bool:
        """Whether the hooks are in place (False after :meth:`remove`)."""
        return self._live

    @property
    def factor_bytes(self) -> int:
        """Bytes of the prepared fp32 tensors (low-rank factors, dense ΔW only for kinds without)."""
        return sum(p.nbytes for h in self._layers for p in (h.content, h.style) if p is not None)

    def choices(self) -> dict[str, str]:
        """The current choice per attached key, as the plan gives it for the clock's τ."""
        tau = self._clock.tau
        return {h.key: self._plan.choose(h.key, tau) for h in self._layers}

    def _refresh(self, tau: float) -> None:
        plan = self._plan
        for h in self._layers:
            h.active = h.select(plan.choose(h.key, tau))

    def remove(self) -> None:
        self._live = False
        handles, self._handles = self._handles, []
        for handle in handles:
            handle.remove()
        self._clock._unsubscribe(self._refresh)
        for h in self._layers:
            h.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(plan: Plan, content: LoraFile, style: LoraFile, targets: Mapping[str, Target],
           clock: StepClock, keys: Iterable[str] | None = None) -> Hooks:
    """Prepare every planned layer (of ``keys``, default all) that has a target and hook it. Keys without a
    target are listed in ``Hooks.missing``. A layer that does not fit its module raises ``ShapeMismatchError``
    and nothing is attached. Factors (and their device copies) prepared by an earlier attach of the same file
    content at the same strength for the same weight shape are reused (see :func:`set_cache_size`). Parts of
    an ``nn.MultiheadAttention`` get one :class:`klora.mha.MhaHook` per module."""
    from klora.mha import MhaHook

    opts = plan.options
    c_bucket = _cache.unit(content, opts.content_strength)
    s_bucket = _cache.unit(style, opts.style_strength)
    buckets = (c_bucket, s_bucket, _cache.pair(c_bucket, s_bucket))
    layers: list[_LayerHook] = []
    modules: list[nn.Module] = []
    mha_parts: dict[int, tuple[nn.Module, dict[str, str]]] = {}
    missing: list[str] = []
    for key in plan.layers if keys is None else keys:
        target = targets.get(key)
        if target is None:
            missing.append(key)
            continue
        c, s = content.layers.get(key), style.layers.get(key)
        if c is None and s is None:
            raise ValueError(f"{key}: the plan names a layer that neither {content.name} "
                             f"nor {style.name} has")
        where = site(key, target)
        for f, layer in ((content, c), (style, s)):
            if layer is not None and layer.layout != layout(where.shape):
                raise _mismatch(f, layer, where, "LoRA layer shape")
        if where.mha:
            assert target.part is not None
            mha_parts.setdefault(id(target.module), (target.module, {}))[1][target.part] = key
            continue
        layers.append(_LayerHook(
            key,
            None if c is None else _prepared(c_bucket, content, c, opts.content_strength, where),
            None if s is None else _prepared(s_bucket, style, s, opts.style_strength, where),
            where,
            buckets,
            _site_key(key, where),
        ))
        modules.append(target.module)
    hooks = Hooks(plan, clock, layers, missing)
    try:
        hooks._refresh(clock.tau)
        for module, h in zip(modules, layers, strict=True):
            hooks._handles.append(module.register_forward_hook(h, with_kwargs=True))
        for module, parts in mha_parts.values():
            mha = MhaHook(module, parts, plan, content, style, clock)  # type: ignore[arg-type]
            hooks._handles.append(module.register_forward_hook(mha, with_kwargs=True))
            hooks.keys += tuple(parts.values())
        clock._subscribe(hooks._refresh)
        hooks._live = True
    except BaseException:
        hooks.remove()
        raise
    return hooks


@contextmanager
def attached(plan: Plan, content: LoraFile, style: LoraFile, targets: Mapping[str, Target],
             clock: StepClock, keys: Iterable[str] | None = None) -> Iterator[Hooks]:
    """``with attached(...) as hooks:`` — the hooks are removed when the block ends, also on error."""
    hooks = attach(plan, content, style, targets, clock, keys)
    try:
        yield hooks
    finally:
        hooks.remove()
