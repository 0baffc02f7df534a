"""Mirror of backend/diffusion_engine/flux.py: the Flux engine (its class name matters), its forge_objects
(CLIP-L and T5-XXL) and its conditioning: T5 states, the pooled CLIP-L output, the distilled CFG scale."""

from __future__ import annotations

import torch
from backend.diffusion_engine.base import ForgeDiffusionEngine, build_objects, pooled


# backend/diffusion_engine/flux.py: class Flux(ForgeDiffusionEngine) — built from the modules here
class Flux(ForgeDiffusionEngine):
    def __init__(self, unet_model, clip_l, t5xxl):
        super().__init__(None, None)
        build_objects(self, unet_model, {"clip_l": clip_l, "t5xxl": t5xxl}, "black-forest-labs/FLUX.1-dev")
        self.use_distilled_cfg_scale = True

    # backend/diffusion_engine/flux.py: Flux.get_learned_conditioning(prompt)
    def get_learned_conditioning(self, prompt: list[str]):
        encoders = self.forge_objects.clip.cond_stage_model
        cond = dict(crossattn=encoders.t5xxl(prompt), vector=pooled(encoders.clip_l(prompt)))
        if self.use_distilled_cfg_scale:
            distilled_cfg_scale = getattr(prompt, "distilled_cfg_scale", 3.5) or 3.5
            cond["guidance"] = torch.FloatTensor([distilled_cfg_scale] * len(prompt))
        return cond
