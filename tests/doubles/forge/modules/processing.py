"""Forge's modules/processing.py (lllyasviel/stable-diffusion-webui-forge dfdcbab6), which is A1111 v1.10.1's
with changes. The A1111 double (tests/doubles/a1111/modules/processing.py) runs in this module and its
``FORGE`` switch is turned on: each ``if FORGE`` there is a line Forge changes inside a function the two
share (forge_objects reset before every batch and sampling pass, sd_models.forge_model_reload per batch, no
negative conditioning at CFG 1, the hires conds made during the first pass). Defined here: what Forge adds
or replaces whole — three-slot conditioning caches, clear_prompt_cache, manage_model_and_prompt_cache and the
process_images that calls it.

Not modelled (as in the A1111 double): settings overrides, hires checkpoints and modules, token merging,
distilled CFG and hr_cfg.
"""

from __future__ import annotations

from modules import sd_models
from overlay import extend

a1111 = extend(globals())

FORGE = True

# modules/processing.py: StableDiffusionProcessing.cached_uc / cached_c and StableDiffusionProcessingTxt2Img
# .cached_hr_uc / cached_hr_c — Forge's have a third slot (the prompt's extra generation params)
a1111.StableDiffusionProcessing.cached_uc = [None, None, None]
a1111.StableDiffusionProcessing.cached_c = [None, None, None]
a1111.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None, None]
a1111.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None, None]


# modules/processing.py: StableDiffusionProcessing.clear_prompt_cache()
def clear_prompt_cache(self):
    self.cached_c = [None, None, None]
    self.cached_uc = [None, None, None]
    a1111.StableDiffusionProcessing.cached_c = [None, None, None]
    a1111.StableDiffusionProcessing.cached_uc = [None, None, None]


a1111.StableDiffusionProcessing.clear_prompt_cache = clear_prompt_cache

# modules/processing.py: need_global_unload (set by modules_forge/main_entry.py
# refresh_model_loading_parameters)
need_global_unload = False


# modules/processing.py: manage_model_and_prompt_cache(p) — the model the loading parameters name, and a fresh
# prompt cache after they changed (the unloading of every model is not modelled)
def manage_model_and_prompt_cache(p):
    global need_global_unload

    p.sd_model, _just_reloaded = sd_models.forge_model_reload()

    if need_global_unload:
        p.clear_prompt_cache()

    need_global_unload = False


# modules/processing.py: process_images(p) — manage_model_and_prompt_cache where A1111 reloads the weights
# (the real one restores overridden settings in a ``finally``; an exception still reaches the caller)
def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    manage_model_and_prompt_cache(p)
    return process_images_inner(p)  # noqa: F821 (defined by the A1111 layer run above)
