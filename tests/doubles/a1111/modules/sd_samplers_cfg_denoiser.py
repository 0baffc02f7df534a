"""Mirror of modules/sd_samplers_cfg_denoiser.py (A1111 v1.10.1): CFGDenoiser.forward's order — interrupt
check, refiner switch, the on_cfg_denoiser callback, the UNet call, step += 1."""

from __future__ import annotations

import torch
from modules import sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
from modules.shared import state


# modules/sd_samplers_cfg_denoiser.py: class CFGDenoiser(torch.nn.Module)
class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = False
        self.sampler = sampler
        self.p = None
        self.mask_before_denoising = False

    @property
    def inner_model(self):
        # the real one wraps shared.sd_model in a k-diffusion CompVisDenoiser, rebuilt by update_inner_model
        return shared.sd_model

    # modules/sd_samplers_cfg_denoiser.py: CFGDenoiser.update_inner_model() — after a model switch: a new
    # wrapper, and the conditioning the new model made (forward reads it back from sampler_extra_args)
    def update_inner_model(self):
        self.model_wrap = None

        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    # modules/sd_samplers_cfg_denoiser.py: CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale,
    # s_min_uncond, image_cond)
    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        if sd_samplers_common.apply_refiner(self, sigma):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]

        tensor = cond
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        image_cond_in = torch.cat([image_cond, image_cond])

        denoiser_params = CFGDenoiserParams(
            x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self
        )
        cfg_denoiser_callback(denoiser_params)
        x_in = denoiser_params.x
        tensor = denoiser_params.text_cond
        uncond = denoiser_params.text_uncond

        # one batched UNet call on cond + uncond (opts.batch_cond_uncond)
        x_out = self.inner_model.apply_model(x_in, denoiser_params.sigma, cond=torch.cat([tensor, uncond]))
        denoised_cond, denoised_uncond = x_out.chunk(2)
        denoised = denoised_uncond + (denoised_cond - denoised_uncond) * cond_scale

        self.step += 1
        return denoised
