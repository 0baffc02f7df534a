"""Qwen-Image module names. Forge Neo's ``QwenImageTransformer2DModel`` (``backend/nn/qwen.py``) uses the
diffusers names, so canonical and native names are equal: ``transformer_blocks.N`` with separate
``attn.to_q/to_k/to_v`` (image stream), ``attn.add_q_proj/add_k_proj/add_v_proj`` (text stream),
``attn.to_out.0``, ``attn.to_add_out``, ``img_mlp``/``txt_mlp`` (``net.0.proj``, ``net.2``) and the
modulations ``img_mod.1``/``txt_mod.1``; 60 blocks of width 3072 in Qwen-Image.

Its attention names are diffusers' Flux names too (``transformer_blocks.N.attn.to_q`` …), with the same
canonical keys: only the MLP and modulation names prove that a file is for Qwen-Image. A file with attention
layers only is read by the Flux scheme (its evidence: a ``to_q`` of width 3072, Qwen-Image's width too), which
gives them the same keys.
"""

from __future__ import annotations

from klora.keys.dit import DitFamily

_OWN = ("img_mod", "txt_mod", "img_mlp", "txt_mlp")

QWEN_IMAGE = DitFamily(
    name="qwen-image",
    label="Qwen-Image",
    blocks=("transformer_blocks",),
    block_subs=("img_mod_1", "txt_mod_1", "attn_to_q", "attn_to_k", "attn_to_v", "attn_add_q_proj",
                "attn_add_k_proj", "attn_add_v_proj", "attn_to_out_0", "attn_to_add_out",
                "img_mlp_net_0_proj", "img_mlp_net_2", "txt_mlp_net_0_proj", "txt_mlp_net_2"),
    top={name: name for name in ("time_text_embed_timestep_embedder_linear_1",
                                 "time_text_embed_timestep_embedder_linear_2", "img_in", "txt_in",
                                 "norm_out_linear", "proj_out")},
    after=frozenset({"norm_out_linear", "proj_out"}),
    distinctive=lambda kind, index, sub: sub.startswith(_OWN),
)
