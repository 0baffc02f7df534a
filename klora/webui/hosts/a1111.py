"""AUTOMATIC1111's webui (1.6 – 1.10): canonical keys → the modules of ``shared.sd_model``.

The UNet is ``sd_model.model.diffusion_model`` (SGM/ldm names, numbered by its own ``num_res_blocks``,
:func:`klora.keys.sd.module_targets`). Text encoders: SD1.5's HF CLIP at
``cond_stage_model.wrapped.transformer``, SDXL's CLIP-L at ``conditioner.embedders[0].wrapped.transformer``
are hooked like the UNet; SDXL's OpenCLIP bigG (``embedders[1].wrapped.model``) keeps q, k, v fused in
``nn.MultiheadAttention``, whose parts are targets with ``part`` set (:mod:`klora.mha`); its MLP layers are
plain Linears.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from klora.apply import Target
from klora.keys.sd import module_targets
from klora.mha import PARTS
from klora.webui.hosts.base import HostDefaults, flag_family

_RESBLOCK_ATTN = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.attn$")


def _inner(embedder: Any) -> Any:
    """The original embedder behind modules/sd_hijack_clip.py's wrapper (its ``.wrapped``)."""
    return getattr(embedder, "wrapped", embedder)


def _text_encoder_targets(embedder: Any, component: str) -> dict[str, Target]:
    inner = _inner(embedder)
    hf = getattr(inner, "transformer", None)
    if isinstance(hf, nn.Module) and any(n.startswith("text_model.") for n, _ in hf.named_modules()):
        # ldm/sgm FrozenCLIPEmbedder: the transformers CLIPTextModel
        return {key: Target(module) for key, module in module_targets(hf, component, "diffusers").items()}
    oc = getattr(inner, "model", None)
    if not (isinstance(oc, nn.Module) and hasattr(oc, "transformer")):
        return {}
    # sgm FrozenOpenCLIPEmbedder2 / ldm FrozenOpenCLIPEmbedder: an open_clip model
    out = {key: Target(module) for key, module in module_targets(oc, component, "sgm").items()}
    for name, module in oc.named_modules():
        m = _RESBLOCK_ATTN.search(name)
        if m and isinstance(module, nn.MultiheadAttention):
            for part in PARTS:
                out[f"{component}/text_model_encoder_layers_{m.group(1)}_self_attn_{part}_proj"] = Target(
                    module, part=part)
    return out


def model_targets(sd_model: Any) -> dict[str, Target]:
    """Canonical key → target of an A1111 SD1.x/SD2.x/SDXL model (UNet and text encoders)."""
    out = {key: Target(module)
           for key, module in module_targets(sd_model.model.diffusion_model, "unet", "sgm").items()}
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None and hasattr(conditioner, "embedders"):
        text = [e for e in conditioner.embedders
                if hasattr(_inner(e), "transformer") or hasattr(_inner(e), "model")]
        for i, embedder in enumerate(text[:2]):
            out.update(_text_encoder_targets(embedder, f"te{i + 1}"))
    elif getattr(sd_model, "cond_stage_model", None) is not None:
        out.update(_text_encoder_targets(sd_model.cond_stage_model, "te1"))
    return out


class A1111Host(HostDefaults):
    name = "a1111"

    def __init__(self, version: str | None = None) -> None:
        self.label = "AUTOMATIC1111 webui" + (f" {version}" if version else "")

    def family(self, model: Any) -> str:
        return flag_family(model) or "sd1"  # A1111's SD1 models carry no flag before 1.8

    def refusal(self, model: Any) -> str | None:
        return None  # a model without the modules is reported by the coverage check, with the counts

    def targets(self, model: Any, keys: Iterable[str]) -> dict[str, Target]:
        wanted = set(keys)
        return {key: t for key, t in model_targets(model).items() if key in wanted}

    def before_sampling(self, p: Any, setup: Any) -> None:
        pass
