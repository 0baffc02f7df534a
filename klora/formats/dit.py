"""File spellings of the DiT families named by a table (:mod:`klora.keys.dit`): Z-Image / Lumina 2,
Qwen-Image, Wan. One scheme per family, claiming a file by names only that family has.

Every spelling Forge Neo's loader maps (``modules_forge/packages/comfy/lora.py`` ``model_lora_keys_unet``) is
read, and the diffusers one besides: kohya/musubi ``lora_unet_<native, '_'>``, ComfyUI
``diffusion_model.<native>`` (also ``model.diffusion_model.``), diffusers/PEFT ``transformer.<diffusers>``
(also ``base_model.model.``), bare native or diffusers names (DiffSynth), SimpleTuner ``lycoris_<…, '_'>``,
OneTrainer ``lora_transformer_``, and the text encoders as ``text_encoders.<encoder>.…``
(:func:`klora.formats.scheme.host_text_encoder`). A layer of a fused native module (Z-Image's
``attention.qkv``) is split into its diffusers projections by output rows, as Flux's are
(:mod:`klora.formats.flux`), so content and style are always compared per q, k and v.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from klora.formats.scheme import (
    Located,
    Scheme,
    host_text_encoder,
    peft_location,
    split_rows,
    split_tensor_name,
)
from klora.keys.dit import COMPONENT, DitFamily
from klora.layers import LoraFormatError, LoraLayer

_FLAT_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")
_DOTTED_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")


@functools.lru_cache(maxsize=1 << 14)
def denoiser_path(module: str) -> str:
    """A file's module spelling with its denoiser prefix taken off, flattened ('.' → '_'): the path below the
    diffusion model, in whichever naming the file uses. (Neo renames ``lora_unet__`` to ``lora_unet_``.)"""
    for prefix in _FLAT_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    for prefix in _DOTTED_PREFIXES:
        if module.startswith(prefix):
            module = module[len(prefix):]
            break
    return module.replace(".", "_")


class DitScheme(Scheme):
    """The scheme of one :class:`~klora.keys.dit.DitFamily`."""

    def __init__(self, family: DitFamily) -> None:
        self.family = family
        self.name = family.name

    def claims(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        for name in shapes:
            found = split_tensor_name(name)
            if found is not None and self.family.proves(denoiser_path(found[0])):
                return True
        return False

    def locate(self, file_key: str, module: str) -> Located | None:
        te = host_text_encoder(file_key)
        if te is not None:
            return te
        found = self.family.canonical(denoiser_path(file_key))
        if found is None:
            return None
        path, fused = found
        prefix, peft_module = peft_location(file_key, ("transformer",))
        return Located(COMPONENT, path, prefix, peft_module, "fused" if fused else "plain")

    def finish(self, layer: LoraLayer, located: Located, path: str) -> list[LoraLayer]:
        if located.how != "fused":
            return [layer]
        try:
            children = self.family.children(located.module.replace(".", "_"), *layer.shape[:2])
        except ValueError as err:
            raise LoraFormatError(path, str(err), layer.file_key) from None
        return split_rows(layer, children)
