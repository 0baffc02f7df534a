"""Mirror of backend/diffusion_engine/anima.py (K-LoRA does not support it): the engine's class name, its text
encoder's name in forge_objects and its flags (test-only construction: base.py ``OneEncoderEngine``)."""

from __future__ import annotations

from backend.diffusion_engine.base import OneEncoderEngine


# backend/diffusion_engine/anima.py: class Anima(ForgeDiffusionEngine)
class Anima(OneEncoderEngine):
    repo = "circlestone-labs/Anima"
    encoder = "qwen3_06b"
    wan_vae = True
