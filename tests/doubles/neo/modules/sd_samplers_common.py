"""Forge Neo's modules/sd_samplers_common.py (2.26): Forge's (the Forge double runs in this module first, and
A1111's before it) with Neo's ``apply_refiner``, which serves Wan 2.2's two experts: the LoRA names of the
prompt renamed for the refiner (``refiner_lora_replacement``), and a fast mode (``refiner_fast_sd``) that
loads the refiner's weights into the modules of the loaded model and sets ``ORIGINAL_CHECKPOINT`` until
modules/processing_scripts/refiner.py ``ScriptRefiner.postprocess`` loads the base weights back. The reloading
mode is Forge's switch (a new model through main_entry.checkpoint_change and forge_model_reload).

Left out: the switch by sigma (Neo's default; its CFGDenoiser passes ``sigma[0]``, the Forge layer's passes
none, so here it switches by steps as with ``refiner_use_steps``), the GGUF re-baking, the memory manager."""

from __future__ import annotations

from modules import extra_networks, sd_models, shared
from modules.shared import opts
from overlay import extend

forge = extend(globals())

ORIGINAL_CHECKPOINT: str | None = None


# modules/sd_samplers_common.py: _parse_replacements()
def _parse_replacements() -> list[tuple[str, str]]:
    replacements = []
    for entry in opts.refiner_lora_replacement.split("\n"):
        before, after = entry.split("=", 1)
        replacements.append((before.strip(), after.strip()))
    return replacements


# modules/sd_samplers_common.py: apply_lora_for_refiner(loras)
def apply_lora_for_refiner(loras):
    if not loras:
        return []
    lora_replacements = _parse_replacements()
    result = []
    for lora in loras:
        items = list(lora.items)
        for before, after in lora_replacements:
            items[0] = items[0].replace(before, after)
        result.append(extra_networks.ExtraNetworkParams(items))
    return result


# modules/sd_samplers_common.py: apply_refiner(cfg_denoiser, x, sigma) — by steps here (see the docstring)
def apply_refiner(cfg_denoiser, x):
    global ORIGINAL_CHECKPOINT
    p = cfg_denoiser.p
    if not (refiner_switch_at := p.refiner_switch_at):
        return False
    if refiner_switch_at > cfg_denoiser.step / cfg_denoiser.total_steps:
        return False
    if ORIGINAL_CHECKPOINT is not None:
        return False
    refiner_checkpoint_info = p.refiner_checkpoint_info
    if refiner_checkpoint_info is None or shared.sd_model.sd_checkpoint_info == refiner_checkpoint_info:
        return False
    if getattr(p, "enable_hr", False):
        return False  # "[Error]Refiner does not support Hires. fix"

    if not opts.refiner_fast_sd:
        if not p.disable_extra_networks:
            p.extra_network_data["lora"] = apply_lora_for_refiner(p.extra_network_data.pop("lora", None))
        return forge.apply_refiner(cfg_denoiser, x)  # reloads, activates the renamed networks, setup_conds

    p.extra_generation_params["Refiner"] = refiner_checkpoint_info.short_title
    p.extra_generation_params["Refiner switch at"] = refiner_switch_at
    sd_model = shared.sd_model
    model = sd_model.forge_objects.unet.model.diffusion_model
    # backend/utils.py load_torch_file(refiner_checkpoint_info.filename) → backend/state_dict.py
    # load_state_dict into the same modules; the file's weights stand in as the registered refiner's
    refiner = sd_models.loaded_models[refiner_checkpoint_info.title]
    ORIGINAL_CHECKPOINT = sd_model.sd_checkpoint_info.filename
    model.load_state_dict(refiner.forge_objects.unet.model.diffusion_model.state_dict())
    sd_model.current_lora_hash = str([])
    if not p.disable_extra_networks:
        p.extra_network_data["lora"] = apply_lora_for_refiner(p.extra_network_data.pop("lora", None))
        extra_networks.activate(p, p.extra_network_data)
    sampling_prepare(shared.sd_model.forge_objects.unet, x=x)  # noqa: F821 (imported by the Forge layer)
    sd_model.current_lora_hash = str([])
    return True
