"""The types every stage shares: a LoRA file read into canonical layers, and the one shape rule.

A canonical layer key names the patched module whatever the file's naming scheme:
``"<component>/<module path in diffusers/HF naming with '.' replaced by '_'>"``, e.g.
``unet/down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`` or
``te1/text_model_encoder_layers_0_self_attn_q_proj`` (:mod:`klora.keys`). Components: ``unet`` (an SD
UNet), ``transformer`` (a DiT such as Flux), ``te1``/``te2``/``te3`` (text encoders).

What a layer's tensors are, its rank and its delta are the business of its kind (:mod:`klora.kinds`);
which file spellings give which keys, of :mod:`klora.formats`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

__all__ = ["LoraFile", "LoraFormatError", "LoraLayer", "layout"]


class LoraFormatError(ValueError):
    """A LoRA file (or layer) we refuse, with the file, the offending key (if any) and the reason."""

    def __init__(self, path: str, reason: str, key: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.key = key
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + reason)


def layout(shape: Iterable[int]) -> tuple[int, ...]:
    """The shape a delta is compared by: a 1×1 convolution's ``(out, in, 1, 1)`` counts as ``(out, in)``.

    The one shape rule. Files store a 1×1 conv (SD1.5's ``proj_in``) either way (LoRA/LoCon 4-D, LoHa/LoKr
    flattened) and a Linear and a 1×1 conv compute the same map, so a content file and a style file, or a
    delta and a module, fit each other iff their layouts are equal."""
    shape = tuple(int(d) for d in shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One patched module of a LoRA file.

    ``kind`` names its class in :mod:`klora.kinds` (``lora``, ``loha``, ``lokr``, ``full``), which says
    what ``tensors`` hold (float tensors of the file's dtype, on the CPU). ``rank`` is the dimension the host
    divides alpha by and K = r_c·r_s uses; None for kinds without one. ``shape`` is the shape of the module
    weight the delta adds to.
    """

    key: str
    file_key: str
    kind: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    rank: int | None
    shape: tuple[int, ...]

    @property
    def scale(self) -> float:
        """The factor the host multiplies the raw product by: alpha/rank, or 1 without alpha or rank."""
        if self.alpha is None or not self.rank or self.alpha == 0:
            return 1.0
        return self.alpha / self.rank

    @property
    def layout(self) -> tuple[int, ...]:
        """:func:`layout` of the layer's shape."""
        return layout(self.shape)


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA file: canonical key → layer (in forward-pass order), plus what identifies the file."""

    path: str
    name: str
    sha256: str
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
