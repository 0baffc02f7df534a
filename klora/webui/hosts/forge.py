"""lllyasviel's Forge (the ``backend/`` architecture with Flux): canonical keys → Forge's modules, and the
hooks' memory announced to Forge's memory manager.

* **Modules.** ``p.sd_model`` is a ``ForgeDiffusionEngine``; the UNet or Flux transformer is
  ``forge_objects.unet.model.diffusion_model`` (SGM names for SD1.5/SDXL, renumbered by the checkpoint's own
  ``num_res_blocks``; BFL names for Flux), the text encoders are
  ``forge_objects.clip.cond_stage_model.{clip_l, clip_g, t5xxl}`` (HF names; SDXL's CLIP-G is an HF model
  here, so its q/k/v are plain Linears). Forge's ``Linear`` is not a ``torch.nn.Linear``
  (``backend/operations.py``), so modules are recognised by ``in_features``/``out_features``, which also give
  their shape (an NF4 weight's stored shape is packed). Flux keys land on output-row slices of the fused
  ``qkv``/``linear1`` (:mod:`klora.keys.flux`). Keys this does not place are offered to Forge's own key map
  (``backend/patcher/lora.py::model_lora_keys_unet``, always with a fresh dict) before they are reported.
* **Memory.** The hooks move the factors to the compute device in the compute dtype on first use; their size
  is announced with ``UnetPatcher.add_extra_preserved_memory_during_sampling`` on a clone of the UNet patcher
  set in ``process_before_every_sampling`` (``backend/patcher/unet.py``; Forge resets ``forge_objects`` before
  every pass, so nothing leaks into later generations), so model offloading keeps room for them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from klora import apply
from klora.apply import Target
from klora.keys import flat
from klora.keys import flux as flux_keys
from klora.keys import sd as sd_keys
from klora.webui.hosts.base import flag_family

if TYPE_CHECKING:
    from klora.webui.session import Setup

log = logging.getLogger("klora")

SUPPORTED: tuple[str, ...] = ("sd1", "sd2", "sdxl", "flux", "chroma")

# text encoders of Forge's CLIP patcher (backend/diffusion_engine/*.py build them with these names)
_TEXT_ENCODERS: dict[str, str] = {"te1": "clip_l", "te2": "clip_g", "te3": "t5xxl"}


def diffusion_model(sd_model: Any) -> nn.Module:
    """The UNet / Flux transformer module (``forge_objects.unet`` is a UnetPatcher around a KModel)."""
    return sd_model.forge_objects.unet.model.diffusion_model


def text_encoders(sd_model: Any) -> dict[str, nn.Module]:
    """Canonical component → text-encoder module (``te1`` CLIP-L, ``te2`` CLIP-G, ``te3`` T5-XXL)."""
    clip = getattr(sd_model.forge_objects, "clip", None)
    cond = getattr(clip, "cond_stage_model", None)
    out: dict[str, nn.Module] = {}
    for component, name in _TEXT_ENCODERS.items():
        module = getattr(cond, name, None) if cond is not None else None
        if isinstance(module, nn.Module):
            out[component] = module
    return out


def hookable(module: nn.Module) -> bool:
    """Linear-like (Forge's own ``Linear`` included, which subclasses ``nn.Module``) or a 2-D conv."""
    if isinstance(module, nn.Conv2d):
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def _te_name(component: str, flat_name: str) -> str | None:
    i = flat_name.find("encoder_block_" if component == "te3" else "text_model_")
    return flat_name[i:] if i >= 0 else None


def _flux_dims(model: nn.Module) -> tuple[int, int]:
    """(hidden, MLP width) of a BFL Flux model (Forge's model class has ``hidden_size``)."""
    hidden = getattr(model, "hidden_size", None)
    if not isinstance(hidden, int):
        hidden = int(model.get_submodule("double_blocks.0.img_attn.qkv").in_features)
    try:
        linear1 = model.get_submodule("single_blocks.0.linear1")
        mlp = int(linear1.out_features) - 3 * hidden
    except AttributeError:
        mlp = 4 * hidden
    return hidden, mlp


def build_targets(sd_model: Any, layer_keys: Iterable[str]) -> tuple[dict[str, Target], list[str]]:
    """Canonical key → :class:`~klora.apply.Target` in Forge's modules, and the keys not found."""
    wanted = list(dict.fromkeys(layer_keys))
    targets: dict[str, Target] = {}
    dm = diffusion_model(sd_model)
    components = {k.partition("/")[0] for k in wanted}
    if "unet" in components:
        # Forge builds the UNet from the checkpoint's config (backend/nn/unet.py, ``num_res_blocks`` per
        # level): renumber a non-standard layout; blocks the renumbering cannot express go to Forge's key map.
        renumber = sd_keys.sgm_renumbering(dm)
        index: dict[str, nn.Module] = {}
        for name, module in dm.named_modules():
            if name and hookable(module):
                flat_name = flat(name)
                if renumber is not None and sd_keys.is_sgm_name(flat_name):
                    flat_name = renumber(flat_name)
                    if flat_name is None:
                        continue  # left to Forge's key map
                index.setdefault(sd_keys.unet_key(flat_name), module)
        targets.update((key, Target(index[key])) for key in wanted if key in index)
    if flux_keys.COMPONENT in components and hasattr(dm, "double_blocks"):  # Flux layers on a Flux model only
        hidden, mlp = _flux_dims(dm)
        for key in wanted:
            t = flux_keys.bfl_target(key, hidden, mlp)
            if t is None:
                continue
            try:
                module = dm.get_submodule(t.module)
            except AttributeError:
                continue
            if hookable(module):
                targets[key] = Target(module, t.rows)
    for component, encoder in text_encoders(sd_model).items():
        if component not in components:
            continue
        te_index: dict[str, nn.Module] = {}
        for name, module in encoder.named_modules():
            te = _te_name(component, flat(name)) if name and hookable(module) else None
            if te is not None:
                te_index.setdefault(f"{component}/{te}", module)
        targets.update((key, Target(te_index[key])) for key in wanted if key in te_index)
    missing = [k for k in wanted if k not in targets]
    if missing:
        targets.update(forge_key_map_targets(sd_model, missing))
        missing = [k for k in wanted if k not in targets]
    return targets, missing


def forge_key_map_targets(sd_model: Any, missing: list[str]) -> dict[str, Target]:
    """Forge's own UNet key map for keys our resolution did not place (kohya spelling of the canonical
    name: ``lora_unet_<name>``, and OneTrainer's ``lora_transformer_<name>`` for Flux). Entries with a
    transform function (Forge's ``swap_scale_shift``) or an offset on another dimension are skipped."""
    try:
        from backend.patcher.lora import model_lora_keys_unet  # the host's
    except Exception:
        return {}
    candidates = [k for k in missing if k.partition("/")[0] in ("unet", flux_keys.COMPONENT)]
    if not candidates:
        return {}
    kmodel = sd_model.forge_objects.unet.model
    try:
        key_map = model_lora_keys_unet(kmodel, {})  # a fresh dict: Forge's default one is shared
    except Exception as err:  # a model Forge's key map does not know
        log.debug("K-LoRA: Forge's key map failed: %s", err)
        return {}
    out: dict[str, Target] = {}
    for key in candidates:
        component, _, name = key.partition("/")
        spellings = [f"lora_unet_{name}"]
        if component == flux_keys.COMPONENT:
            spellings.append(f"lora_transformer_{name}")
        entry = next((key_map[s] for s in spellings if s in key_map), None)
        if entry is None:
            continue
        rows: slice | None = None
        if isinstance(entry, tuple):
            if len(entry) != 2 or entry[1] is None:
                continue
            param, (dim, start, length) = entry
            if dim != 0:
                continue
            rows = slice(int(start), int(start) + int(length))
        else:
            param = entry
        if not isinstance(param, str) or not param.endswith(".weight"):
            continue
        try:
            module = kmodel.get_submodule(param[: -len(".weight")])
        except AttributeError:
            continue
        if hookable(module):
            out[key] = Target(module, rows)
    return out


class ForgeHost:
    name = "forge"

    def __init__(self, version: str | None = None) -> None:
        self.label = "Forge" + (f" {version}" if version else "")

    def family(self, model: Any) -> str:
        """By engine class (backend/diffusion_engine/*.py) and its ``is_sd*`` flags."""
        name = type(model).__name__
        if name in ("Flux", "Chroma"):
            return name.lower()
        if name == "StableDiffusionXLRefiner":
            return "sdxl-refiner"
        return flag_family(model) or name

    def refusal(self, model: Any) -> str | None:
        if self.family(model) in SUPPORTED:
            return None
        return f"K-LoRA does not support this model on Forge yet ({type(model).__name__})"

    def targets(self, model: Any, keys: Iterable[str]) -> dict[str, Target]:
        return build_targets(model, keys)[0]

    def before_sampling(self, p: Any, setup: Setup) -> None:
        """Tell Forge's memory manager what the denoiser hooks will hold, on a clone of the UNet patcher (the
        pass samples with ``p.sd_model.forge_objects.unet``)."""
        patcher = p.sd_model.forge_objects.unet
        if not (hasattr(patcher, "add_extra_preserved_memory_during_sampling") and hasattr(patcher, "clone")):
            return
        dtype = getattr(getattr(patcher, "model", None), "computation_dtype", None)
        dtype = dtype if isinstance(dtype, torch.dtype) else torch.float16
        nbytes = apply.hook_bytes(setup.plan, setup.content, setup.style, setup.unet_keys, dtype)
        if nbytes <= 0:
            return
        unet = patcher.clone()
        unet.add_extra_preserved_memory_during_sampling(nbytes)
        p.sd_model.forge_objects.unet = unet
