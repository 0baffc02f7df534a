"""What a naming scheme tells the reader: which files it claims, extra tensor-name forms, what it refuses,
where a file key lands (component and module), and the last touch on a built layer (e.g. splitting a fused
layer into the per-projection layers the canonical keys name)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from klora.layers import LoraLayer


@dataclass(frozen=True)
class Split:
    """A tensor name taken apart: the layer's file key, the tensor's role, and the module path when the
    name spells the module differently from the file key (diffusers attention processors)."""

    file_key: str
    role: str
    module: str = ""


@dataclass(frozen=True)
class Located:
    """Where a file key lands: a component and a module path below it (dotted or flattened, see
    :func:`klora.keys.canonical_key`), the PEFT metadata prefix and the dotted module path PEFT's
    ``alpha_pattern`` matches, and a scheme-specific ``how`` for :meth:`Scheme.finish`."""

    component: str
    module: str
    peft_prefix: str = ""
    peft_module: str = ""
    how: str = "plain"


class Scheme:
    """Base class of the naming schemes (:mod:`klora.formats.sd`, :mod:`klora.formats.flux`)."""

    name: str = ""
    kinds: frozenset[str] | None = None
    """Layer kinds the scheme reads (None: all); others are refused with :attr:`kinds_reason`."""
    kinds_reason: str = ""

    def claims(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        """Whether a file, given as tensor name → shape (its header), is spelled in this scheme."""
        raise NotImplementedError

    def split(self, name: str) -> Split | None:
        """Tensor names of forms only this scheme has (the generic suffixes are tried after)."""
        return None

    def refuse(self, name: str) -> str | None:
        """Why a tensor of this scheme cannot be read faithfully, or None."""
        return None

    def locate(self, file_key: str, module: str) -> Located | None:
        """Where the layer ``file_key`` lands (``module``: the module path a :class:`Split` gave, or "");
        None when it names no module the scheme knows."""
        raise NotImplementedError

    def finish(self, layer: LoraLayer, located: Located, path: str) -> list[LoraLayer]:
        """The canonical layers of a built layer (by default the layer itself)."""
        return [layer]
