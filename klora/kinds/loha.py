"""LyCORIS LoHa: ``ΔW = (w1a @ w1b) ⊙ (w2a @ w2b)``; with Tucker cores (``hada_t1``/``hada_t2``) each factor
is ``Σ_ij t[i,j,k,l] · wa[i,o] · wb[j,c]`` (``wa`` (r, out), ``wb`` (r, in)) before the Hadamard product.

Rank: ``hada_w1_b``'s rows, the trained "dim" (the product can reach rank r², but the hosts divide alpha by
r, so K uses r as for LoRA). Without Tucker cores a conv's kernel is flattened into the input dimension.
"""

from __future__ import annotations

import math
from functools import partial

import torch

from klora.kinds.base import KernelHint, Kind, dims, f32, tucker
from klora.layers import LoraLayer


class LoHa(Kind):
    name = "loha"
    suffixes = (
        (".hada_w1_a", "w1a"),
        (".hada_w1_b", "w1b"),
        (".hada_w2_a", "w2a"),
        (".hada_w2_b", "w2b"),
        (".hada_t1", "t1"),
        (".hada_t2", "t2"),
    )

    def build(self, path: str, key: str, file_key: str, tensors: dict[str, torch.Tensor],
              names: dict[str, str], alpha: float | None, kernel: KernelHint) -> LoraLayer:
        self.need(path, file_key, tensors, "w1a", "w1b", "w2a", "w2b")
        bad = partial(self.error, path, file_key, names)


        if ("t1" in tensors) != ("t2" in tensors):
            raise bad("LoHa Tucker layer needs both hada_t1 and hada_t2")
        w1a, w1b, w2a, w2b = (tensors[r] for r in ("w1a", "w1b", "w2a", "w2b"))
        rank = w1b.shape[0]
        if "t1" in tensors:
            t1, t2 = tensors["t1"], tensors["t2"]
            # Tucker layout: w*_a (r, out), w*_b (r, in), t (r, r, kh, kw).
            ok = (w1a.dim() == w1b.dim() == w2a.dim() == w2b.dim() == 2 and t1.dim() == t2.dim() >= 3
                  and w1a.shape[0] == t1.shape[0] and rank == t1.shape[1]
                  and w2a.shape[0] == t2.shape[0] and w2b.shape[0] == t2.shape[1]
                  and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1]
                  and t1.shape[2:] == t2.shape[2:])
            if not ok:
                raise bad("mismatched LoHa Tucker factor shapes")
            shape = (w1a.shape[1], w1b.shape[1], *t1.shape[2:])
        else:
            if w1a.dim() != 2 or w2a.dim() != 2:
                raise bad("unsupported LoHa factor shapes")
            if w1a.shape[1] != rank or w2a.shape[1] != w2b.shape[0]:
                raise bad(f"mismatched ranks: hada_w1_a {dims(w1a.shape)}, hada_w1_b {dims(w1b.shape)}, "
                          f"hada_w2_a {dims(w2a.shape)}, hada_w2_b {dims(w2b.shape)}")
            in1, in2 = math.prod(w1b.shape[1:]), math.prod(w2b.shape[1:])
            if w1a.shape[0] != w2a.shape[0] or in1 != in2:
                raise bad("the two LoHa products have different shapes")
            shape = (w1a.shape[0], *w1b.shape[1:]) if w1b.dim() > 2 else kernel(int(w1a.shape[0]), int(in1))
        return LoraLayer(key, file_key, self.name, tensors, alpha, int(rank), dims(shape))

    def product(self, layer: LoraLayer) -> torch.Tensor:
        t = layer.tensors
        if "t1" in t:
            return tucker(t["t1"], t["w1a"], t["w1b"]) * tucker(t["t2"], t["w2a"], t["w2b"])
        w1b, w2b = f32(t["w1b"]), f32(t["w2b"])
        p1 = f32(t["w1a"]) @ w1b.reshape(w1b.shape[0], -1)
        p2 = f32(t["w2a"]) @ w2b.reshape(w2b.shape[0], -1)
        return p1 * p2

    def rows(self, layer: LoraLayer, rows: slice, key: str, file_key: str) -> LoraLayer:
        t = layer.tensors
        if "t1" in t:  # Tucker: the output dimension sits in the cores' contraction
            return super().rows(layer, rows, key, file_key)
        tensors = {**t, "w1a": t["w1a"][rows], "w2a": t["w2a"][rows]}
        return LoraLayer(key, file_key, self.name, tensors, layer.alpha, layer.rank,
                         (int(tensors["w1a"].shape[0]), *layer.shape[1:]))
