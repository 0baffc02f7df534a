"""Mirror of backend/patcher/clip.py (CLIP with a JointTextEncoder of named encoders) and
backend/nn/base.py::ModuleDict."""

from __future__ import annotations

import torch
from backend.patcher.base import ModelPatcher


# backend/nn/base.py: ModuleDict(module_dict) — named children, no dict interface
class ModuleDict(torch.nn.Module):
    def __init__(self, module_dict):
        super().__init__()
        for name, module in module_dict.items():
            self.add_module(name, module)


# backend/patcher/clip.py: JointTextEncoder(ModuleDict)
class JointTextEncoder(ModuleDict):
    pass


# backend/patcher/clip.py: CLIP(model_dict={}, tokenizer_dict={}, no_init=False)
class CLIP:
    def __init__(self, model_dict={}, tokenizer_dict={}, no_init=False):  # noqa: B006 (Forge's signature)
        if no_init:
            return
        self.cond_stage_model = JointTextEncoder(model_dict)
        self.tokenizer = None
        self.patcher = ModelPatcher(self.cond_stage_model, load_device="cpu", offload_device="cpu")

    # backend/patcher/clip.py: CLIP.clone()
    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        return n
