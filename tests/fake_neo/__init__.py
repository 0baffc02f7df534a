"""The Forge Neo double: an overlay of the Forge double (``tests/fake_forge/host``) with only what Neo 2.26
(the exo101/sd-webui-forge-neo-v3 bundle, ``webui/``) does differently for K-LoRA. Each item names the Neo
file and function it mirrors:

* ``modules_forge/forge_version.py``: ``version = "neo"``, ``release = "2.26"``;
* ``backend/diffusion_engine/*.py``: the engine classes of the families Neo adds (:mod:`.engines`);
* ``modules/sd_samplers_common.py``: ``apply_refiner`` (Wan 2.2's second expert: a new model, or with
  ``refiner_fast_sd`` the refiner's weights loaded into the same modules and ``ORIGINAL_CHECKPOINT`` set) and
  ``apply_lora_for_refiner`` (``refiner_lora_replacement``), and ``modules/processing_scripts/refiner.py``
  ``ScriptRefiner.postprocess`` (the base weights back);
* the module trees of the new families: :mod:`.nets`.

:func:`install` applies it once the Forge double is importable (on ``sys.path``).
"""

from __future__ import annotations

from typing import Any

import pytest


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the imported Forge double into the Neo double (undone by ``monkeypatch``)."""
    from modules import sd_samplers_common, shared
    from modules_forge import forge_version

    monkeypatch.setattr(forge_version, "version", "neo")
    monkeypatch.setattr(forge_version, "release", "2.26", raising=False)
    monkeypatch.setattr(sd_samplers_common, "ORIGINAL_CHECKPOINT", None, raising=False)
    monkeypatch.setattr(sd_samplers_common, "apply_refiner", apply_refiner)
    # modules/shared_options.py, section "refiner"
    monkeypatch.setattr(shared.opts, "refiner_fast_sd", False, raising=False)
    monkeypatch.setattr(shared.opts, "refiner_lora_replacement", "high_noise=low_noise", raising=False)


# modules/sd_samplers_common.py: apply_lora_for_refiner(loras)
def apply_lora_for_refiner(loras: list[Any]) -> list[Any]:
    from modules import extra_networks, shared

    result = []
    for lora in loras or []:
        items = list(lora.items)
        for entry in shared.opts.refiner_lora_replacement.split("\n"):
            before, after = entry.split("=", 1)
            items[0] = items[0].replace(before.strip(), after.strip())
        result.append(extra_networks.ExtraNetworkParams(items))
    return result


# modules/sd_samplers_common.py: apply_refiner(cfg_denoiser, x, sigma) — by steps (refiner_use_steps); the
# checkpoint is the test's: p.refiner_engine (a new engine: checkpoint_change + forge_model_reload) or, in
# fast mode, p.refiner_state_dict loaded into the base engine's diffusion model
def apply_refiner(cfg_denoiser: Any, x: Any) -> bool:
    from modules import extra_networks, sd_samplers_common, shared

    p = cfg_denoiser.p
    if not p.refiner_switch_at or p.refiner_switch_at > cfg_denoiser.step / cfg_denoiser.total_steps:
        return False
    if sd_samplers_common.ORIGINAL_CHECKPOINT is not None:
        return False
    info = getattr(p, "refiner_checkpoint_info", None)
    if info is None or shared.sd_model.sd_checkpoint_info == info:
        return False
    if getattr(p, "enable_hr", False):
        return False
    p.extra_generation_params["Refiner"] = info.short_title
    p.extra_generation_params["Refiner switch at"] = p.refiner_switch_at

    def activate_loras() -> None:
        if not p.disable_extra_networks:
            loras = p.extra_network_data.pop("lora", None)
            p.extra_network_data["lora"] = apply_lora_for_refiner(loras)
            extra_networks.activate(p, p.extra_network_data)

    if shared.opts.refiner_fast_sd:
        model = shared.sd_model.forge_objects.unet.model.diffusion_model
        sd_samplers_common.ORIGINAL_CHECKPOINT = shared.sd_model.sd_checkpoint_info.filename
        model.load_state_dict(p.refiner_state_dict)  # backend/state_dict.py::load_state_dict: same modules
        activate_loras()
        return True
    shared.sd_model = p.refiner_engine
    activate_loras()
    p.setup_conds()
    return True


class RefinerScript:
    """modules/processing_scripts/refiner.py::ScriptRefiner.postprocess: after a fast switch, the base
    checkpoint's weights are loaded back and ORIGINAL_CHECKPOINT cleared."""

    def __init__(self, base_state_dict: dict[str, Any]) -> None:
        self.base = base_state_dict

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None

    def postprocess(self, p: Any, processed: Any) -> None:
        from modules import sd_samplers_common, shared

        if sd_samplers_common.ORIGINAL_CHECKPOINT is not None:
            shared.sd_model.forge_objects.unet.model.diffusion_model.load_state_dict(self.base)
            sd_samplers_common.ORIGINAL_CHECKPOINT = None
