"""Mirror of backend/diffusion_engine/zimage.py: the engine's class name, its text encoder's name
in forge_objects and its flags (test-only construction: base.py ``OneEncoderEngine``)."""

from __future__ import annotations

from backend.diffusion_engine.base import OneEncoderEngine


# backend/diffusion_engine/zimage.py: class ZImage(ForgeDiffusionEngine)
class ZImage(OneEncoderEngine):
    repo = "Tongyi-MAI/Z-Image-Turbo"
    encoder = "qwen3"
