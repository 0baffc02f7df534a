"""Mirror of backend/sampling/sampling_function.py::sampling_prepare / sampling_cleanup: the memory Forge
keeps free during sampling includes unet.extra_preserved_memory_during_sampling (recorded here)."""

from __future__ import annotations

last_preserved_memory: list[int] = []


# backend/sampling/sampling_function.py: sampling_prepare(unet, x)
def sampling_prepare(unet, x):
    last_preserved_memory.append(unet.extra_preserved_memory_during_sampling)


# backend/sampling/sampling_function.py: sampling_cleanup(unet)
def sampling_cleanup(unet):
    return
