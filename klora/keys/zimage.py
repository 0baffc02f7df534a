"""Z-Image and Lumina 2 (NextDiT) module names: canonical keys (diffusers' ``ZImageTransformer2DModel`` names)
↔ the native layout (ComfyUI's and Forge Neo's ``NextDiT``, ``backend/nn/lumina.py``).

Blocks: ``context_refiner.N`` (caption tokens), ``noise_refiner.N`` (image tokens), then ``layers.N``, all
``JointTransformerBlock``. The native layout keeps q, k and v *fused* in ``attention.qkv`` (no bias), rows
``[q | k | v]`` with q = n_heads·head_dim = dim rows and k, v = n_kv_heads·head_dim each: Z-Image
(dim 3840, 30 heads, no GQA) splits 3840 | 3840 | 3840, Lumina 2 (dim 2304, 24 heads, 8 kv heads of 96)
2304 | 768 | 768. Diffusers names them ``attention.to_q/to_k/to_v`` and the output ``attention.to_out.0``
(native ``attention.out``). The rows are computed from the fused module's shape, (out, in) → (in, kv, kv)
with kv = (out − in) / 2, which holds for both (Neo's own key map gives every slice ``dim`` rows, wrong for
Lumina 2's k and v). Modulation: Z-Image ``adaLN_modulation.0``, Lumina 2 ``adaLN_modulation.1``;
``context_refiner`` blocks have none.
"""

from __future__ import annotations

from klora.keys.dit import DitFamily


def _qkv_rows(out: int, inp: int) -> tuple[int, int, int]:
    kv = (out - inp) // 2
    return inp, kv, kv


NEXTDIT = DitFamily(
    name="zimage",
    label="Z-Image / Lumina 2",
    blocks=("context_refiner", "noise_refiner", "layers"),
    block_subs=("adaLN_modulation_0", "adaLN_modulation_1", "attention_to_q", "attention_to_k",
                "attention_to_v", "attention_to_out_0", "feed_forward_w1", "feed_forward_w3",
                "feed_forward_w2"),
    native_subs={"attention_out": "attention_to_out_0"},
    fused={"attention_qkv": ("attention_to_q", "attention_to_k", "attention_to_v")},
    split=_qkv_rows,
    top={
        "t_embedder_mlp_0": "t_embedder_mlp_0",
        "t_embedder_mlp_2": "t_embedder_mlp_2",
        "cap_embedder_1": "cap_embedder_1",
        "all_x_embedder_2-1": "x_embedder",
        "all_final_layer_2-1_adaLN_modulation_1": "final_layer_adaLN_modulation_1",
        "all_final_layer_2-1_linear": "final_layer_linear",
    },
    after=frozenset({"all_final_layer_2-1_adaLN_modulation_1", "all_final_layer_2-1_linear"}),
)
