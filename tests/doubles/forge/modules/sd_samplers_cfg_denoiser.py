"""Forge's modules/sd_samplers_cfg_denoiser.py (dfdcbab6): the class is A1111's (the A1111 double runs in this
module first) but ``forward``, which Forge rewrote: the refiner switch gets the latent (``apply_refiner(self,
x)``), cond and uncond are not batched here, and the model runs through
backend/sampling/sampling_function.py ``sampling_function`` (Forge's UnetPatcher and KModel).
Left out: prompt-editing schedules, masks, skip_early_cond/NGMS and hires CFG (cond_scale is passed as
given), the DDIM eps estimation."""

from __future__ import annotations

from types import SimpleNamespace

from backend.sampling.sampling_function import sampling_function
from modules import sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
from modules.shared import state
from overlay import extend

a1111 = extend(globals())


class CFGDenoiser(a1111.CFGDenoiser):
    # modules/sd_samplers_kdiffusion.py CFGDenoiserKDiffusion.inner_model (and sd_samplers_timesteps.py
    # CFGDenoiserTimesteps.inner_model): a wrapper made on first use (k_diffusion.external.ForgeScheduleLinker
    # over the predictor / CompVisTimestepsDenoiser) whose ``inner_model`` is shared.sd_model;
    # update_inner_model drops it after a model switch
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = SimpleNamespace(inner_model=shared.sd_model)
        return self.model_wrap

    # modules/sd_samplers_cfg_denoiser.py: CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale,
    # s_min_uncond, image_cond)
    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException

        if sd_samplers_common.apply_refiner(self, x):
            cond = self.sampler.sampler_extra_args["cond"]
            uncond = self.sampler.sampler_extra_args["uncond"]

        denoiser_params = CFGDenoiserParams(
            x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self
        )
        cfg_denoiser_callback(denoiser_params)

        denoised, _cond_pred, _uncond_pred = sampling_function(
            self, denoiser_params=denoiser_params, cond_scale=cond_scale, cond_composition=None
        )

        self.sampler.last_latent = denoised
        self.step += 1
        return denoised
