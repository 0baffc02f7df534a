"""What a naming scheme tells the reader: which files it claims, extra tensor-name forms, what it refuses,
where a file key lands (component and module), and the last touch on a built layer (e.g. splitting a fused
layer into the per-projection layers the canonical keys name). Also the pieces several schemes share: the
generic split of a tensor name, the text-encoder spelling of ComfyUI-derived hosts, the PEFT location of a
file key and the row split of a fused layer."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from klora import kinds
from klora.layers import LoraLayer

PEFT_NAMED_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])\.[A-Za-z0-9_]+\.weight$")
"""PEFT with a named adapter: ``….lora_A.default.weight``."""


@functools.lru_cache(maxsize=1 << 14)
def split_tensor_name(name: str) -> tuple[str, str, str] | None:
    """(module, kind, role) of a tensor name by the kinds' suffixes and PEFT's named-adapter form; kind ""
    for ``.alpha``; None for other names. Cached: every scheme's ``claims`` asks it of every name."""
    for suffix, kind, role in kinds.SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], kind, role
    if name.endswith(".alpha"):
        return name[: -len(".alpha")], "", "alpha"
    m = PEFT_NAMED_RE.match(name)
    if m:
        return m["mod"], "lora", "down" if m["ab"] == "A" else "up"
    return None


@dataclass(frozen=True)
class Split:
    """A tensor name taken apart: the layer's file key, the tensor's role, and the module path when the
    name spells the module differently from the file key (diffusers attention processors)."""

    file_key: str
    role: str
    module: str = ""


_HOST_TEXT_ENCODERS = {"clip_l": "te1", "clip_g": "te2", "t5xxl": "te3", "umt5xxl": "te3"}


def host_text_encoder(file_key: str) -> Located | None:
    """ComfyUI's and Forge Neo's text-encoder spelling, ``text_encoders.<encoder>.<module path>``
    (``model_lora_keys_clip``): CLIP-L, CLIP-G and (U)MT5-XXL land on the components ``te1``, ``te2``,
    ``te3`` with the HF path below their ``transformer.``; any other encoder (``qwen3``, ``qwen25_7b`` …) on
    ``te_<encoder>`` with its own path. None for other keys."""
    if not file_key.startswith("text_encoders."):
        return None
    encoder, _, path = file_key[len("text_encoders."):].partition(".")
    if not encoder or not path:
        return None
    component = _HOST_TEXT_ENCODERS.get(encoder)
    if component is None:
        return Located(f"te_{encoder}", path)
    return Located(component, path.removeprefix("transformer."))


def peft_location(file_key: str, prefixes: Sequence[str]) -> tuple[str, str]:
    """(PEFT metadata prefix, dotted module path below it) of a file key under one of ``prefixes``
    (``transformer`` …), or ("", "") for keys under none."""
    prefix = next((p for p in prefixes if file_key.startswith(p + ".")), "")
    return prefix, file_key[len(prefix) + 1:] if prefix else ""


def split_rows(layer: LoraLayer, children: Sequence[tuple[str, int]]) -> list[LoraLayer]:
    """A fused-module layer as its children: consecutive output-row slices of the given sizes, each under its
    canonical key (``component/child``); the kind splits its tensors (:meth:`klora.kinds.base.Kind.rows`), so
    each child's delta is exactly those rows of the fused delta, alpha and rank kept."""
    component = layer.key.partition("/")[0]
    kind = kinds.of(layer)
    out, start = [], 0
    for child, size in children:
        rows = slice(start, start + size)
        start += size
        where = f"{layer.file_key}[{rows.start}:{rows.stop}]"
        out.append(kind.rows(layer, rows, f"{component}/{child}", where))
    return out


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
