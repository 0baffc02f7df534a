"""Mirror of backend/diffusion_engine/lumina.py: the engine's class name, its text encoder's name
in forge_objects and its flags (test-only construction: base.py ``OneEncoderEngine``)."""

from __future__ import annotations

from backend.diffusion_engine.base import OneEncoderEngine


# backend/diffusion_engine/lumina.py: class Lumina2(ForgeDiffusionEngine)
class Lumina2(OneEncoderEngine):
    repo = "neta-art/Neta-Lumina"
    encoder = "gemma2"
