"""Mirror of backend/patcher/base.py::ModelPatcher (clone shares the nn.Module)."""

from __future__ import annotations

import copy


class ModelPatcher:
    # backend/patcher/base.py: ModelPatcher.__init__(model, load_device, offload_device, size=0,
    # current_device=None, **kwargs)
    def __init__(self, model, load_device, offload_device, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = offload_device if current_device is None else current_device

    # backend/patcher/base.py: ModelPatcher.clone()
    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n
