"""Mirrors of backend/diffusion_engine/{sd15,sdxl,flux}.py: the engine classes (their names matter),
their is_sd* flags and their forge_objects (UnetPatcher over a KModel; CLIP with clip_l / clip_g / t5xxl)."""

from __future__ import annotations

from types import SimpleNamespace

from backend.diffusion_engine.base import ForgeDiffusionEngine
from backend.modules.k_model import KModel
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher


def _build(engine, unet_model, encoders, repo):
    config = SimpleNamespace(huggingface_repo=repo)
    kmodel = KModel(unet_model, config=config)
    unet = UnetPatcher(kmodel, load_device="cpu", offload_device="cpu")
    engine._set_objects(unet, CLIP(model_dict=encoders))


# backend/diffusion_engine/sd15.py: StableDiffusion(estimated_config, huggingface_components)
class StableDiffusion(ForgeDiffusionEngine):
    def __init__(self, unet_model, clip_l):
        super().__init__(None, None)
        _build(self, unet_model, {"clip_l": clip_l}, "runwayml/stable-diffusion-v1-5")
        self.is_sd1 = True


# backend/diffusion_engine/sdxl.py: StableDiffusionXL(estimated_config, huggingface_components)
class StableDiffusionXL(ForgeDiffusionEngine):
    def __init__(self, unet_model, clip_l, clip_g):
        super().__init__(None, None)
        _build(
            self, unet_model, {"clip_l": clip_l, "clip_g": clip_g}, "stabilityai/stable-diffusion-xl-base-1.0"
        )
        self.is_sdxl = True


# backend/diffusion_engine/sdxl.py: StableDiffusionXLRefiner(estimated_config, huggingface_components)
class StableDiffusionXLRefiner(ForgeDiffusionEngine):
    def __init__(self, unet_model, clip_g):
        super().__init__(None, None)
        _build(self, unet_model, {"clip_g": clip_g}, "stabilityai/stable-diffusion-xl-refiner-1.0")
        self.is_sdxl = True


# backend/diffusion_engine/flux.py: Flux(estimated_config, huggingface_components)
class Flux(ForgeDiffusionEngine):
    def __init__(self, unet_model, clip_l, t5xxl):
        super().__init__(None, None)
        _build(self, unet_model, {"clip_l": clip_l, "t5xxl": t5xxl}, "black-forest-labs/FLUX.1-dev")
        self.use_distilled_cfg_scale = True
