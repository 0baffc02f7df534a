"""Mirror of backend/diffusion_engine/base.py (ForgeObjects, ForgeDiffusionEngine), and the test-only helpers
the engine doubles share."""

from __future__ import annotations

from types import SimpleNamespace


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


# Test-only: what the engines' constructors do with their loaded components — the UNet patcher over a KModel,
# the CLIP patcher over the named text encoders, and the three forge_objects (as loaded, after the LoRAs, in
# use)
def build_objects(engine, unet_model, encoders, repo):
    from backend.modules.k_model import KModel
    from backend.patcher.clip import CLIP
    from backend.patcher.unet import UnetPatcher

    kmodel = KModel(unet_model, config=SimpleNamespace(huggingface_repo=repo))
    unet = UnetPatcher(kmodel, load_device="cpu", offload_device="cpu")
    engine.forge_objects = ForgeObjects(unet=unet, clip=CLIP(model_dict=encoders), vae=None, clipvision=None)
    engine.forge_objects_original = engine.forge_objects.shallow_copy()
    engine.forge_objects_after_applying_lora = engine.forge_objects.shallow_copy()


# Test-only: the pooled output of a text encoder, standing in for the text-processing engines' (here the
# states of the last token)
def pooled(states):
    return states[:, -1]
