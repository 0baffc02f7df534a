"""Mirror of modules/sd_samplers_kdiffusion.py::KDiffusionSampler.sample / sample_img2img with the call
pattern of k-diffusion's samplers: Euler (one call per step; state.sampling_step is set by the callback
after each step, so it lags by one) and Heun (second order: two calls per step but one on the last)."""

from __future__ import annotations

from backend.sampling.sampling_function import sampling_cleanup, sampling_prepare

from modules import sd_samplers_common
from modules.shared import state

SAMPLERS = {
    "Euler": sd_samplers_common.SamplerData("Euler", {}),
    "Heun": sd_samplers_common.SamplerData("Heun", {"second_order": True}),
}


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, name, sd_model):
        super().__init__(SAMPLERS[name])

    def _run(self, x, n):
        second = self.config.options.get("second_order", False)
        for i in range(n):
            x = self.model_wrap_cfg.forward(x, None, None, None, 1.0, 0.0, None)
            if second and i < n - 1:
                x = self.model_wrap_cfg.forward(x, None, None, None, 1.0, 0.0, None)
            state.sampling_step = i  # k-diffusion's callback runs after the step
        return x

    # modules/sd_samplers_kdiffusion.py: KDiffusionSampler.sample(p, x, conditioning,
    # unconditional_conditioning,
    # steps=None, image_conditioning=None)
    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        unet_patcher = p.sd_model.forge_objects.unet
        sampling_prepare(unet_patcher, x=x)
        self.model_wrap_cfg.p = p
        steps = steps or p.steps
        samples = self.launch_sampling(steps, lambda: self._run(x, steps))
        sampling_cleanup(unet_patcher)
        return samples

    # modules/sd_samplers_kdiffusion.py: KDiffusionSampler.sample_img2img(p, x, noise, conditioning,
    # unconditional_conditioning, steps=None, image_conditioning=None)
    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        unet_patcher = p.sd_model.forge_objects.unet
        sampling_prepare(unet_patcher, x=x)
        self.model_wrap_cfg.p = p
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        samples = self.launch_sampling(t_enc + 1, lambda: self._run(x, t_enc + 1))
        sampling_cleanup(unet_patcher)
        return samples
