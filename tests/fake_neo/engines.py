"""Mirrors of Forge Neo's engine classes for the families Neo adds (``backend/diffusion_engine/*.py``): their
names (K-LoRA tells families by them), their flags and their ``forge_objects`` (a UnetPatcher over a KModel; a
CLIP whose ``cond_stage_model`` children carry Neo's encoder names). Import after the Forge double is on
``sys.path``."""

from __future__ import annotations

from types import SimpleNamespace

from backend.diffusion_engine.base import ForgeDiffusionEngine
from backend.modules.k_model import KModel
from backend.patcher.clip import CLIP
from backend.patcher.unet import UnetPatcher
from torch import nn


class _NeoEngine(ForgeDiffusionEngine):
    """What every Neo engine does here: ``forge_objects`` from the diffusion model and named encoders, the
    ``model_config.huggingface_repo`` of its family, the ``is_*`` flags of ``fix_for_webui_backward_
    compatibility`` (no is_sd2/is_sd3 in Neo)."""

    repo = ""
    encoder_names: tuple[str, ...] = ()
    is_wan_flag = False

    def __init__(self, diffusion_model: nn.Module, *encoders: nn.Module, title: str = "model") -> None:
        super().__init__(SimpleNamespace(huggingface_repo=self.repo, nunchaku=False), None)
        kmodel = KModel(diffusion_model, config=self.model_config)
        unet = UnetPatcher(kmodel, load_device="cpu", offload_device="cpu")
        self._set_objects(unet, CLIP(model_dict=dict(zip(self.encoder_names, encoders, strict=True))))
        del self.is_sd2, self.is_sd3
        self.is_wan = self.is_wan_flag
        self.sd_checkpoint_info = SimpleNamespace(short_title=title, filename=f"{title}.safetensors")


class ZImage(_NeoEngine):  # backend/diffusion_engine/zimage.py
    repo, encoder_names = "Tongyi-MAI/Z-Image-Turbo", ("qwen3",)


class Lumina2(_NeoEngine):  # backend/diffusion_engine/lumina.py
    repo, encoder_names = "neta-art/Neta-Lumina", ("gemma2",)


class QwenImage(_NeoEngine):  # backend/diffusion_engine/qwen.py (is_wan: it uses Wan's VAE)
    repo, encoder_names, is_wan_flag = "Qwen/Qwen-Image", ("qwen25_7b",), True


class Wan(_NeoEngine):  # backend/diffusion_engine/wan.py
    repo, encoder_names, is_wan_flag = "Wan-AI/Wan2.1-T2V-14B", ("umt5xxl",), True


class Chroma(_NeoEngine):  # backend/diffusion_engine/chroma.py
    repo, encoder_names = "Chroma", ("t5xxl",)


class Anima(_NeoEngine):  # backend/diffusion_engine/anima.py (no K-LoRA support)
    repo, encoder_names, is_wan_flag = "circlestone-labs/Anima", ("qwen3_06b",), True
