"""Mirror of modules/sd_samplers_timesteps.py (A1111 v1.10.1): CompVisSampler.sample / sample_img2img with the
timestep split of setup_img2img_steps, and CFGDenoiserTimesteps. The sampler loop is a stand-in for
modules/sd_samplers_timesteps_impl.py ``ddim`` with its model-call pattern: ``len(timesteps) - 1`` calls,
call ``i`` at timestep index ``len(timesteps) - 1 - i`` (so index 0 is never used)."""

from __future__ import annotations

import inspect

import torch
from modules import sd_samplers_common
from modules.sd_samplers_cfg_denoiser import CFGDenoiser
from modules.shared import opts


# modules/sd_samplers_timesteps_impl.py: ddim(model, x, timesteps, extra_args=None, callback=None,
# disable=None, eta=0.0) — the loop and its model calls; the update is a stand-in for the DDIM step
def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones(x.shape[0])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        x = x - 0.1 * e_t
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": x})
    return x


# modules/sd_samplers_timesteps.py: samplers_timesteps (one of them)
samplers_timesteps = [
    ("DDIM", ddim, ["ddim"], {}),
]

# modules/sd_samplers_timesteps.py: samplers_data_timesteps
samplers_data_timesteps = [
    sd_samplers_common.SamplerData(
        label, lambda model, funcname=funcname: CompVisSampler(funcname, model), aliases, options
    )
    for label, funcname, aliases, options in samplers_timesteps
]


# modules/sd_samplers_timesteps.py: class CFGDenoiserTimesteps(CFGDenoiser) — the real __init__ also reads
# shared.sd_model.alphas_cumprod for get_pred_x0, which the stand-in loop does not use
class CFGDenoiserTimesteps(CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.mask_before_denoising = True


# modules/sd_samplers_timesteps.py: class CompVisSampler(sd_samplers_common.Sampler)
class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.func = funcname
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.sampler_extra_args = {}

    # modules/sd_samplers_timesteps.py: CompVisSampler.get_timesteps(p, steps)
    def get_timesteps(self, p, steps):
        discard_next_to_last_sigma = self.config is not None and self.config.options.get(
            "discard_next_to_last_sigma", False
        )
        if opts.always_discard_next_to_last_sigma and not discard_next_to_last_sigma:
            discard_next_to_last_sigma = True
            p.extra_generation_params["Discard penultimate sigma"] = True

        steps += 1 if discard_next_to_last_sigma else 0

        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def _extra(self, p, conditioning, unconditional_conditioning, image_conditioning):
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": 0.0,
        }
        return self.sampler_extra_args

    # modules/sd_samplers_timesteps.py: CompVisSampler.sample_img2img(p, x, noise, conditioning,
    # unconditional_conditioning, steps=None, image_conditioning=None)
    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)

        timesteps = self.get_timesteps(p, steps)
        timesteps_sched = timesteps[:t_enc]

        xi = x + noise * 0.5  # stands in for the noising to timesteps[t_enc] through alphas_cumprod

        extra_params_kwargs = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        if "timesteps" in parameters:
            extra_params_kwargs["timesteps"] = timesteps_sched
        if "is_img2img" in parameters:
            extra_params_kwargs["is_img2img"] = True

        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        extra_args = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(
            t_enc + 1,
            lambda: self.func(
                self.model_wrap_cfg, xi, extra_args=extra_args, disable=False, callback=self.callback_state,
                **extra_params_kwargs,
            ),
        )

    # modules/sd_samplers_timesteps.py: CompVisSampler.sample(p, x, conditioning, unconditional_conditioning,
    # steps=None, image_conditioning=None)
    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = self.get_timesteps(p, steps)

        extra_params_kwargs = self.initialize(p)
        parameters = inspect.signature(self.func).parameters
        if "timesteps" in parameters:
            extra_params_kwargs["timesteps"] = timesteps

        self.last_latent = x
        extra_args = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(
            steps,
            lambda: self.func(
                self.model_wrap_cfg, x, extra_args=extra_args, disable=False, callback=self.callback_state,
                **extra_params_kwargs,
            ),
        )
