"""Forge Neo's backend/diffusion_engine/base.py (2.26): Forge's (the Forge double runs in this module first)
with Neo's flags — ``fix_for_webui_backward_compatibility`` sets ``is_sd1``, ``is_sdxl``, ``is_wan`` and no
``is_sd2``/``is_sd3`` — and, test-only, the engines of the single-text-encoder DiT families Neo adds."""

from __future__ import annotations

from types import SimpleNamespace

from overlay import extend

forge = extend(globals())


class ForgeDiffusionEngine(forge.ForgeDiffusionEngine):
    # backend/diffusion_engine/base.py: ForgeDiffusionEngine(estimated_config, huggingface_components)
    def __init__(self, estimated_config, huggingface_components):
        super().__init__(estimated_config, huggingface_components)
        del self.is_sd2, self.is_sd3  # gone from Neo
        self.is_wan = False


# Test-only: as the Forge layer's, and the weights of the checkpoint file (``base_state_dict``), which Neo's
# fast refiner switch overwrites in place and modules/processing_scripts/refiner.py loads back
def build_objects(engine, unet_model, encoders, repo):
    forge.build_objects(engine, unet_model, encoders, repo)
    engine.base_state_dict = {k: v.detach().clone() for k, v in unet_model.state_dict().items()}


# Test-only: the engine of a family with one text encoder (Neo's chroma.py, lumina.py, zimage.py, qwen.py,
# wan.py, anima.py): its ``model_config`` (the huggingface_guess model: ``huggingface_repo``, and ``nunchaku``
# as BASE.__init__ pops it from the unet config), forge_objects with the encoder under Neo's name, and the
# conditioning: the encoder's states
class OneEncoderEngine(ForgeDiffusionEngine):
    repo = ""
    encoder = ""
    wan_vae = False  # is_wan: the engines that decode with Wan's VAE set it (not only Wan)

    def __init__(self, unet_model, text_encoder):
        super().__init__(SimpleNamespace(huggingface_repo=self.repo, nunchaku=False), None)
        build_objects(self, unet_model, {self.encoder: text_encoder}, self.repo)
        self.is_wan = self.wan_vae

    def get_learned_conditioning(self, prompt: list[str]):
        return getattr(self.forge_objects.clip.cond_stage_model, self.encoder)(prompt)
