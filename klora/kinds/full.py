"""LyCORIS full: the delta itself (``diff``) and optionally a bias delta (``diff_b``); no rank, no scale."""

from __future__ import annotations

import torch

from klora.kinds.base import KernelHint, Kind, dims, f32
from klora.layers import LoraFormatError, LoraLayer


class Full(Kind):
    name = "full"
    suffixes = ((".diff", "diff"), (".diff_b", "diff_b"))

    def build(self, path: str, key: str, file_key: str, tensors: dict[str, torch.Tensor],
              names: dict[str, str], alpha: float | None, kernel: KernelHint) -> LoraLayer:
        self.need(path, file_key, tensors, "diff")
        diff = tensors["diff"]
        bias = tensors.get("diff_b")
        if bias is not None and (bias.dim() != 1 or bias.shape[0] != diff.shape[0]):
            raise LoraFormatError(path, f"diff_b shape {dims(bias.shape)} does not fit diff "
                                        f"{dims(diff.shape)}",
                                  names.get("diff_b", file_key))
        if diff.dim() not in (2, 4):
            raise LoraFormatError(path, f"unsupported diff shape {dims(diff.shape)}",
                                  names.get("diff", file_key))
        return LoraLayer(key, file_key, self.name, tensors, None, None, dims(diff.shape))

    def product(self, layer: LoraLayer) -> torch.Tensor:
        return f32(layer.tensors["diff"]).clone()

    @staticmethod
    def bias(layer: LoraLayer) -> torch.Tensor | None:
        b = layer.tensors.get("diff_b")
        return None if b is None else f32(b)

    def rows(self, layer: LoraLayer, rows: slice, key: str, file_key: str) -> LoraLayer:
        tensors = {role: t[rows] for role, t in layer.tensors.items()}
        return LoraLayer(key, file_key, self.name, tensors, None, None, dims(tensors["diff"].shape))

    def hook_numel(self, layer: LoraLayer) -> int:
        b = layer.tensors.get("diff_b")
        return super().hook_numel(layer) + (0 if b is None else b.numel())
