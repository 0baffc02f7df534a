"""What one LoRA layer adds to one module's output: a *delta path* per kind of layer and module.

A path holds its delta's prepared float32 CPU tensors (strength × scale folded in) and makes copies per
(device, dtype) on first use. ``LinearLowRank``/``ConvLowRank``/``ConvTucker`` run the factors
(``up(down(x))``, the dense ΔW is never built), ``LinearDense``/``ConvDense`` a dense ΔW (LoHa, LoKr,
full layers); a conv path repeats its module's geometry (stride, padding and padding mode, dilation) so
that the delta's output lines up with the module's. :func:`combine` stacks two low-rank paths into one
product where that is exact, else sums them (:class:`PathSum`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvDense",
    "ConvGeometry",
    "ConvLowRank",
    "ConvTucker",
    "DeltaPath",
    "LinearDense",
    "LinearLowRank",
    "PathSum",
    "combine",
    "ordinary",
]




def ordinary(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or an ordinary copy of an inference tensor (usable by calls that record autograd)."""
    return t.clone() if t.is_inference() else t


class DeltaPath:
    """Prepared fp32 CPU tensors of one delta and their copies per (device, dtype), made on first use."""

    __slots__ = ("_cache", "_last", "master")

    def __init__(self, *master: torch.Tensor | None) -> None:
        self.master = master
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Any, ...]] = {}
        # The last copies used, with their device and dtype: one attribute, so that hooks of two attaches
        # sharing this (cached) path never read a device of one and the tensors of another.
        self._last: tuple[torch.device | None, torch.dtype | None, tuple[Any, ...]] = (None, None, ())

    def tensors(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
        dev, dt, cur = self._last
        if dtype is dt and device == dev:
            return cur
        cur = self._cache.get((device, dtype))
        if cur is None:
            cur = self._copy(device, dtype)
        self._last = (device, dtype, cur)
        return cur

    @torch.compiler.disable  # runs once per device and dtype; torch.compile cannot trace inference checks
    def _copy(self, device: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
        # Copies made during an inference_mode call (or masters prepared under it) would be inference
        # tensors, which a later call that records autograd cannot use: keep ordinary tensors.
        with torch.inference_mode(False):
            cur = tuple(None if t is None else ordinary(t.to(device=device, dtype=dtype))
                        for t in self.master)
        self._cache[(device, dtype)] = cur
        return cur

    def clear(self) -> None:
        self._cache.clear()
        self._last = (None, None, ())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.master if t is not None)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def add_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out += delta(x)`` in place."""
        out.add_(self(x))


class LinearLowRank(DeltaPath):
    """(x @ downᵀ) @ upᵀ; down (r, in), up (out, r) with strength × scale folded in."""

    __slots__ = ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.tensors(x.device, x.dtype)
        return F.linear(F.linear(x, down), up)

    def add_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        down, up = self.tensors(x.device, x.dtype)
        h = F.linear(x, down)
        # The up product accumulates straight into the output (one kernel less), unless autocast gave h
        # another dtype than the output's (a module that computes in float32 under the caller's autocast).
        if out.is_contiguous() and h.dtype is out.dtype:
            out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), up.t())
        else:
            out.add_(F.linear(h, up))


class LinearDense(DeltaPath):
    __slots__ = ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.tensors(x.device, x.dtype)
        return F.linear(x, w, b)


@dataclass(frozen=True)
class ConvGeometry:
    """The spatial parameters of a Conv2d, so that a delta conv lines up with the module's output."""

    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    pad: tuple[int, int, int, int] | None  # explicit F.pad amounts for non-zero padding modes
    pad_mode: str

    @staticmethod
    def of(module: nn.Module, kernel: tuple[int, int]) -> ConvGeometry:
        stride = tuple(module.stride)
        dilation = tuple(module.dilation)
        padding = module.padding
        mode = getattr(module, "padding_mode", "zeros")
        if mode == "zeros":
            return ConvGeometry(stride, padding if isinstance(padding, str) else tuple(padding),
                                 dilation, None, mode)
        if padding == "valid":
            amounts: tuple[int, ...] = (0, 0, 0, 0)
        elif padding == "same":
            amounts = ()
            for d, k in zip(reversed(dilation), reversed(kernel), strict=True):
                total = d * (k - 1)
                amounts += (total // 2, total - total // 2)
        else:
            amounts = (padding[1], padding[1], padding[0], padding[0])
        return ConvGeometry(stride, (0, 0), dilation, tuple(amounts), mode)

    def prepad(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.pad is None else F.pad(x, self.pad, mode=self.pad_mode)

    def conv(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation)


class ConvLowRank(DeltaPath):
    """conv(x, down) with the module's geometry, then the 1×1 ``up``; down (r, in, kh, kw)."""

    __slots__ = ("geo",)

    def __init__(self, down: torch.Tensor, up: torch.Tensor, geo: ConvGeometry) -> None:
        super().__init__(down, up)
        self.geo = geo

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        down, up = self.tensors(x.device, x.dtype)
        return F.conv2d(self.geo.conv(self.geo.prepad(x), down), up)


class ConvTucker(DeltaPath):
    """Tucker/CP LoCon: 1×1 ``down`` (r, in), the spatial ``mid`` (r, r, kh, kw) with the module's
    geometry, then 1×1 ``up``. The 1×1 down commutes with padding, so it runs first on fewer channels."""

    __slots__ = ("geo",)

    def __init__(self, down: torch.Tensor, mid: torch.Tensor, up: torch.Tensor, geo: ConvGeometry) -> None:
        super().__init__(down, mid, up)
        self.geo = geo

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        down, mid, up = self.tensors(x.device, x.dtype)
        h = F.conv2d(self.geo.prepad(x), down)
        return F.conv2d(self.geo.conv(h, mid), up)


class ConvDense(DeltaPath):
    __slots__ = ("geo",)

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, geo: ConvGeometry) -> None:
        super().__init__(w, b)
        self.geo = geo

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.tensors(x.device, x.dtype)
        return self.geo.conv(self.geo.prepad(x), w, b)


class PathSum:
    """Both deltas where their factors cannot be stacked into one low-rank product."""

    __slots__ = ("a", "b")

    def __init__(self, a: DeltaPath, b: DeltaPath) -> None:
        self.a, self.b = a, b

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x)

    def add_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        self.a.add_into(x, out)
        self.b.add_into(x, out)


def combine(a: DeltaPath, b: DeltaPath) -> DeltaPath | PathSum:
    """One product for content + style where both are plain low-rank of the same layout: the factors
    stacked along the rank (down rows, up columns) give exactly up_a·down_a + up_b·down_b."""
    if type(a) is LinearLowRank and type(b) is LinearLowRank:
        return LinearLowRank(torch.cat([a.master[0], b.master[0]], 0),
                              torch.cat([a.master[1], b.master[1]], 1))
    if (type(a) is ConvLowRank and type(b) is ConvLowRank and a.geo == b.geo
            and a.master[0].shape[2:] == b.master[0].shape[2:]):
        return ConvLowRank(torch.cat([a.master[0], b.master[0]], 0),
                            torch.cat([a.master[1], b.master[1]], 1), a.geo)
    return PathSum(a, b)
