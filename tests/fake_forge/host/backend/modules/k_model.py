"""Mirror of backend/modules/k_model.py::KModel (the wrapper holding diffusion_model and dtypes)."""

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
