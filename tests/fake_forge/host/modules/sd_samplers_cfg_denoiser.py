"""Mirror of modules/sd_samplers_cfg_denoiser.py::CFGDenoiser: the call counter ``step``, ``steps``,
``total_steps``, the interrupt check, apply_refiner, then cfg_denoiser_callback before the model runs."""

from __future__ import annotations

from modules import sd_samplers_common, shared
from modules.script_callbacks import CFGDenoiserParams, cfg_denoiser_callback
from modules.shared import state


class CFGDenoiser:
    # modules/sd_samplers_cfg_denoiser.py: CFGDenoiser(sampler)
    def __init__(self, sampler):
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.sampler = sampler
        self.p = None

    # modules/sd_samplers_cfg_denoiser.py: CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale,
    # s_min_uncond, image_cond)
    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        sd_samplers_common.apply_refiner(self, x)
        params = CFGDenoiserParams(
            x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self
        )
        cfg_denoiser_callback(params)
        denoised = self.p.denoise(shared.sd_model, x)
        self.step += 1
        return denoised
