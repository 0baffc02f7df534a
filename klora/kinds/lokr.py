"""LyCORIS LoKr: ``ΔW = kron(w1, w2)`` with ``w1 = w1a @ w1b`` and ``w2 = w2a @ w2b`` (or the Tucker rebuild
with ``lokr_t2``) where the file stores factors instead of the full ``w1``/``w2``.

Rank: the decomposed factor's dim (``lokr_w1_b``'s rows, else ``lokr_w2_b``'s); None when both factors are
stored full (then the scale is 1, as in A1111, Forge and LyCORIS training).
"""

from __future__ import annotations

from functools import partial

import torch

from klora.kinds.base import KernelHint, Kind, dims, f32, tucker
from klora.layers import LoraLayer


class LoKr(Kind):
    name = "lokr"
    suffixes = (
        (".lokr_w1", "w1"),
        (".lokr_w1_a", "w1a"),
        (".lokr_w1_b", "w1b"),
        (".lokr_w2", "w2"),
        (".lokr_w2_a", "w2a"),
        (".lokr_w2_b", "w2b"),
        (".lokr_t2", "t2"),
    )

    def build(self, path: str, key: str, file_key: str, tensors: dict[str, torch.Tensor],
              names: dict[str, str], alpha: float | None, kernel: KernelHint) -> LoraLayer:
        t = tensors
        bad = partial(self.error, path, file_key, names)
        if "w1" not in t:
            self.need(path, file_key, t, "w1a", "w1b")
        if "w2" not in t:
            self.need(path, file_key, t, "w2a", "w2b")
        if "w1" in t:
            w1 = t["w1"]
            if w1.dim() != 2:
                raise bad(f"unsupported lokr_w1 shape {dims(w1.shape)}", "w1")
            a, c = w1.shape
        else:
            w1a, w1b = t["w1a"], t["w1b"]
            if w1a.dim() != 2 or w1b.dim() != 2 or w1a.shape[1] != w1b.shape[0]:
                raise bad(f"mismatched ranks: lokr_w1_a {dims(w1a.shape)}, lokr_w1_b {dims(w1b.shape)}")
            a, c = w1a.shape[0], w1b.shape[1]
        spatial: tuple[int, ...] | None = None
        if "w2" in t:
            w2 = t["w2"]
            b, d = w2.shape[0], w2.shape[1]
            spatial = dims(w2.shape[2:])
        elif "t2" in t:
            t2, w2a, w2b = t["t2"], t["w2a"], t["w2b"]
            # Tucker layout: w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw).
            if (t2.dim() < 3 or w2a.dim() != 2 or w2b.dim() != 2 or t2.shape[0] != w2a.shape[0]
                    or t2.shape[1] != w2b.shape[0]):
                raise bad("mismatched LoKr Tucker factor shapes")
            b, d = w2a.shape[1], w2b.shape[1]
            spatial = dims(t2.shape[2:])
        else:
            w2a, w2b = t["w2a"], t["w2b"]
            if w2a.dim() != 2 or w2a.shape[1] != w2b.shape[0]:
                raise bad(f"mismatched ranks: lokr_w2_a {dims(w2a.shape)}, lokr_w2_b {dims(w2b.shape)}")
            b = w2a.shape[0]
            d = w2b.shape[1]
            if w2b.dim() > 2:
                spatial = dims(w2b.shape[2:])
        shape = (a * b, c * d, *spatial) if spatial is not None else kernel(int(a * b), int(c * d))
        rank = int(t["w1b"].shape[0]) if "w1b" in t else int(t["w2b"].shape[0]) if "w2b" in t else None
        return LoraLayer(key, file_key, self.name, t, alpha, rank, dims(shape))

    def product(self, layer: LoraLayer) -> torch.Tensor:
        t = layer.tensors
        w1 = f32(t["w1"]) if "w1" in t else f32(t["w1a"]) @ f32(t["w1b"])
        if "w2" in t:
            w2 = f32(t["w2"])
        elif "t2" in t:
            w2 = tucker(t["t2"], t["w2a"], t["w2b"])
        else:
            w2b = f32(t["w2b"])
            w2 = f32(t["w2a"]) @ w2b.reshape(w2b.shape[0], -1)
        # kron of (a, c) with (b, d·kh·kw) orders columns as (c, d, kh, kw): the conv weight's layout.
        return torch.kron(w1, w2.reshape(w2.shape[0], -1))
