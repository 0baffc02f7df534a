"""Canonical layer keys: how a key is made from a component and a module path, which keys are text-encoder or
attention layers, and the one order of keys (the forward pass).

A canonical key is ``"<component>/<diffusers or HF module path with '.' → '_'>"``. Each model family's
module names live beside this: :mod:`klora.keys.sd` (SD UNets, SGM ↔ diffusers), :mod:`klora.keys.flux`
(Flux: BFL ↔ diffusers, fused rows), and the DiT families named by a table (:mod:`klora.keys.dit`):
:mod:`klora.keys.zimage` (Z-Image, Lumina 2), :mod:`klora.keys.qwen` (Qwen-Image), :mod:`klora.keys.wan`
(Wan). DiT denoisers share the component ``transformer``; keys of different families may share a name (Flux's
and Qwen-Image's diffusers attention names are the same), and a host maps them by the family it has loaded.
Text encoders: ``te1`` CLIP-L, ``te2`` CLIP-G, ``te3`` T5-XXL (and UMT5-XXL), and ``te_<name>`` for an encoder
known by its host name only (``te_qwen3``: Z-Image's Qwen3, HF ``model.layers.N…`` paths).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from klora.keys import sd
from klora.keys.dit import DitFamily
from klora.keys.qwen import QWEN_IMAGE
from klora.keys.wan import WAN
from klora.keys.zimage import NEXTDIT

__all__ = ["DIT_FAMILIES", "canonical_key", "flat", "is_attention", "is_text_encoder", "layer_order"]

DIT_FAMILIES: tuple[DitFamily, ...] = (NEXTDIT, QWEN_IMAGE, WAN)
"""The DiT families named by a table (:mod:`klora.keys.dit`); Flux has its own module."""

CLIP_COMPONENTS = ("te1", "te2")
"""Text encoders whose HF module paths start with ``text_model.`` (CLIP-L, OpenCLIP bigG as HF CLIP)."""


def flat(name: str) -> str:
    """A dotted module path in the flattened form canonical keys use."""
    return name.replace(".", "_")


def canonical_key(component: str, module_path: str) -> str:
    """Canonical key from a component and a module path (dotted or flattened, diffusers/HF or SGM).

    UNet names are converted to diffusers names; CLIP text-encoder paths get their ``text_model_`` head when
    the file left it out (transformers 5 saves PEFT adapters as ``encoder.layers.N…``, kohya writes
    ``text_model_encoder_layers_N…``: one layer, one key)."""
    name = flat(module_path)
    if component == "unet":
        return sd.unet_key(name)
    if component in CLIP_COMPONENTS and not name.startswith("text_model_"):
        name = "text_model_" + name
    return f"{component}/{name}"


def is_text_encoder(key: str) -> bool:
    """Text-encoder layers: components ``te1``, ``te2``, ``te3``…"""
    return key.partition("/")[0].startswith("te")


_ATTENTION = re.compile(r"(?:^|_)(?:attn\d*|attention)_to_(?:q|k|v|out_0)$")


def is_attention(key: str) -> bool:
    """The attention projections of scope ``attention``: ``to_q``, ``to_k``, ``to_v``, ``to_out_0`` of a
    denoiser attention module (UNet and Wan ``attn1``/``attn2``, Flux and Qwen-Image ``attn``, Z-Image
    ``attention``), as the official SDXL and Flux paths. Text-stream and image-conditioning projections
    (``add_q_proj`` …) are outside, as in the official SDXL path."""
    return _ATTENTION.search(key.partition("/")[2]) is not None


# ------------------------------------------------------------------------------------------ forward order


def _natural(text: str) -> tuple[Any, ...]:
    """Sort key that orders embedded numbers numerically (``layers_10`` after ``layers_9``)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", text)))


def _rank(name: str, order: tuple[str, ...]) -> int:
    return next((i for i, prefix in enumerate(order) if name.startswith(prefix)), len(order))


_IN_ORDER = ("time_embedding", "add_embedding", "conv_in")  # the time embedding runs before conv_in
_RESNET_ORDER = ("conv1", "time_emb_proj", "conv2", "conv_shortcut")
_ATTN_ORDER = ("to_q", "to_k", "to_v", "to_out")
_FF_ORDER = ("ff_net_0", "ff_net_2")
_TE_ORDER = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
             "self_attn_o_proj", "mlp_fc1", "mlp_fc2", "mlp_gate_proj", "mlp_up_proj", "mlp_down_proj")
_TE_LAYER = re.compile(r"(?:text_model_encoder_layers|model_layers|encoder_block)_(\d+)_(.*)")
# Flux's diffusers double blocks; Qwen-Image's share the name and the attention names (img/txt mod and mlp)
_FLUX_DOUBLE_ORDER = ("norm1_linear", "img_mod", "norm1_context_linear", "txt_mod", "attn_to_q", "attn_to_k",
                      "attn_to_v", "attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj", "attn_to_out",
                      "attn_to_add_out", "ff_net", "img_mlp", "ff_context_net", "txt_mlp")
_FLUX_SINGLE_ORDER = ("norm_linear", "proj_mlp", "attn_to_q", "attn_to_k", "attn_to_v", "proj_out")
_FLUX_IN_ORDER = ("x_embedder", "time_text_embed_timestep", "time_text_embed_guidance",
                  "time_text_embed_text", "context_embedder")
_FLUX_BLOCK = re.compile(
    r"(single_transformer_blocks|single_blocks|transformer_blocks|double_blocks)_(\d+)_(.*)")
_BIG = 10**6


def _unet_block(rest: str) -> tuple[int, ...]:
    """Position of a module inside a UNet down/mid/up block, as the forward pass meets it."""
    m = re.match(r"(resnets|attentions)_(\d+)_(.*)", rest)
    if m:
        j, sub = int(m.group(2)), m.group(3)
        if m.group(1) == "resnets":
            return (j, 0, _rank(sub, _RESNET_ORDER), 0, 0)
        if sub.startswith(("norm", "proj_in")):
            return (j, 1, 0, 0, 0)
        t = re.match(r"transformer_blocks_(\d+)_(.*)", sub)
        if t:
            a = re.match(r"attn(\d+)_(.*)", t.group(2))
            if a:
                return (j, 1, 1 + int(t.group(1)), int(a.group(1)), _rank(a.group(2), _ATTN_ORDER))
            return (j, 1, 1 + int(t.group(1)), 100, _rank(t.group(2), _FF_ORDER))
        return (j, 1, _BIG, 0, 0)  # proj_out and anything after the transformer blocks
    m = re.match(r"(downsamplers|upsamplers)_(\d+)_", rest)
    if m:
        return (_BIG, int(m.group(2)), 0, 0, 0)
    return (_BIG + 1, 0, 0, 0, 0)


def _denoiser(component: str, path: str) -> tuple[int, int, tuple[int, ...]]:
    """(stage, block, position) of a denoiser module: stage 0 in, 1 down/double, 2 mid/single, 3 up, 4 out."""
    if component == "transformer":
        m = _FLUX_BLOCK.match(path)
        if m:
            single = m.group(1).startswith("single")
            order = _FLUX_SINGLE_ORDER if single else _FLUX_DOUBLE_ORDER
            return (2 if single else 1, int(m.group(2)), (_rank(m.group(3), order),))
        if re.match(r"(norm_out|proj_out|final_layer)", path):
            return (4, 0, ())
        flux_in = _rank(path, _FLUX_IN_ORDER)
        if flux_in == len(_FLUX_IN_ORDER):  # not a Flux input module: maybe another family's
            for family in DIT_FAMILIES:
                found = family.order(path)
                if found is not None:
                    stage, block, position = found
                    return (stage, block, (position,))
        return (0, 0, (flux_in,))
    m = re.match(r"(down|up)_blocks_(\d+)_(.*)", path)
    if m:
        return (1 if m.group(1) == "down" else 3, int(m.group(2)), _unet_block(m.group(3)))
    if path.startswith("mid_block_"):
        return (2, 0, _unet_block(path[len("mid_block_"):]))
    if re.match(r"(conv_norm_out|conv_out)", path):
        return (4, 0, ())
    return (0, 0, (_rank(path, _IN_ORDER),))


@functools.lru_cache(maxsize=1 << 16)
def layer_order(key: str) -> tuple[Any, ...]:
    """Sort key putting canonical keys in forward-pass order: the text encoders (te1, te2, te3: q, k, v, out,
    fc1, fc2 per layer), then the denoiser (a UNet's in, down, mid, up, out blocks; Flux's in, double,
    single, out blocks; the DiT families' blocks in their order; module by module as the forward pass calls
    them). Names it does not know sort naturally (numbers as numbers) after the known ones of their block."""
    component, _, path = key.partition("/")
    if component.startswith("te"):
        m = _TE_LAYER.match(path)
        inner = (int(m.group(1)), _rank(m.group(2), _TE_ORDER)) if m else (_BIG, 0)
        return (0, component, 0, 0, inner, _natural(path))
    stage, block, position = _denoiser(component, path)
    return (1, component, stage, block, position, _natural(path))
