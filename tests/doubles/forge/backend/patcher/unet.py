"""Mirror of backend/patcher/unet.py::UnetPatcher (the memory-preservation API K-LoRA uses)."""

from __future__ import annotations

import copy

from backend.patcher.base import ModelPatcher


class UnetPatcher(ModelPatcher):
    # backend/patcher/unet.py: UnetPatcher.__init__(*args, **kwargs)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    # backend/patcher/unet.py: UnetPatcher.clone()
    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    # backend/patcher/unet.py: UnetPatcher.add_extra_preserved_memory_during_sampling(memory_in_bytes: int)
    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes: int):
        self.extra_preserved_memory_during_sampling += memory_in_bytes
