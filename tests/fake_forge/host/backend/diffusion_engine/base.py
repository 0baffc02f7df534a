"""Mirror of backend/diffusion_engine/base.py (ForgeObjects, ForgeDiffusionEngine)."""

from __future__ import annotations


class ForgeObjects:
    # backend/diffusion_engine/base.py: ForgeObjects(unet, clip, vae, clipvision)
    def __init__(self, unet, clip, vae, clipvision):
        self.unet = unet
        self.clip = clip
        self.vae = vae
        self.clipvision = clipvision

    # backend/diffusion_engine/base.py: ForgeObjects.shallow_copy()
    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class ForgeDiffusionEngine:
    # backend/diffusion_engine/base.py: ForgeDiffusionEngine(estimated_config, huggingface_components)
    def __init__(self, estimated_config, huggingface_components):
        self.model_config = estimated_config
        self.forge_objects = None
        self.forge_objects_original = None
        self.forge_objects_after_applying_lora = None
        self.current_lora_hash = str([])
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False
        self.use_distilled_cfg_scale = False

    def _set_objects(self, unet, clip):
        self.forge_objects = ForgeObjects(unet=unet, clip=clip, vae=None, clipvision=None)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
