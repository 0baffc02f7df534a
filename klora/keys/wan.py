"""Wan 2.x module names: canonical keys (diffusers' ``WanTransformer3DModel`` names) ↔ the native layout (the
official code's, ComfyUI's and Forge Neo's ``WanModel``, ``backend/nn/wan.py``), after diffusers'
``scripts/convert_wan_to_diffusers.py``.

``blocks.N``: ``self_attn.{q,k,v,o}`` ↔ ``attn1.{to_q,to_k,to_v,to_out.0}``, ``cross_attn.*`` ↔
``attn2.*`` (Wan 2.1 I2V also ``cross_attn.k_img/v_img`` ↔ ``attn2.add_k_proj/add_v_proj``),
``ffn.0``/``ffn.2`` ↔ ``ffn.net.0.proj``/``ffn.net.2``; nothing is fused. Top level: the time, text and
image embedders and ``head.head`` ↔ ``proj_out``. The Wan 2.2 A14B experts (high noise, low noise) share this
layout.
"""

from __future__ import annotations

from klora.keys.dit import DitFamily

_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out_0"}

WAN = DitFamily(
    name="wan",
    label="Wan",
    blocks=("blocks",),
    block_subs=("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
                "attn2_to_v", "attn2_add_k_proj", "attn2_add_v_proj", "attn2_to_out_0", "ffn_net_0_proj",
                "ffn_net_2"),
    native_subs={
        **{f"self_attn_{n}": f"attn1_{d}" for n, d in _ATTENTION.items()},
        **{f"cross_attn_{n}": f"attn2_{d}" for n, d in _ATTENTION.items()},
        "cross_attn_k_img": "attn2_add_k_proj",
        "cross_attn_v_img": "attn2_add_v_proj",
        "ffn_0": "ffn_net_0_proj",
        "ffn_2": "ffn_net_2",
    },
    top={
        "condition_embedder_time_embedder_linear_1": "time_embedding_0",
        "condition_embedder_time_embedder_linear_2": "time_embedding_2",
        "condition_embedder_time_proj": "time_projection_1",
        "condition_embedder_text_embedder_linear_1": "text_embedding_0",
        "condition_embedder_text_embedder_linear_2": "text_embedding_2",
        "condition_embedder_image_embedder_ff_net_0_proj": "img_emb_proj_1",
        "condition_embedder_image_embedder_ff_net_2": "img_emb_proj_3",
        "proj_out": "head_head",
    },
    after=frozenset({"proj_out"}),
)
