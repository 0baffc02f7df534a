"""lllyasviel's Forge (the ``backend/`` architecture with Flux): canonical keys → Forge's modules, and the
hooks' memory announced to Forge's memory manager (what Forge shares with Forge Neo is in :mod:`.backend`).

The UNet or Flux transformer is ``forge_objects.unet.model.diffusion_model`` (SGM names for SD1.5/SDXL, BFL
names for Flux and Chroma), the text encoders ``forge_objects.clip.cond_stage_model.{clip_l, clip_g, t5xxl}``
(HF names; SDXL's CLIP-G is an HF model here, so its q/k/v are plain Linears). Keys this does not place are
offered to Forge's own key map in the kohya and OneTrainer spellings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from klora.apply import Target
from klora.webui.hosts import backend
from klora.webui.hosts.base import HostDefaults, flag_family

if TYPE_CHECKING:
    from klora.webui.session import Setup

SUPPORTED: tuple[str, ...] = ("sd1", "sd2", "sdxl", "flux", "chroma")

# text encoders of Forge's CLIP patcher (backend/diffusion_engine/*.py build them with these names)
_TEXT_ENCODERS: dict[str, str] = {"te1": "clip_l", "te2": "clip_g", "te3": "t5xxl"}


def build_targets(sd_model: Any, layer_keys: Iterable[str]) -> tuple[dict[str, Target], list[str]]:
    """Canonical key → :class:`~klora.apply.Target` in Forge's modules, and the keys not found."""
    encoders = backend.host_text_encoders(sd_model)
    return backend.build_targets(sd_model, layer_keys, (backend.unet_targets, backend.flux_targets),
                                 {c: encoders[n] for c, n in _TEXT_ENCODERS.items() if n in encoders},
                                 ("lora_unet_", "lora_transformer_"))


class ForgeHost(HostDefaults):
    name = "forge"

    def __init__(self, version: str | None = None) -> None:
        self.label = "Forge" + (f" {version}" if version else "")

    def family(self, model: Any) -> str:
        """By engine class (backend/diffusion_engine/*.py) and its ``is_sd*`` flags."""
        name = type(model).__name__
        if name in ("Flux", "Chroma"):
            return name.lower()
        if name == "StableDiffusionXLRefiner":
            return "sdxl-refiner"
        return flag_family(model) or name

    def refusal(self, model: Any) -> str | None:
        if self.family(model) in SUPPORTED:
            return None
        return f"K-LoRA does not support this model on Forge yet ({type(model).__name__})"

    def targets(self, model: Any, keys: Iterable[str]) -> dict[str, Target]:
        return build_targets(model, keys)[0]

    def before_sampling(self, p: Any, setup: Setup) -> None:
        backend.announce_memory(p, setup)
