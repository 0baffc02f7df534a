"""Sampling progress τ in the webui: where a pass starts in its full schedule (img2img, hires fix) and the τ
of each denoiser call, from ``on_cfg_denoiser``'s denoiser (``step``/``total_steps``, the webui's own notion
of progress, which prompt editing uses; ``state.sampling_step`` lags by one).

The same in A1111 1.6 – 1.10, Forge and Neo: ``CFGDenoiser.step``/``total_steps`` and
``sd_samplers_common.setup_img2img_steps`` are shared; the timestep samplers (DDIM, DDIM CFG++, PLMS, and
UniPC on A1111) count differently from the k-diffusion ones.
"""

from __future__ import annotations

from typing import Any

from modules import processing, sd_samplers_common, shared

from klora.apply import StepClock

try:  # the timestep samplers, since 1.6; a host may lack them
    from modules.sd_samplers_timesteps import CFGDenoiserTimesteps
except Exception:  # pragma: no cover - depends on the host
    CFGDenoiserTimesteps = None


def uses_timesteps(denoiser: Any) -> bool:
    return CFGDenoiserTimesteps is not None and isinstance(denoiser, CFGDenoiserTimesteps)


def pass_denoiser(p: Any) -> Any:
    """The CFG denoiser of ``p``'s sampler (``p.sampler`` is set before each pass's sampling starts)."""
    return getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)


def _timesteps_length(denoiser: Any, steps: int) -> int:
    """Length of the timestep array of a ``steps``-step schedule: modules/sd_samplers_timesteps.py
    ``CompVisSampler.get_timesteps`` (``range(0, 1000, 1000 // steps)``, one step more when the penultimate
    sigma is discarded); equal to ``steps`` when ``steps`` divides 1000, longer otherwise (30 → 31)."""
    config = getattr(getattr(denoiser, "sampler", None), "config", None)
    options = getattr(config, "options", None) or {}
    discard = bool(options.get("discard_next_to_last_sigma", False))
    discard = discard or bool(getattr(shared.opts, "always_discard_next_to_last_sigma", False))
    n = max(1, steps + (1 if discard else 0))
    return len(range(0, 1000, max(1, 1000 // n)))


def pass_schedule(p: Any, denoiser: Any = None) -> tuple[int, int]:
    """(schedule steps skipped before this pass starts, steps of the full schedule) for ``p``'s current pass,
    for the sampler of ``denoiser`` (default: ``p.sampler``'s).

    modules/sd_samplers_common.py ``setup_img2img_steps``: an img2img pass (and the hires pass, which passes
    its step count explicitly and so takes the fix-steps branch) splits a ``steps``-step schedule at
    ``t_enc``. k-diffusion samplers (modules/sd_samplers_kdiffusion.py ``sample_img2img``) run its last
    ``t_enc + 1`` sigmas: ``steps - t_enc - 1`` skipped. The timestep samplers
    (modules/sd_samplers_timesteps.py ``CompVisSampler.sample_img2img``) run ``timesteps[:t_enc]``, whose
    ``t_enc - 1`` DDIM steps use the timestep indices ``t_enc - 1`` … 1; txt2img over the ``L`` timesteps
    of the same schedule uses index ``L - 1 - j`` at call ``j``, so img2img call ``i`` is txt2img call
    ``L - t_enc + i``: ``L - t_enc`` skipped, ``L = steps`` unless ``steps`` does not divide 1000.
    DDIM CFG++ calls as DDIM. PLMS over n timesteps calls twice on its first step (indices n - 1, n - 2), then
    once (call k at index n - k): the same shift holds for every call but the first. UniPC
    (``uni_pc.sample(steps=len(timesteps), t_start=timesteps[-1] / 1000 + 1 / 1000)``) re-spaces its own
    continuous times: ``t_enc`` calls over ``[≈ (t_enc - 1) / steps, 0]``, so its first call's τ is about
    ``1 / steps`` before where its noise sits, and the gap closes towards the end of the pass.
    """
    if getattr(p, "is_hr_pass", False):
        hr_steps = getattr(p, "hr_second_pass_steps", 0) or p.steps
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, hr_steps)
    elif isinstance(p, processing.StableDiffusionProcessingImg2Img):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p)
    else:
        return 0, int(p.steps)
    steps, t_enc = int(steps), int(t_enc)
    if denoiser is None:
        denoiser = pass_denoiser(p)
    if uses_timesteps(denoiser):
        return max(0, _timesteps_length(denoiser, steps) - t_enc), steps
    return max(0, steps - t_enc - 1), steps


class Progress:
    """The clock of one generation, set from the webui's denoiser before each model call."""

    def __init__(self) -> None:
        self.clock = StepClock()
        self._fallback_calls = 0
        self._fallback_last = -1

    def start_pass(self, p: Any) -> None:
        """τ at the start of ``p``'s current pass (``process_before_every_sampling``)."""
        skipped, full = pass_schedule(p)
        if full > 0:
            self.clock.tau = skipped / full

    def from_denoiser(self, p: Any, denoiser: Any) -> None:
        """τ = (skipped + step) / (skipped + total) in denoiser calls (second-order samplers count two per
        step: ``total_steps`` = 2 × steps, as the webui's prompt editing counts); τ = (skipped + step) / full
        for the timestep samplers, whose ``total_steps`` (``t_enc + 1``) is not the count of calls left."""
        step, total = int(denoiser.step), int(denoiser.total_steps or 0)
        if total <= 0:
            return
        skipped, full = pass_schedule(p, denoiser)
        if uses_timesteps(denoiser):
            if full > 0:
                self.clock.set_step(step, full - skipped, skipped)
            return
        per_step = max(1, total // max(1, int(getattr(denoiser, "steps", None) or total)))
        self.clock.set_step(step, total, skipped * per_step)

    def from_callback(self, p: Any, params: Any) -> None:
        """Before 1.8 the callback has no denoiser: count the calls of the pass ourselves."""
        if params.sampling_step < self._fallback_last:
            self._fallback_calls = 0
        self._fallback_last = params.sampling_step
        total = int(params.total_sampling_steps or 0)
        if total > 0:
            skipped, full = pass_schedule(p)
            if uses_timesteps(pass_denoiser(p)):
                if full > 0:
                    self.clock.set_step(self._fallback_calls, full - skipped, skipped)
            else:
                self.clock.set_step(min(self._fallback_calls, total), total, skipped)
        self._fallback_calls += 1
