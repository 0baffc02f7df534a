"""SD1.x/SD2.x/SDXL file spellings (the default scheme): kohya (``lora_unet_``, ``lora_te_``/``lora_te1_``/
``lora_te2_``, diffusers or SGM block names), old diffusers (``<module>.lora.down.weight`` under
``unet.unet.``, ``unet.`` or nothing, ``text_encoder.…lora_linear_layer``, attention processors
``….processor.to_q_lora``), PEFT (``lora_A``/``lora_B`` under ``unet.``/``text_encoder.``/
``text_encoder_2.``/``transformer.``, ``base_model.model.``), LyCORIS (``lycoris_``) and ComfyUI's
text-encoder spelling (``text_encoders.clip_l.…``)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from klora.formats.scheme import Located, Scheme, Split, host_text_encoder

# diffusers attention-processor LoRA: `<attn>.processor.to_q_lora.down.weight`; text encoders
# `self_attn.to_q_lora.down.weight`.
_PROCESSOR_RE = re.compile(
    r"^(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
_DOTTED_PREFIXES: tuple[tuple[str, str, str], ...] = (
    # (file prefix, component, PEFT metadata prefix)
    ("unet.unet.", "unet", "unet"),
    ("unet.", "unet", "unet"),
    ("text_encoder_2.", "te2", "text_encoder_2"),
    ("text_encoder.", "te1", "text_encoder"),
    ("transformer.", "unet", "transformer"),
    ("model.diffusion_model.", "unet", ""),
    ("diffusion_model.", "unet", ""),
)
_KOHYA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
    ("lycoris_", "unet"),
)
_TE_PROCESSOR_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


class SdScheme(Scheme):
    name = "sd"

    def claims(self, shapes: Mapping[str, Sequence[int]]) -> bool:
        return True  # the default: tried last

    def split(self, name: str) -> Split | None:
        m = _PROCESSOR_RE.match(name)
        if m is None:
            return None
        return Split(name[: -len(f".{m['role']}.weight")], m["role"], f"{m['attn']}.{m['proj']}")

    def locate(self, file_key: str, module: str) -> Located:
        """The path is dotted for diffusers/PEFT keys (as PEFT's ``alpha_pattern`` matches it) and flattened
        for kohya keys; :func:`klora.keys.canonical_key` accepts both. ComfyUI's and Forge Neo's
        ``text_encoders.clip_l.…`` spelling lands on the same text-encoder keys."""
        te = host_text_encoder(file_key)
        if te is not None:
            return te
        for prefix, comp in _KOHYA_PREFIXES:
            if file_key.startswith(prefix):
                return Located(comp, file_key[len(prefix):])
        path = module or file_key
        path = path.removeprefix("base_model.model.")
        comp, meta_prefix = "", ""
        for prefix, c, mp in _DOTTED_PREFIXES:
            if path.startswith(prefix):
                comp, meta_prefix, path = c, mp, path[len(prefix):]
                break
        if not comp:
            comp = "te1" if path.startswith("text_model.") else "unet"
        if module:
            head, _, proj = path.rpartition(".")
            if comp == "unet":
                path = f"{head}.to_out.0" if proj == "to_out" else path
            else:
                path = f"{head}.{_TE_PROCESSOR_PROJ[proj]}"
        return Located(comp, path, meta_prefix, path)
