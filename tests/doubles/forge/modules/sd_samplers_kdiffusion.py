"""Forge's modules/sd_samplers_kdiffusion.py (dfdcbab6): A1111's (the A1111 double runs in this module
first) with KDiffusionSampler.sample / sample_img2img preparing the UNet patcher's memory before sampling
(backend/sampling/sampling_function.py ``sampling_prepare``, which reserves
``extra_preserved_memory_during_sampling``) and releasing it after (``sampling_cleanup``, skipped when
sampling raises)."""

from __future__ import annotations

from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare
from overlay import extend

a1111 = extend(globals())


class KDiffusionSampler(a1111.KDiffusionSampler):
    # modules/sd_samplers_kdiffusion.py: KDiffusionSampler.sample_img2img(p, x, noise, conditioning,
    # unconditional_conditioning, steps=None, image_conditioning=None)
    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        unet_patcher = self.model_wrap_cfg.inner_model.inner_model.forge_objects.unet
        sampling_prepare(unet_patcher, x=x)
        samples = super().sample_img2img(
            p, x, noise, conditioning, unconditional_conditioning, steps, image_conditioning
        )
        sampling_cleanup(unet_patcher)
        return samples

    # modules/sd_samplers_kdiffusion.py: KDiffusionSampler.sample(p, x, conditioning,
    # unconditional_conditioning, steps=None, image_conditioning=None)
    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        unet_patcher = self.model_wrap_cfg.inner_model.inner_model.forge_objects.unet
        sampling_prepare(unet_patcher, x=x)
        samples = super().sample(p, x, conditioning, unconditional_conditioning, steps, image_conditioning)
        sampling_cleanup(unet_patcher)
        return samples
