"""DiT families named by a table: canonical keys (diffusers names) ↔ the names of the native checkpoint layout
that ComfyUI-derived hosts (Forge Neo) build their modules with, and the row layout of fused modules.

A :class:`DitFamily` describes one model family whose blocks are ``<kind>_<index>_<sub-module>`` (flattened):
which block kinds exist and in which order the forward pass runs them, which sub-modules have another name in
the native layout, which native modules are *fused* (one Linear holding several diffusers projections in its
output rows) and how their rows split, and the top-level modules. Everything works on flattened ('_') names,
so file keys of every spelling and module names of a host meet in one form. Flux keeps its own module
(:mod:`klora.keys.flux`): its fused single blocks mix projections of different widths and it predates this
table. The families: :mod:`klora.keys.zimage` (Z-Image, Lumina 2), :mod:`klora.keys.qwen` (Qwen-Image),
:mod:`klora.keys.wan` (Wan 2.x).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

COMPONENT = "transformer"
"""The canonical component of every DiT denoiser (Flux's too)."""

SplitSizes = Callable[[int, int], tuple[int, ...]]
"""``(out, in) → row counts`` of a fused module's children, in row order."""


@dataclass(frozen=True)
class NativeSite:
    """Where a canonical key lands in the native layout: the flattened module name and, for a projection that
    is part of a fused module, its index among the fused children (rows from :meth:`DitFamily.rows`)."""

    module: str
    part: int | None = None


@dataclass(frozen=True)
class DitFamily:
    """One DiT family's names (see the module docstring).

    ``blocks``: block kinds in forward order. ``block_subs``: canonical sub-module names in forward order (the
    order the map and the forward order of layers use). ``native_subs``: native sub-module → canonical, for
    the names that differ. ``fused``: native fused sub-module → its canonical children in row order, with
    ``split`` giving their row counts from the module's ``(out, in)``. ``top``: canonical top-level module →
    native (equal where they agree), in forward order, before the blocks unless listed in ``after``.
    """

    name: str
    label: str
    blocks: tuple[str, ...]
    block_subs: tuple[str, ...]
    native_subs: Mapping[str, str] = field(default_factory=dict)
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    split: SplitSizes | None = None
    top: Mapping[str, str] = field(default_factory=dict)
    after: frozenset[str] = frozenset()
    distinctive: Callable[[str, int, str], bool] | None = None

    @cached_property
    def block_re(self) -> re.Pattern[str]:
        return re.compile(rf"^({'|'.join(map(re.escape, self.blocks))})_(\d+)_(.+)$")

    @cached_property
    def _native_top(self) -> dict[str, str]:
        return {native: canonical for canonical, native in self.top.items()}

    def proves(self, flat: str) -> bool:
        """Whether a flattened module path (native or diffusers spelling) shows that its file is for this
        family (see ``distinctive``)."""
        found = self.canonical(flat)
        m = self.block_re.match(found[0]) if found else None
        if m is None:
            return False
        if found[1] or self.distinctive is None:
            return True
        return self.distinctive(m.group(1), int(m.group(2)), m.group(3))

    def canonical(self, flat: str) -> tuple[str, bool] | None:
        """A flattened module path below the denoiser, in native or diffusers spelling → (canonical path,
        whether it names a fused module whose layer must be split into its children); None when the name is
        no module of this family."""
        m = self.block_re.match(flat)
        if m:
            kind, index, sub = m.groups()
            if sub in self.fused:
                return flat, True
            sub = self.native_subs.get(sub, sub)
            return (f"{kind}_{index}_{sub}", False) if sub in self.block_subs else None
        if flat in self.top:
            return flat, False
        if flat in self._native_top:
            return self._native_top[flat], False
        return None

    def children(self, fused_flat: str, out: int, inp: int) -> list[tuple[str, int]]:
        """The canonical children of a fused native module path and their row counts (in row order), for a
        layer of shape ``(out, in)``; ValueError when the rows do not split."""
        m = self.block_re.match(fused_flat)
        if not m or m.group(3) not in self.fused or self.split is None:
            raise ValueError(f"{fused_flat} is not a fused module of {self.label}")
        kind, index, sub = m.groups()
        sizes = self.split(out, inp)
        if any(s <= 0 for s in sizes) or sum(sizes) != out:
            raise ValueError(f"{self.label} {sub} with {out} output rows for {inp} inputs does not split "
                             f"into {', '.join(self.fused[sub])}")
        return [(f"{kind}_{index}_{child}", size) for child, size in zip(self.fused[sub], sizes, strict=True)]

    def native(self, canonical: str) -> NativeSite | None:
        """Where a canonical path (flattened, without the component) lands in the native layout."""
        m = self.block_re.match(canonical)
        if m:
            kind, index, sub = m.groups()
            for fused, children in self.fused.items():
                if sub in children:
                    return NativeSite(f"{kind}_{index}_{fused}", children.index(sub))
            if sub not in self.block_subs:
                return None
            native = next((n for n, c in self.native_subs.items() if c == sub), sub)
            return NativeSite(f"{kind}_{index}_{native}")
        if canonical in self.top:
            return NativeSite(self.top[canonical])
        return None

    def rows(self, part: int, out: int, inp: int) -> slice:
        """The output rows of fused child ``part`` in a fused module of shape ``(out, in)``."""
        assert self.split is not None
        sizes = self.split(out, inp)
        start = sum(sizes[:part])
        return slice(start, start + sizes[part])

    def order(self, canonical: str) -> tuple[int, int, int] | None:
        """(stage, block, position) of a canonical path in the forward pass: stage 0 the top-level modules
        before the blocks, 1 + i the i-th block kind, then the modules after the blocks; None if not ours."""
        m = self.block_re.match(canonical)
        if m:
            kind, index, sub = m.groups()
            position = next((i for i, s in enumerate(self.block_subs) if sub.startswith(s)),
                            len(self.block_subs))
            return (1 + self.blocks.index(kind), int(index), position)
        if canonical in self.top:
            tops = list(self.top)
            stage = 1 + len(self.blocks) if canonical in self.after else 0
            return (stage, 0, tops.index(canonical))
        return None

