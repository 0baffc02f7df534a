"""Mirror of modules/sd_samplers_common.py: setup_img2img_steps, SamplerData.total_steps, the interrupt
exception, and Sampler.launch_sampling (which swallows an interrupt)."""

from __future__ import annotations

from modules import extra_networks, shared
from modules.shared import opts, state


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


# modules/sd_samplers_common.py: InterruptedException
class InterruptedException(BaseException):
    pass


# modules/sd_samplers_common.py: SamplerData.total_steps(steps)
class SamplerData:
    def __init__(self, name, options):
        self.name = name
        self.options = options

    def total_steps(self, steps):
        if self.options.get("second_order", False):
            steps = steps * 2
        return steps


# modules/sd_samplers_common.py: apply_refiner(cfg_denoiser, x) — reduced to the model switch itself
def apply_refiner(cfg_denoiser, x):
    p = cfg_denoiser.p
    refiner = getattr(p, "refiner_engine", None)
    if refiner is None or p.refiner_switch_at is None:
        return False
    if cfg_denoiser.step / cfg_denoiser.total_steps < p.refiner_switch_at or shared.sd_model is refiner:
        return False
    p.extra_generation_params["Refiner"] = "refiner"
    shared.sd_model = refiner  # main_entry.checkpoint_change + sd_models.forge_model_reload
    if not p.disable_extra_networks:
        extra_networks.activate(p, p.extra_network_data)
    p.setup_conds()
    return True


class Sampler:
    def __init__(self, config):
        from modules.sd_samplers_cfg_denoiser import CFGDenoiser

        self.config = config
        self.model_wrap_cfg = CFGDenoiser(self)

    # modules/sd_samplers_common.py: Sampler.launch_sampling(steps, func)
    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps = steps
        state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return None
