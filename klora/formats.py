"""Read LoRA files into canonical layers.

A canonical layer key names the patched module independently of the file's naming scheme:
``"<component>/<module path in diffusers/HF naming with '.' replaced by '_'>"``, for example
``unet/down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`` or
``te1/text_model_encoder_layers_0_self_attn_q_proj``. Components: ``unet``, ``te1`` (SD1 text
encoder / SDXL CLIP-L), ``te2`` (SDXL OpenCLIP bigG).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

LayerKind = Literal["lora", "loha", "lokr", "full"]


class LoraFormatError(ValueError):
    """A LoRA file we refuse to read, with the file, the offending key (if any) and the reason."""

    def __init__(self, path: str, reason: str, key: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.key = key
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + reason)


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One patched module of a LoRA file.

    ``tensors`` uses kind-specific names (fp32 or the file's dtype, on the CPU):
      lora: ``down``, ``up``, optional ``mid`` (LoCon Tucker/CP for convs)
      loha: ``w1a``, ``w1b``, ``w2a``, ``w2b``, optional ``t1``, ``t2``
      lokr: ``w1`` or ``w1a``+``w1b``; ``w2`` or ``w2a``+``w2b``; optional ``t2``
      full: ``diff``, optional ``diff_b``
    ``rank`` is what K = r_c·r_s uses (see README, "What rank means"); ``None`` where the kind has none.
    ``shape`` is the shape of the module weight the delta adds to.
    """

    key: str
    file_key: str
    kind: LayerKind
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


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA file: canonical key → layer, plus what identifies the file."""

    path: str
    name: str
    sha256: str
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)
