"""LoRA and LoCon: ``ΔW = up @ down`` (convs: a spatial ``down`` and a 1×1 ``up``), or with a Tucker/CP core
``ΔW[o,i,k,l] = Σ_ab up[o,a] · mid[a,b,k,l] · down[b,i]`` (LoCon ``lora_mid``). Rank: ``down``'s rows."""

from __future__ import annotations

from functools import partial

import torch

from klora.kinds.base import KernelHint, Kind, LowRank, dims, f32
from klora.layers import LoraLayer


class Lora(Kind):
    name = "lora"
    suffixes = (
        (".lora_down.weight", "down"),
        (".lora_up.weight", "up"),
        (".lora_mid.weight", "mid"),
        (".lora_linear_layer.down.weight", "down"),
        (".lora_linear_layer.up.weight", "up"),
        (".lora.down.weight", "down"),
        (".lora.up.weight", "up"),
        (".lora_A.weight", "down"),
        (".lora_B.weight", "up"),
    )

    def build(self, path: str, key: str, file_key: str, tensors: dict[str, torch.Tensor],
              names: dict[str, str], alpha: float | None, kernel: KernelHint) -> LoraLayer:
        self.need(path, file_key, tensors, "down", "up")
        bad = partial(self.error, path, file_key, names)
        down, up, mid = tensors["down"], tensors["up"], tensors.get("mid")


        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise bad(f"unsupported LoRA factor shapes down {dims(down.shape)}, up {dims(up.shape)}")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise bad(f"mismatched ranks: down has {rank} rows, up has {up.shape[1]} columns")
        if up.dim() == 4 and dims(up.shape[2:]) != (1, 1):
            raise bad(f"unsupported LoRA up factor with a {dims(up.shape[2:])} kernel", "up")
        if mid is not None:
            if (mid.dim() != 4 or mid.shape[0] != rank or mid.shape[1] != rank
                    or dims(down.shape[2:]) != (1, 1)):
                raise bad(f"LoCon Tucker factors do not fit: down {dims(down.shape)}, mid {dims(mid.shape)}",
                          "mid")
            shape = (up.shape[0], down.shape[1], *mid.shape[2:])
        else:
            shape = (up.shape[0], *down.shape[1:])
        return LoraLayer(key, file_key, self.name, tensors, alpha, int(rank), dims(shape))

    def factors(self, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor] | None:
        t = layer.tensors
        if "mid" in t:
            return None
        down = f32(t["down"])
        r = down.shape[0]
        return f32(t["up"]).reshape(t["up"].shape[0], r), down.reshape(r, -1)

    def product(self, layer: LoraLayer) -> torch.Tensor:
        pair = self.factors(layer)
        if pair is not None:
            return pair[0] @ pair[1]
        t = layer.tensors
        down = f32(t["down"])
        r = down.shape[0]
        up = f32(t["up"]).reshape(t["up"].shape[0], r)
        return torch.einsum("oa,ab...,bi->oi...", up, f32(t["mid"]), down.reshape(r, -1))

    def low_rank(self, layer: LoraLayer, strength: float) -> LowRank:
        t = layer.tensors
        mid = t.get("mid")
        return LowRank(down=f32(t["down"]).contiguous(),
                       up=(f32(t["up"]) * (float(strength) * layer.scale)).contiguous(),
                       mid=None if mid is None else f32(mid).contiguous())

    def hook_numel(self, layer: LoraLayer) -> int:
        return sum(t.numel() for t in layer.tensors.values())

    def rows(self, layer: LoraLayer, rows: slice, key: str, file_key: str) -> LoraLayer:
        up = layer.tensors["up"][rows]
        tensors = {**layer.tensors, "up": up}
        return LoraLayer(key, file_key, self.name, tensors, layer.alpha, layer.rank,
                         (int(up.shape[0]), *layer.shape[1:]))
