"""Mirror of modules/sd_samplers_kdiffusion.py (A1111 v1.10.1): KDiffusionSampler.sample / sample_img2img with
the step split of setup_img2img_steps. The k-diffusion loops are stand-ins with the same model-call pattern:
Euler calls the model once per step; Heun (second order) twice, except on the last step."""

from __future__ import annotations

import torch
from modules import sd_samplers_cfg_denoiser, sd_samplers_common


def _sigmas(steps: int) -> torch.Tensor:
    # stands in for KDiffusionSampler.get_sigmas: a decreasing schedule ending at 0
    return torch.cat([torch.linspace(14.6, 0.03, steps), torch.zeros(1)])


def _sample_euler(model, x, sigmas, extra_args=None, callback=None):
    # k_diffusion.sampling.sample_euler: one model call per step, the callback after it
    for i in range(len(sigmas) - 1):
        s_in = x.new_ones([x.shape[0]])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def _sample_heun(model, x, sigmas, extra_args=None, callback=None):
    # k_diffusion.sampling.sample_heun: two model calls per step, Euler on the step that ends at sigma 0
    for i in range(len(sigmas) - 1):
        s_in = x.new_ones([x.shape[0]])
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


# modules/sd_samplers_kdiffusion.py: samplers_k_diffusion (two of them)
samplers_k_diffusion = [
    ("Euler", _sample_euler, ["k_euler"], {}),
    ("Heun", _sample_heun, ["k_heun"], {"second_order": True}),
]


# modules/sd_samplers_kdiffusion.py: class KDiffusionSampler(sd_samplers_common.Sampler)
class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.func = funcname
        self.model_wrap_cfg = sd_samplers_cfg_denoiser.CFGDenoiser(self)
        self.sampler_extra_args = {}

    def _extra(self, p, conditioning, unconditional_conditioning, image_conditioning):
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": 0.0,
        }
        return self.sampler_extra_args

    # modules/sd_samplers_kdiffusion.py: KDiffusionSampler.sample_img2img(p, x, noise, conditioning,
    # unconditional_conditioning, steps=None, image_conditioning=None)
    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = _sigmas(steps)
        sigma_sched = sigmas[steps - t_enc - 1 :]
        xi = x + noise * sigma_sched[0]
        self.initialize(p)
        extra_args = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        self.last_latent = x
        return self.launch_sampling(
            t_enc + 1,
            lambda: self.func(
                self.model_wrap_cfg, xi, sigma_sched, extra_args=extra_args, callback=self.callback_state
            ),
        )

    # modules/sd_samplers_kdiffusion.py: KDiffusionSampler.sample(p, x, conditioning,
    # unconditional_conditioning, steps=None, image_conditioning=None)
    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = _sigmas(steps)
        x = x * sigmas[0]
        self.initialize(p)
        extra_args = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        self.last_latent = x
        return self.launch_sampling(
            steps,
            lambda: self.func(
                self.model_wrap_cfg, x, sigmas, extra_args=extra_args, callback=self.callback_state
            ),
        )


# modules/sd_samplers.py: all_samplers / find_sampler_config(name) / create_sampler(name, model)
all_samplers = [
    sd_samplers_common.SamplerData(
        label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model), aliases, options
    )
    for label, funcname, aliases, options in samplers_k_diffusion
]
