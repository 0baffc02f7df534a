"""Flux file spellings → canonical Flux layers (see :mod:`klora.keys.flux` for the canonical names).

Read: diffusers/PEFT (``transformer.`` + diffusers names, ``lora_A``/``lora_B``), kohya/sd-scripts
(``lora_unet_double_blocks_0_img_attn_qkv``), BFL-native (``[diffusion_model.]double_blocks.0.img_attn.qkv``,
and Forge Neo's ``single_blocks.N.linear1_qkv`` for the q, k, v rows of ``linear1`` only), OneTrainer
(``lora_transformer_``), SimpleTuner LyCORIS-LoRA (``lycoris_``) and XLabs
(``double_blocks.0.processor.qkv_lora1``; no alpha, scale 1); text encoders ``text_encoder.``/``lora_te1_``
(CLIP-L, ``te1``), ``text_encoder_2.``/``lora_te3_``/``lora_te2_encoder_…`` and, for Chroma (T5 only, which
Neo numbers first), ``lora_te1_encoder_…`` (T5-XXL, ``te3``), and ComfyUI's ``text_encoders.<encoder>.…``.

A layer of a fused BFL module (``img_attn.qkv``, ``txt_attn.qkv``, ``linear1``) is split into the diffusers
row slices (q, k, v, proj_mlp): the up matrix's rows are divided, the down matrix is shared, alpha and rank
are kept, so each slice's delta is exactly the matching rows of the fused delta. Every Flux file of every
spelling so lands on the same diffusers granularity, and a content and a style LoRA are always compared per
q, k, v, proj_mlp (as the official K-LoRA code, which works on diffusers modules). Diffusers'
``norm_out.linear`` is read with its two row halves swapped into BFL's (shift, scale) order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from klora.formats.dit import denoiser_path
from klora.formats.scheme import (
    Located,
    Scheme,
    Split,
    host_text_encoder,
    peft_location,
    split_rows,
    split_tensor_name,
)
from klora.keys import flux as fk
from klora.layers import LoraFormatError, LoraLayer

_RE_XLABS = re.compile(
    r"^(double_blocks|single_blocks)\.(\d+)\.processor\."
    r"(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)$"
)
_RE_FLUX_BLOCK = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d")
# kinds and variants we cannot read faithfully for Flux (regex searched in the tensor name), with the reason
_REFUSED: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), reason)
    for pattern, reason in (
        (r"\.hada_", "LyCORIS LoHa is not supported for Flux"),
        (r"\.lokr_", "LyCORIS LoKr is not supported for Flux"),
        (r"\.diff(_b)?$", "full-weight (diff) layers are not supported for Flux"),
        (r"\.lora_mid\.weight$", "Tucker (lora_mid) layers are not supported for Flux"),
        (r"\.lora_[AB]\.bias$", "bias LoRAs (BFL control LoRAs such as Canny/Depth) are not supported"),
        (r"\.set_weight$|_norm\.scale$", "weight replacement (BFL control LoRAs) is not supported"),
    )
)
_PEFT_PREFIXES = ("transformer", "text_encoder", "text_encoder_2")


def _strip(s: str, *prefixes: str) -> str | None:
    for p in prefixes:
        if s.startswith(p):
            return s[len(p):]
    return None


def _transformer(name: str) -> Located | None:
    """``name``: underscored module path below the transformer, diffusers or BFL naming."""
    c = fk.COMPONENT
    if m := fk.RE_DIFF_DOUBLE.match(name):
        return Located(c, name) if m.group(2) in fk.DOUBLE else None
    if m := fk.RE_DIFF_SINGLE.match(name):
        return Located(c, name) if m.group(2) in fk.SINGLE else None
    for pattern, fused, plain, blocks in ((fk.RE_BFL_DOUBLE, fk.FUSED_DOUBLE, fk.BFL_DOUBLE_TO_DIFFUSERS,
                                           "transformer_blocks"),
                                          (fk.RE_BFL_SINGLE, fk.FUSED_SINGLE, fk.BFL_SINGLE_TO_DIFFUSERS,
                                           "single_transformer_blocks")):
        if m := pattern.match(name):
            i, sub = m.groups()
            if sub in fused:
                return Located(c, name, how="fused")
            if sub == "linear1_qkv" and blocks == "single_transformer_blocks":
                return Located(c, f"single_blocks_{i}_linear1", how="qkv3")
            return Located(c, f"{blocks}_{i}_{plain[sub]}") if sub in plain else None
    if name in fk.TOP:
        return Located(c, name)
    if name in fk.BFL_TOP_TO_DIFFUSERS:
        return Located(c, fk.BFL_TOP_TO_DIFFUSERS[name])
    if name == fk.FINAL_MOD:
        return Located(c, fk.FINAL_MOD)
    if name == fk.NORM_OUT:
        return Located(c, fk.FINAL_MOD, how="swap")
    return None


def _resolve(module: str) -> Located | None:
    """A file's module spelling → where it lands, without the PEFT fields; None when it is no Flux module."""
    c = fk.COMPONENT
    if m := _RE_XLABS.match(_strip(module, "diffusion_model.") or module):
        kind, i, proc = m.groups()
        if kind == "double_blocks":
            stream = "img" if proc.endswith("1") else "txt"
            if proc.startswith("qkv"):
                return Located(c, f"double_blocks_{i}_{stream}_attn_qkv", how="fused")
            sub = "attn_to_out_0" if stream == "img" else "attn_to_add_out"
            return Located(c, f"transformer_blocks_{i}_{sub}")
        if proc == "qkv_lora":
            return Located(c, f"single_blocks_{i}_linear1", how="qkv3")
        if proc == "proj_lora":
            return Located(c, f"single_transformer_blocks_{i}_proj_out")
        return None
    if (te := host_text_encoder(module)) is not None:
        return te
    if (rest := _strip(module, "text_encoder.")) is not None:
        return Located("te1", rest.replace(".", "_"))
    if (rest := _strip(module, "text_encoder_2.")) is not None:
        return Located("te3", rest.replace(".", "_"))
    if (rest := _strip(module, "lora_te1_")) is not None:
        return Located("te3" if rest.startswith("encoder_") else "te1", rest)
    if (rest := _strip(module, "lora_te3_")) is not None:
        return Located("te3", rest)
    if (rest := _strip(module, "lora_te2_")) is not None:
        # Forge maps lora_te2_ to T5 for Flux (OneTrainer writes T5 there); CLIP-L is te1.
        return Located("te3", rest) if rest.startswith("encoder_") else None
    return _transformer(denoiser_path(module))


def _foreign_block(module: str) -> bool:
    """A ``transformer_blocks.N`` module that Flux's double blocks do not have (Qwen-Image's ``img_mlp``,
    ``txt_mod``): the file is another DiT's even where its attention has Flux's names and width."""
    m = fk.RE_DIFF_DOUBLE.match(denoiser_path(module))
    return m is not None and m.group(2) not in fk.DOUBLE


def _evidence(module: str, located: Located | None, down_shape: Sequence[int] | None) -> bool:
    """Block-level evidence that a file is for Flux (and not SD3/AuraFlow, which share diffusers names)."""
    if _RE_FLUX_BLOCK.search(module):
        return True
    if (located is None or located.component != fk.COMPONENT
            or not located.module.startswith("transformer_blocks_")):
        return False
    q = located.module.endswith(("_attn_to_q", "_attn_to_k", "_attn_to_v"))
    return q and down_shape is not None and len(down_shape) == 2 and down_shape[1] == fk.FLUX_HIDDEN


def _split_suffix(name: str) -> tuple[str, str] | None:
    """(module, role) of a tensor name by the generic LoRA suffixes and XLabs' ``.down.weight``."""
    split = FluxScheme().split(name)
    if split is not None:
        return split.file_key, split.role
    found = split_tensor_name(name)
    return (found[0], found[2]) if found is not None and found[1] == "lora" else None


def looks_like_flux(shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether a state dict, given as tensor name → shape (a safetensors header), is a Flux LoRA: names and
    shapes only, decided before any tensor is loaded."""
    downs: dict[str, Sequence[int]] = {}
    for key, shape in shapes.items():
        if _RE_FLUX_BLOCK.search(key):
            return True
        parsed = _split_suffix(key)
        if parsed is not None and parsed[1] == "down":
            downs[parsed[0]] = shape
    if any(_foreign_block(m) for m in downs):
        return False
    return any(_evidence(m, _resolve(m), shape) for m, shape in downs.items())


class FluxScheme(Scheme):
    name = "flux"

    def claims(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        return looks_like_flux(shapes)

    def split(self, name: str) -> Split | None:
        for suffix, role in ((".down.weight", "down"), (".up.weight", "up")):  # XLabs
            if name.endswith(suffix) and ".processor." in name and not name.endswith(f".lora{suffix}"):
                return Split(name[: -len(suffix)], role)
        return None

    def refuse(self, name: str) -> str | None:
        return next((why for marker, why in _REFUSED if marker.search(name)), None)

    def locate(self, file_key: str, module: str) -> Located | None:
        located = _resolve(file_key)
        if located is None:
            return None
        prefix, peft_module = peft_location(file_key, _PEFT_PREFIXES)
        return Located(located.component, located.module, prefix, peft_module, located.how)

    def finish(self, layer: LoraLayer, located: Located, path: str) -> list[LoraLayer]:
        if located.how == "swap":  # diffusers (scale, shift) → BFL (shift, scale)
            up = layer.tensors["up"]
            half = up.shape[0] // 2
            tensors = {**layer.tensors, "up": torch.cat([up[half:], up[:half]])}
            return [LoraLayer(layer.key, layer.file_key, layer.kind, tensors, layer.alpha, layer.rank,
                              layer.shape)]
        if located.how in ("fused", "qkv3"):
            return split_fused_layer(layer, path, qkv_only=located.how == "qkv3")
        return [layer]


def split_fused_layer(layer: LoraLayer, path: str = "", qkv_only: bool = False) -> list[LoraLayer]:
    """A fused-module layer (``double_blocks_N_img_attn_qkv``, ``…_txt_attn_qkv``,
    ``single_blocks_N_linear1``) as its diffusers row slices (``qkv_only``: XLabs' single-block qkv LoRA,
    which covers only the first 3H rows of ``linear1``)."""
    name = layer.key.partition("/")[2]
    hidden, rows = layer.shape[1], layer.shape[0]
    where = path or layer.key
    if m := fk.RE_BFL_DOUBLE.match(name):
        block, prefix, names = m.group(1), "transformer_blocks", fk.FUSED_DOUBLE[m.group(2)]
        if rows != 3 * hidden:
            raise LoraFormatError(where, f"fused qkv LoRA with {rows} rows, expected {3 * hidden}",
                                  layer.file_key)
        sizes = [hidden] * 3
    elif m := fk.RE_BFL_SINGLE.match(name):
        block, prefix, names = m.group(1), "single_transformer_blocks", fk.FUSED_SINGLE[m.group(2)]
        if qkv_only:
            if rows != 3 * hidden:
                raise LoraFormatError(where, f"XLabs qkv LoRA with {rows} rows, expected {3 * hidden}",
                                      layer.file_key)
            names, sizes = names[:3], [hidden] * 3
        else:
            if rows <= 3 * hidden:
                raise LoraFormatError(where, f"linear1 LoRA with {rows} rows, expected more than "
                                             f"{3 * hidden}",
                                      layer.file_key)
            sizes = [hidden] * 3 + [rows - 3 * hidden]
    else:
        raise ValueError(f"{layer.key} is not a fused Flux module")
    return split_rows(layer, [(f"{prefix}_{block}_{child}", size)
                              for child, size in zip(names, sizes, strict=True)])
