"""One class per kind of LoRA layer, and the registry the other stages ask (see :mod:`klora.kinds.base`).

Adding a kind: a module with a :class:`~klora.kinds.base.Kind` subclass (its tensor suffixes, ``build``,
``product`` and, if it has them, low-rank factors), listed in :data:`KINDS`.
"""

from __future__ import annotations

from klora.kinds.base import Kind, LowRank
from klora.kinds.full import Full
from klora.kinds.loha import LoHa
from klora.kinds.lokr import LoKr
from klora.kinds.lora import Lora
from klora.layers import LoraLayer

KINDS: dict[str, Kind] = {k.name: k for k in (Lora(), LoHa(), LoKr(), Full())}

SUFFIXES: tuple[tuple[str, str, str], ...] = tuple(sorted(
    ((suffix, kind.name, role) for kind in KINDS.values() for suffix, role in kind.suffixes),
    key=lambda item: -len(item[0])))
"""(tensor-name suffix, kind, role) of every kind, longest suffix first (``.lora_down.weight`` before
``.down.weight`` spellings, ``.diff_b`` before ``.diff``)."""


def of(layer: LoraLayer) -> Kind:
    """The kind of ``layer``."""
    return KINDS[layer.kind]


__all__ = ["KINDS", "SUFFIXES", "Kind", "LowRank", "of"]
