"""Mirror of backend/diffusion_engine/sd15.py: the SD1.5 engine (its class name matters), its forge_objects
(a UnetPatcher over a KModel; a CLIP patcher with ``clip_l``) and its conditioning."""

from __future__ import annotations

from backend.diffusion_engine.base import ForgeDiffusionEngine, build_objects


# backend/diffusion_engine/sd15.py: class StableDiffusion(ForgeDiffusionEngine) — built from the modules here
# (the real constructor, (estimated_config, huggingface_components), loads them)
class StableDiffusion(ForgeDiffusionEngine):
    def __init__(self, unet_model, clip_l):
        super().__init__(None, None)
        build_objects(self, unet_model, {"clip_l": clip_l}, "runwayml/stable-diffusion-v1-5")
        self.is_sd1 = True

    # backend/diffusion_engine/sd15.py: StableDiffusion.get_learned_conditioning(prompt) — the CLIP-L states
    # (the real one tokenizes through backend/text_processing/classic_engine.py)
    def get_learned_conditioning(self, prompt: list[str]):
        return self.forge_objects.clip.cond_stage_model.clip_l(prompt)
