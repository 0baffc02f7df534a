"""Mirror of backend/diffusion_engine/sdxl.py: the SDXL base and refiner engines (their class names matter),
their forge_objects and their conditioning (a dict: ``crossattn`` states, ``vector`` the pooled output; the
size/crop/aesthetic embeddings the real one appends to the vector are left out)."""

from __future__ import annotations

import torch
from backend.diffusion_engine.base import ForgeDiffusionEngine, build_objects, pooled


# backend/diffusion_engine/sdxl.py: class StableDiffusionXL(ForgeDiffusionEngine) — built from its modules
class StableDiffusionXL(ForgeDiffusionEngine):
    def __init__(self, unet_model, clip_l, clip_g):
        super().__init__(None, None)
        build_objects(
            self, unet_model, {"clip_l": clip_l, "clip_g": clip_g}, "stabilityai/stable-diffusion-xl-base-1.0"
        )
        self.is_sdxl = True

    # backend/diffusion_engine/sdxl.py: StableDiffusionXL.get_learned_conditioning(prompt)
    def get_learned_conditioning(self, prompt: list[str]):
        encoders = self.forge_objects.clip.cond_stage_model
        cond_l, cond_g = encoders.clip_l(prompt), encoders.clip_g(prompt)
        return dict(crossattn=torch.cat([cond_l, cond_g], dim=2), vector=pooled(cond_g))


# backend/diffusion_engine/sdxl.py: class StableDiffusionXLRefiner(ForgeDiffusionEngine)
class StableDiffusionXLRefiner(ForgeDiffusionEngine):
    def __init__(self, unet_model, clip_g):
        super().__init__(None, None)
        build_objects(self, unet_model, {"clip_g": clip_g}, "stabilityai/stable-diffusion-xl-refiner-1.0")
        self.is_sdxl = True

    # backend/diffusion_engine/sdxl.py: StableDiffusionXLRefiner.get_learned_conditioning(prompt)
    def get_learned_conditioning(self, prompt: list[str]):
        cond_g = self.forge_objects.clip.cond_stage_model.clip_g(prompt)
        return dict(crossattn=cond_g, vector=pooled(cond_g))
