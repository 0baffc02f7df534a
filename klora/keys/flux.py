"""Flux module names: the canonical Flux keys (diffusers names) and where they land in a BFL-named model.

Canonical Flux keys use the component ``transformer`` and diffusers module names with '.' → '_'
(``transformer/transformer_blocks_0_attn_to_q``, ``transformer/single_transformer_blocks_3_proj_mlp``).

BFL-named models (Forge's, ComfyUI's) keep q, k, v *fused*: ``double_blocks.N.img_attn.qkv`` holds q, k, v of
the image stream in its output rows [0:H], [H:2H], [2H:3H]; ``txt_attn.qkv`` the same for the text stream
(diffusers ``add_{q,k,v}_proj``); ``single_blocks.N.linear1`` holds q, k, v and then the MLP input projection
(``proj_mlp``) in 3H + 4H rows. :func:`bfl_target` gives the module and rows of a canonical key.

One module has a different *row order* in the two namings: diffusers ``norm_out.linear`` is (scale, shift)
where BFL ``final_layer.adaLN_modulation.1`` is (shift, scale); its canonical key is the BFL one,
``transformer/final_layer_adaLN_modulation_1``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

COMPONENT = "transformer"
FLUX_HIDDEN = 3072
FLUX_MLP_HIDDEN = 12288

# ----------------------------------------------------------------------------------------------------
# Module names

# diffusers sub-module of transformer_blocks.N (underscored) → (BFL sub-module of double_blocks.N, part)
# part: index of the H-row slice of a fused qkv (0, 1, 2), or None for the whole module.
DOUBLE: dict[str, tuple[str, int | None]] = {
    "attn_to_q": ("img_attn.qkv", 0),
    "attn_to_k": ("img_attn.qkv", 1),
    "attn_to_v": ("img_attn.qkv", 2),
    "attn_add_q_proj": ("txt_attn.qkv", 0),
    "attn_add_k_proj": ("txt_attn.qkv", 1),
    "attn_add_v_proj": ("txt_attn.qkv", 2),
    "attn_to_out_0": ("img_attn.proj", None),
    "attn_to_add_out": ("txt_attn.proj", None),
    "ff_net_0_proj": ("img_mlp.0", None),
    "ff_net_2": ("img_mlp.2", None),
    "ff_context_net_0_proj": ("txt_mlp.0", None),
    "ff_context_net_2": ("txt_mlp.2", None),
    "norm1_linear": ("img_mod.lin", None),
    "norm1_context_linear": ("txt_mod.lin", None),
}
# diffusers sub-module of single_transformer_blocks.N → (BFL sub-module of single_blocks.N, part);
# part 3 = the MLP rows of linear1 (after the 3H qkv rows).
SINGLE: dict[str, tuple[str, int | None]] = {
    "attn_to_q": ("linear1", 0),
    "attn_to_k": ("linear1", 1),
    "attn_to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm_linear": ("modulation.lin", None),
}
# top-level diffusers module (underscored) → BFL module
TOP: dict[str, str] = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed_timestep_embedder_linear_1": "time_in.in_layer",
    "time_text_embed_timestep_embedder_linear_2": "time_in.out_layer",
    "time_text_embed_text_embedder_linear_1": "vector_in.in_layer",
    "time_text_embed_text_embedder_linear_2": "vector_in.out_layer",
    "time_text_embed_guidance_embedder_linear_1": "guidance_in.in_layer",
    "time_text_embed_guidance_embedder_linear_2": "guidance_in.out_layer",
}
FINAL_MOD = "final_layer_adaLN_modulation_1"  # canonical key (BFL row order), see the module docstring
NORM_OUT = "norm_out_linear"  # its diffusers spelling (scale, shift)

# fused BFL modules (underscored sub-module) → the diffusers children in row order
FUSED_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn_to_q", "attn_to_k", "attn_to_v"),
    "txt_attn_qkv": ("attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj"),
}
FUSED_SINGLE: dict[str, tuple[str, ...]] = {"linear1": ("attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp")}

BFL_DOUBLE_TO_DIFFUSERS = {bfl.replace(".", "_"): d for d, (bfl, part) in DOUBLE.items() if part is None}
BFL_SINGLE_TO_DIFFUSERS = {bfl.replace(".", "_"): d for d, (bfl, part) in SINGLE.items() if part is None}
BFL_TOP_TO_DIFFUSERS = {bfl.replace(".", "_"): d for d, bfl in TOP.items()}

RE_DIFF_DOUBLE = re.compile(r"^transformer_blocks_(\d+)_(.+)$")
RE_DIFF_SINGLE = re.compile(r"^single_transformer_blocks_(\d+)_(.+)$")
RE_BFL_DOUBLE = re.compile(r"^double_blocks_(\d+)_(.+)$")
RE_BFL_SINGLE = re.compile(r"^single_blocks_(\d+)_(.+)$")


@dataclass(frozen=True)
class BflSlice:
    """Where a canonical Flux layer lands in a BFL-named Flux model (Forge's, ComfyUI's).

    ``module``: dotted path below the diffusion model, e.g. ``double_blocks.3.img_attn.qkv``;
    ``rows``: the output-row slice of a fused module, or None for the whole module.
    """

    module: str
    rows: slice | None = None


def _part_rows(part: int, hidden: int, mlp_hidden: int) -> slice:
    if part < 3:
        return slice(part * hidden, (part + 1) * hidden)
    return slice(3 * hidden, 3 * hidden + mlp_hidden)


def bfl_target(key: str, hidden: int = FLUX_HIDDEN, mlp_hidden: int = FLUX_MLP_HIDDEN) -> BflSlice | None:
    """The BFL module (and output rows) of a canonical Flux key; None when it is not a Flux module.

    Fused canonical keys (``double_blocks_N_img_attn_qkv``, ``single_blocks_N_linear1``) map to the
    whole fused module.
    """
    component, _, name = key.partition("/")
    if component != COMPONENT:
        return None
    for pattern, table, blocks in ((RE_DIFF_DOUBLE, DOUBLE, "double_blocks"),
                                   (RE_DIFF_SINGLE, SINGLE, "single_blocks")):
        if m := pattern.match(name):
            entry = table.get(m.group(2))
            if entry is None:
                return None
            sub, part = entry
            return BflSlice(f"{blocks}.{m.group(1)}.{sub}",
                            None if part is None else _part_rows(part, hidden, mlp_hidden))
    if m := RE_BFL_DOUBLE.match(name):
        if m.group(2) in FUSED_DOUBLE:
            return BflSlice(f"double_blocks.{m.group(1)}.{m.group(2).replace('_attn_', '_attn.')}")
        return None
    if m := RE_BFL_SINGLE.match(name):
        if m.group(2) in FUSED_SINGLE:
            return BflSlice(f"single_blocks.{m.group(1)}.{m.group(2)}")
        return None
    if name in TOP:
        return BflSlice(TOP[name])
    if name == FINAL_MOD:
        return BflSlice("final_layer.adaLN_modulation.1")
    return None


def diffusers_module_name(key: str) -> str | None:
    """The dotted module path in diffusers' ``FluxTransformer2DModel`` of a canonical key.

    None for keys with no single diffusers module: fused BFL keys (split them first) and the final
    modulation (diffusers' ``norm_out.linear`` has the two halves of its rows swapped).
    """
    component, _, name = key.partition("/")
    if component != COMPONENT:
        return None
    if m := RE_DIFF_DOUBLE.match(name):
        sub = m.group(2)
        return f"transformer_blocks.{m.group(1)}.{_DIFFUSERS_DOTTED[sub]}" if sub in DOUBLE else None
    if m := RE_DIFF_SINGLE.match(name):
        sub = m.group(2)
        return f"single_transformer_blocks.{m.group(1)}.{_DIFFUSERS_DOTTED[sub]}" if sub in SINGLE else None
    if name in TOP:
        return _DIFFUSERS_DOTTED[name]
    return None


_DIFFUSERS_DOTTED = {
    "attn_to_q": "attn.to_q",
    "attn_to_k": "attn.to_k",
    "attn_to_v": "attn.to_v",
    "attn_add_q_proj": "attn.add_q_proj",
    "attn_add_k_proj": "attn.add_k_proj",
    "attn_add_v_proj": "attn.add_v_proj",
    "attn_to_out_0": "attn.to_out.0",
    "attn_to_add_out": "attn.to_add_out",
    "ff_net_0_proj": "ff.net.0.proj",
    "ff_net_2": "ff.net.2",
    "ff_context_net_0_proj": "ff_context.net.0.proj",
    "ff_context_net_2": "ff_context.net.2",
    "norm1_linear": "norm1.linear",
    "norm1_context_linear": "norm1_context.linear",
    "proj_mlp": "proj_mlp",
    "proj_out": "proj_out",
    "norm_linear": "norm.linear",
    "x_embedder": "x_embedder",
    "context_embedder": "context_embedder",
    "time_text_embed_timestep_embedder_linear_1": "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed_timestep_embedder_linear_2": "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed_text_embedder_linear_1": "time_text_embed.text_embedder.linear_1",
    "time_text_embed_text_embedder_linear_2": "time_text_embed.text_embedder.linear_2",
    "time_text_embed_guidance_embedder_linear_1": "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed_guidance_embedder_linear_2": "time_text_embed.guidance_embedder.linear_2",
}


def is_fused_key(key: str) -> bool:
    """True for canonical keys of fused BFL modules (split them with :func:`split_fused_layer`)."""
    component, _, name = key.partition("/")
    if component != COMPONENT:
        return False
    if m := RE_BFL_DOUBLE.match(name):
        return m.group(2) in FUSED_DOUBLE
    if m := RE_BFL_SINGLE.match(name):
        return m.group(2) in FUSED_SINGLE
    return False


def is_flux_key_set(keys: Iterable[str]) -> bool:
    """Cheap test on canonical keys: does this set of layers belong to a Flux transformer?"""
    return any(bfl_target(k) is not None for k in keys)

