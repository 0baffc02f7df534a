"""Forge Neo (the ``neo`` branch of Haoming02/sd-webui-forge-classic, a fork of Forge's ``backend/``):
canonical keys → Neo's modules for SD1.5, SDXL, Flux, Chroma, Z-Image, Lumina 2, Qwen-Image and Wan, the
hooks' memory announced as on Forge (:mod:`.backend`), Wan 2.2's second expert, and Nunchaku refused.

* **Families** by engine class (``backend/diffusion_engine/*.py``; every engine subclasses
  ``ForgeDiffusionEngine`` directly, so the class name is exact where ``isinstance`` on the configs is not:
  Chroma's config subclasses Flux's, Z-Image's Lumina 2's). SD2 and SD3 are gone from Neo; the other engines
  (Flux.2, Anima, Ernie, Krea 2, PiD) are refused by name.
* **Modules.** SD UNets and Flux/Chroma as on Forge. Z-Image and Lumina 2 (``NextDiT``), Qwen-Image and Wan
  through their tables (:mod:`klora.keys.dit`); a projection of Z-Image's fused ``attention.qkv`` lands on its
  output rows, computed from the module's shape (Neo's own key map gets Lumina 2's k and v rows wrong). Text
  encoders: ``clip_l``/``clip_g`` (``te1``/``te2``), ``t5xxl`` or Wan's ``umt5xxl`` (``te3``), any other
  (``qwen3``, ``qwen25_7b`` …) as ``te_<name>``. Keys left over go to Neo's key map in the kohya, OneTrainer
  and SimpleTuner spellings.
* **Quantised models.** fp8 (a real ``nn.Linear``), GGUF and NF4 Linears are placed by their logical shape;
  no weight is read or written. **Nunchaku** (SVDQuant) models fuse and quantise their layers and take LoRAs
  their own way (``model.diffusion_model.loras``): refused, the image made without K-LoRA.
* **Wan 2.2's experts.** The high-noise checkpoint samples first; Neo's Refiner switches to the low-noise one
  mid-pass (``modules/sd_samplers_common.py::apply_refiner``), either loading a new model (its
  ``sd_checkpoint_info`` says so) or, with ``refiner_fast_sd``, loading the low-noise weights into the same
  modules (then ``ORIGINAL_CHECKPOINT`` is set and the refiner's checkpoint is what the model holds). K-LoRA
  continues there with the pair whose names Neo's own ``refiner_lora_replacement`` option
  (``high_noise=low_noise`` per line) makes of the content and style names, as Neo does for ``<lora>`` tags;
  τ runs on through the switch (the denoiser's step count does).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from torch import nn

from klora.apply import Target
from klora.keys.dit import DitFamily
from klora.keys.qwen import QWEN_IMAGE
from klora.keys.wan import WAN
from klora.keys.zimage import NEXTDIT
from klora.webui.hosts import backend
from klora.webui.hosts.base import flag_family

if TYPE_CHECKING:
    from klora.webui.session import Setup

# engine class (backend/diffusion_engine/*.py) → family
_ENGINES: dict[str, str] = {
    "Flux": "flux",  # Flux.1 dev/schnell/Kontext
    "Chroma": "chroma",
    "ZImage": "zimage",
    "Lumina2": "lumina2",
    "QwenImage": "qwen-image",
    "Wan": "wan",  # Wan 2.1 and 2.2 (the is_wan flag is also set by Qwen-Image, Anima, Krea 2)
    "StableDiffusionXLRefiner": "sdxl-refiner",
}
_DIT: dict[str, DitFamily] = {"zimage": NEXTDIT, "lumina2": NEXTDIT, "qwen-image": QWEN_IMAGE, "wan": WAN}
SUPPORTED: tuple[str, ...] = ("sd1", "sdxl", "flux", "chroma", *_DIT)
_CLIP: dict[str, str] = {"clip_l": "te1", "clip_g": "te2", "t5xxl": "te3", "umt5xxl": "te3"}
# backend/nn/svdq.py: the classes a Nunchaku checkpoint builds
_NUNCHAKU = ("SVDQFluxTransformer2DModel", "NunchakuQwenImageTransformer2DModel", "NunchakuZImage2DModel")


def text_encoder_components(sd_model: Any) -> dict[str, nn.Module]:
    """Canonical component → Neo's text encoder (see the module docstring)."""
    return {_CLIP.get(name, f"te_{name}"): module
            for name, module in backend.host_text_encoders(sd_model).items()}


def build_targets(sd_model: Any, family: str, layer_keys: Iterable[str]
                  ) -> tuple[dict[str, Target], list[str]]:
    """Canonical key → :class:`~klora.apply.Target` in Neo's modules of a model of ``family``, and the keys
    not found."""
    dit = _DIT.get(family)
    denoiser: list[backend.DenoiserTargets] = [backend.unet_targets]
    if dit is not None:
        denoiser.append(lambda dm, wanted: backend.dit_targets(dm, dit, wanted))
    elif family in ("flux", "chroma"):
        denoiser.append(backend.flux_targets)
    return backend.build_targets(sd_model, layer_keys, denoiser, text_encoder_components(sd_model),
                                 ("lora_unet_", "lora_transformer_", "lycoris_"))


def nunchaku(sd_model: Any) -> bool:
    """Whether ``sd_model`` is a Nunchaku (SVDQuant) model (``BASE.__init__`` pops the config's ``nunchaku``
    flag into ``model_config.nunchaku``; the model classes of ``backend/nn/svdq.py`` keep a ``loras``
    list)."""
    if getattr(getattr(sd_model, "model_config", None), "nunchaku", False) is True:
        return True
    try:
        dm = backend.diffusion_model(sd_model)
    except AttributeError:
        return False
    return type(dm).__name__ in _NUNCHAKU or isinstance(getattr(dm, "loras", None), list)


def refiner_names(name: str, replacements: str) -> str:
    """A LoRA name with Neo's ``refiner_lora_replacement`` applied (``before=after`` per line, each replaced
    everywhere in the name, in order; ``modules/sd_samplers_common.py::apply_lora_for_refiner``)."""
    for line in replacements.splitlines():
        before, sep, after = line.partition("=")
        if sep and before.strip():
            name = name.replace(before.strip(), after.strip())
    return name


class NeoHost:
    name = "neo"

    def __init__(self, version: str | None = None) -> None:
        self.label = "Forge Neo" + (f" {version}" if version else "")

    def family(self, model: Any) -> str:
        name = type(model).__name__
        return _ENGINES.get(name) or flag_family(model) or name

    def refusal(self, model: Any) -> str | None:
        if nunchaku(model):
            return ("K-LoRA cannot run on a Nunchaku (SVDQuant) model: it keeps its layers fused and "
                    "quantised and applies LoRAs its own way; use a non-Nunchaku checkpoint of the model "
                    "(fp16, bf16, fp8, GGUF or NF4)")
        if self.family(model) in SUPPORTED:
            return None
        return f"K-LoRA does not support this model on Forge Neo yet ({type(model).__name__})"

    def targets(self, model: Any, keys: Iterable[str]) -> dict[str, Target]:
        return build_targets(model, self.family(model), keys)[0]

    def before_sampling(self, p: Any, setup: Setup) -> None:
        backend.announce_memory(p, setup)

    def loaded_checkpoint(self, p: Any, model: Any) -> Any:
        """The refiner's checkpoint while its weights sit in the base model's modules (``refiner_fast_sd``:
        ``ORIGINAL_CHECKPOINT`` is set until ``ScriptRefiner.postprocess`` loads the base weights back)."""
        try:
            from modules import sd_samplers_common  # the host's
        except ImportError:
            sd_samplers_common = None
        refiner = getattr(p, "refiner_checkpoint_info", None)
        if getattr(sd_samplers_common, "ORIGINAL_CHECKPOINT", None) is not None and refiner is not None:
            return refiner
        return getattr(model, "sd_checkpoint_info", None)

    def expert_pair(self, p: Any, model: Any, content: str, style: str) -> tuple[str, str] | None:
        """Wan's second expert: the pair renamed by Neo's ``refiner_lora_replacement`` (the same names when
        they hold no ``high_noise``: one pair for both experts). Other refiners end K-LoRA."""
        if self.family(model) != "wan":
            return None
        from modules import shared  # the host's

        replacements = str(getattr(shared.opts, "refiner_lora_replacement", "") or "")
        return refiner_names(content, replacements), refiner_names(style, replacements)
