"""Mirror of modules_forge/main_entry.py (Forge dfdcbab6): the checkpoint choice and the loading parameters
that modules/sd_models.py forge_model_reload loads from. Additional modules and the UNet storage dtype are not
modelled (always none / automatic); the settings file is not written."""

from __future__ import annotations

from modules import sd_models, shared


# modules_forge/main_entry.py: refresh_model_loading_parameters()
def refresh_model_loading_parameters():
    from modules import processing

    checkpoint_info = sd_models.select_checkpoint()

    sd_models.model_data.forge_loading_parameters = dict(
        checkpoint_info=checkpoint_info,
        additional_modules=[],
        unet_storage_dtype=None,
    )

    processing.need_global_unload = True


# modules_forge/main_entry.py: checkpoint_change(ckpt_name, save=True, refresh=True) — True if it changed
def checkpoint_change(ckpt_name: str, save=True, refresh=True):
    new_ckpt_info = sd_models.get_closet_checkpoint_match(ckpt_name)
    current_ckpt_info = sd_models.get_closet_checkpoint_match(shared.opts.data.get("sd_model_checkpoint", ""))
    if new_ckpt_info == current_ckpt_info:
        return False

    shared.opts.set("sd_model_checkpoint", ckpt_name)

    if refresh:
        refresh_model_loading_parameters()
    return True
