"""What every kind of LoRA layer answers, and the registry of the kinds.

A kind (one class per file: ``lora.py`` LoRA/LoCon, ``loha.py``, ``lokr.py``, ``full.py``) knows the
tensors it is stored as (their name suffixes and roles), checks them and derives the rank and the target
shape (:meth:`Kind.build`), forms its unscaled product ``U`` (:meth:`Kind.product`), gives low-rank factors
where it has them (:meth:`Kind.low_rank`) and says how many numbers a hook holds for it on the compute
device (:meth:`Kind.hook_numel`). Everything else asks the kind: the effective delta is
``strength · layer.scale · U`` for every kind (:mod:`klora.delta`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from klora.layers import LoraFormatError, LoraLayer

KernelHint = Callable[[int, int], tuple[int, ...]]
"""``(out, flat_in) → target shape`` for a conv whose kernel the file flattened into the input dimension
(from the layer's name, :func:`klora.keys.flattened_conv_shape`)."""


def f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(dtype=torch.float32)


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild: t (r1, r2, k…), wa (r1, out), wb (r2, in) → (out, in, k…)."""
    return torch.einsum("ij...,ip,jq->pq...", f32(t), f32(wa), f32(wb))


@dataclass(frozen=True)
class LowRank:
    """ΔW = up · [mid ·] down with strength × scale folded into ``up`` (float32).

    Linear: ``down`` (r, in), ``up`` (out, r). Conv: ``down`` (r, in, kh, kw), ``up`` (out, r, 1, 1).
    Tucker conv: ``down`` (r, in, 1, 1), ``mid`` (r, r, kh, kw), ``up`` (out, r, 1, 1) — applied as three
    convolutions (down 1×1, mid with the layer's stride/padding, up 1×1).
    """

    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None


class Kind:
    """Base class of the layer kinds; one instance per kind lives in :data:`klora.kinds.KINDS`."""

    name: ClassVar[str]
    suffixes: ClassVar[tuple[tuple[str, str], ...]]
    """(tensor-name suffix, role); the reader splits a file's tensor names with them."""

    def build(self, path: str, key: str, file_key: str, tensors: dict[str, torch.Tensor],
              names: dict[str, str], alpha: float | None, kernel: KernelHint) -> LoraLayer:
        """Check the tensors of one layer and make it; :class:`LoraFormatError` naming the tensor if they do
        not form a layer of this kind. ``names``: role → tensor name in the file (for messages)."""
        raise NotImplementedError

    def product(self, layer: LoraLayer) -> torch.Tensor:
        """The unscaled product ``U`` in float32, a new tensor (never a view of the layer's own), shaped
        ``(out, in·kh·kw)`` or ``layer.shape``."""
        raise NotImplementedError

    def factors(self, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(up, down)`` as float32 matrices with ``U = up @ down`` formed exactly as :meth:`product` forms
        it, where the kind is a plain two-factor product; None otherwise."""
        return None

    def low_rank(self, layer: LoraLayer, strength: float) -> LowRank | None:
        """Factors for the hooks (see :class:`LowRank`), strength × scale folded in; None: the hooks use the
        dense delta."""
        return None

    def hook_numel(self, layer: LoraLayer) -> int:
        """How many numbers the hooks hold on the compute device for this layer: its factors where it has
        low-rank ones, else the dense delta."""
        return math.prod(layer.shape)

    def rows(self, layer: LoraLayer, rows: slice, key: str, file_key: str) -> LoraLayer:
        """The layer whose delta is output rows ``rows`` of ``layer``'s (a fused module split into its
        projections), under a new key; alpha and rank are kept, so the host's scale is unchanged."""
        raise LoraFormatError(file_key, f"cannot split a {self.name} layer by output rows", key)

    def need(self, path: str, file_key: str, tensors: dict[str, torch.Tensor], *roles: str) -> None:
        missing = [r for r in roles if r not in tensors]
        if missing:
            raise LoraFormatError(path, f"incomplete {self.name} layer: missing {', '.join(missing)}",
                                  file_key)

    @staticmethod
    def error(path: str, file_key: str, names: dict[str, str], reason: str,
              role: str | None = None) -> LoraFormatError:
        """The refusal of a layer, naming the tensor of ``role`` when given, else the layer."""
        return LoraFormatError(path, reason, names.get(role, file_key) if role else file_key)


def dims(shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)
