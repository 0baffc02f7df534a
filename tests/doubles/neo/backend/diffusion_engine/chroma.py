"""Mirror of backend/diffusion_engine/chroma.py: the engine's class name, its text encoder's name
in forge_objects and its flags (test-only construction: base.py ``OneEncoderEngine``)."""

from __future__ import annotations

from backend.diffusion_engine.base import OneEncoderEngine


# backend/diffusion_engine/chroma.py: class Chroma(ForgeDiffusionEngine)
class Chroma(OneEncoderEngine):
    repo = "Chroma"
    encoder = "t5xxl"
