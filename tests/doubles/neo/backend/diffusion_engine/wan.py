"""Mirror of backend/diffusion_engine/wan.py (Wan 2.1 and 2.2): the engine's class name, its text encoder's
name in forge_objects and its flags (test-only construction: base.py ``OneEncoderEngine``)."""

from __future__ import annotations

from backend.diffusion_engine.base import OneEncoderEngine


# backend/diffusion_engine/wan.py: class Wan(ForgeDiffusionEngine)
class Wan(OneEncoderEngine):
    repo = "Wan-AI/Wan2.1-T2V-14B"
    encoder = "umt5xxl"
    wan_vae = True
