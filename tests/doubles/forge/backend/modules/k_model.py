"""Mirror of backend/modules/k_model.py::KModel: the wrapper holding the diffusion model and its dtypes, and
apply_model, the one call into the UNet / Flux transformer."""

from __future__ import annotations

import torch


class KModel(torch.nn.Module):
    # backend/modules/k_model.py: KModel(model, diffusers_scheduler, k_predictor=None, config=None)
    def __init__(self, model, diffusers_scheduler=None, k_predictor=None, config=None):
        super().__init__()
        self.config = config
        self.storage_dtype = torch.float32
        self.computation_dtype = torch.float32
        self.diffusion_model = model

    # backend/modules/k_model.py: KModel.apply_model(x, t, c_concat=None, c_crossattn=None, control=None,
    # transformer_options={}, **kwargs) — the predictor's input/output scaling (k_prediction) is left out
    def apply_model(
        self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs  # noqa: B006
    ):
        xc = x
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        dtype = self.computation_dtype
        context = c_crossattn.to(dtype)
        extra_conds = {}
        for name, extra in kwargs.items():
            if hasattr(extra, "dtype") and extra.dtype not in (torch.int, torch.long):
                extra = extra.to(dtype)
            extra_conds[name] = extra
        return self.diffusion_model(
            xc.to(dtype),
            t.float(),
            context=context,
            control=control,
            transformer_options=transformer_options,
            **extra_conds,
        ).float()
