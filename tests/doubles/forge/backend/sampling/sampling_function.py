"""Mirror of backend/sampling/sampling_function.py: ``sampling_function``, through which Forge's CFG denoiser
runs the model, and ``sampling_prepare`` / ``sampling_cleanup`` around every sampling pass (the memory Forge
keeps free while sampling includes ``unet.extra_preserved_memory_during_sampling``, recorded here)."""

from __future__ import annotations

import math

import torch

last_preserved_memory: list[int] = []
"""Test-only: ``extra_preserved_memory_during_sampling`` of the UNet patcher at every sampling_prepare."""


# backend/sampling/condition.py: compile_conditions(cond) — the model's keyword arguments for a conditioning:
# a tensor is the cross-attention context; a dict adds the pooled ``vector`` as ``y`` (and Flux's guidance)
def _model_conds(cond):
    if isinstance(cond, torch.Tensor):
        return dict(c_crossattn=cond)
    out = dict(c_crossattn=cond["crossattn"], y=cond["vector"])
    if "guidance" in cond:
        out["guidance"] = cond["guidance"]
    return out


def _cat(a, b):
    return {k: torch.cat([a[k], b[k]]) for k in a}


# backend/sampling/sampling_function.py: sampling_function(self, denoiser_params, cond_scale,
# cond_composition) — the model runs once per call: on cond alone at CFG scale 1 (sampling_function_inner
# drops uncond then), else on cond and uncond in one batch (calc_cond_uncond_batch); composable prompts, area
# conds, ControlNet and the model_options patches are left out
def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    x = denoiser_params.x
    timestep = denoiser_params.sigma
    cond = _model_conds(denoiser_params.text_cond)
    uncond = _model_conds(denoiser_params.text_uncond) if denoiser_params.text_uncond is not None else None

    if uncond is None or math.isclose(cond_scale, 1.0):
        cond_pred = model.apply_model(x, timestep, **cond)
        return cond_pred, cond_pred, cond_pred

    out = model.apply_model(torch.cat([x, x]), torch.cat([timestep, timestep]), **_cat(cond, uncond))
    cond_pred, uncond_pred = out.chunk(2)
    denoised = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    return denoised, cond_pred, uncond_pred


# backend/sampling/sampling_function.py: sampling_prepare(unet, x) — loads the models with the memory to keep
def sampling_prepare(unet, x):
    last_preserved_memory.append(unet.extra_preserved_memory_during_sampling)


# backend/sampling/sampling_function.py: sampling_cleanup(unet)
def sampling_cleanup(unet):
    return
