"""Mirror of backend/diffusion_engine/qwen.py (is_wan: it decodes with Wan's VAE): the engine's class name,
its text encoder's name in forge_objects and its flags (test-only construction: base.py
``OneEncoderEngine``)."""

from __future__ import annotations

from backend.diffusion_engine.base import OneEncoderEngine


# backend/diffusion_engine/qwen.py: class QwenImage(ForgeDiffusionEngine)
class QwenImage(OneEncoderEngine):
    repo = "Qwen/Qwen-Image"
    encoder = "qwen25_7b"
    wan_vae = True
