"""Mirror of modules/sd_samplers_common.py (A1111 v1.10.1): step bookkeeping, the img2img step split, the
refiner switch and the Sampler base whose launch_sampling swallows an interrupt."""

from __future__ import annotations

import torch
from modules import sd_models, shared
from modules.shared import opts, state


# modules/sd_samplers_common.py: class SamplerData (total_steps doubles for second-order samplers)
class SamplerData:
    def __init__(self, name, constructor, aliases, options):
        self.name = name
        self.constructor = constructor
        self.aliases = aliases
        self.options = options

    def total_steps(self, steps):
        if self.options.get("second_order", False):
            steps = steps * 2
        return steps


# modules/sd_samplers_common.py: setup_img2img_steps(p, steps=None)
def setup_img2img_steps(p, steps=None):
    if opts.img2img_fix_steps or steps is not None:
        requested_steps = steps or p.steps
        steps = int(requested_steps / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        t_enc = requested_steps - 1
    else:
        steps = p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)

    return steps, t_enc


# modules/sd_samplers_common.py: class InterruptedException
class InterruptedException(BaseException):
    pass


# modules/sd_samplers_common.py: apply_refiner(cfg_denoiser, sigma=None)
def apply_refiner(cfg_denoiser, sigma=None):
    if opts.refiner_switch_by_sample_steps or sigma is None:
        completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps
        cfg_denoiser.p.extra_generation_params["Refiner switch by sampling steps"] = True
    else:
        # the position of max(sigma) in the model's sigma table; timestep samplers pass the timestep itself
        try:
            sigmas = cfg_denoiser.inner_model.sigmas.to(sigma.device)
            timestep = torch.argmin(torch.abs(sigmas - torch.max(sigma)))
        except AttributeError:
            timestep = torch.max(sigma).to(dtype=int)
        completed_ratio = (999 - timestep) / 1000

    refiner_switch_at = cfg_denoiser.p.refiner_switch_at
    refiner_checkpoint_info = cfg_denoiser.p.refiner_checkpoint_info

    if refiner_switch_at is not None and completed_ratio < refiner_switch_at:
        return False

    if refiner_checkpoint_info is None or shared.sd_model.sd_checkpoint_info == refiner_checkpoint_info:
        return False

    if getattr(cfg_denoiser.p, "enable_hr", False):
        is_second_pass = cfg_denoiser.p.is_hr_pass
        if opts.hires_fix_refiner_pass == "first pass" and is_second_pass:
            return False
        if opts.hires_fix_refiner_pass == "second pass" and not is_second_pass:
            return False
        if opts.hires_fix_refiner_pass != "second pass":
            cfg_denoiser.p.extra_generation_params["Hires refiner"] = opts.hires_fix_refiner_pass

    cfg_denoiser.p.extra_generation_params["Refiner"] = refiner_checkpoint_info.short_title
    cfg_denoiser.p.extra_generation_params["Refiner switch at"] = refiner_switch_at

    sd_models.reload_model_weights(info=refiner_checkpoint_info)

    cfg_denoiser.p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


# modules/sd_samplers_common.py: class Sampler (initialize resets the denoiser's step counter per pass)
class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.config = None
        self.model_wrap_cfg = None
        self.p = None
        self.last_latent = None

    # modules/sd_samplers_common.py: Sampler.launch_sampling(steps, func)
    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0

        try:
            return func()
        except InterruptedException:
            return self.last_latent

    # modules/sd_samplers_common.py: Sampler.callback_state(d)
    def callback_state(self, d):
        step = d["i"]
        self.last_latent = d["denoised"]
        state.sampling_step = step

    # modules/sd_samplers_common.py: Sampler.initialize(p)
    def initialize(self, p) -> dict:
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0
        return {}
