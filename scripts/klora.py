"""K-LoRA: the always-visible script (title "K-LoRA").

The webui imports this file with the extension's folder on ``sys.path`` (modules/scripts.py ``load_scripts``),
so ``import klora`` finds the package next to it. The work happens in ``klora/webui/``: ``a1111.py`` on
AUTOMATIC1111's webui, ``forge.py`` on Forge; both offer the same entry points, and ``klora.webui.host``
picks one by the packages the host ships. Callbacks are registered here, at import: the webui clears them and
imports this file again when it reloads its scripts, so they never pile up.
"""

from __future__ import annotations

import logging
from typing import Any

from modules import script_callbacks, scripts

from klora.webui import common, host

log = logging.getLogger("klora")

try:
    impl: Any = host.adapter(host.detect())
    HOST_ERROR: str | None = None
except RuntimeError as err:  # a webui fork without an adapter: the panel says so, generation is untouched
    impl = None
    HOST_ERROR = str(err)
    log.error(HOST_ERROR)


class KLoraScript(scripts.Script):
    """The panel and the generation hooks; every hook gets the panel's values (common.ARG_NAMES order)."""

    def title(self) -> str:
        return common.TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        if impl is None:
            return common.build_ui(self, is_img2img, list, list, _no_host)
        return impl.build_ui(self, is_img2img)

    def before_process(self, p: Any, *args: Any) -> None:
        if impl is not None:
            impl.before_process(p, args)

    def process(self, p: Any, *args: Any) -> None:
        if impl is not None:
            impl.process(p, args)
        elif HOST_ERROR and _wanted(p, args):
            p.comment(HOST_ERROR)

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if impl is not None:
            impl.after_extra_networks_activate(p, args, kwargs.get("extra_network_data"))

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if impl is not None:
            impl.process_batch(p, args)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if impl is not None:
            impl.process_before_every_sampling(p)

    def postprocess_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if impl is not None:
            impl.postprocess_batch(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        if impl is not None:
            impl.postprocess(p, processed)


def _no_host(args: common.KLoraArgs, steps: int) -> tuple[Any, str]:
    return None, f"**{HOST_ERROR}**"


def _wanted(p: Any, args: tuple[Any, ...]) -> bool:
    try:
        return common.from_script_args(list(args)).enabled or "<klora:" in str(getattr(p, "prompt", ""))
    except common.KLoraArgsError:
        return True


if impl is not None:
    script_callbacks.on_cfg_denoiser(impl.on_cfg_denoiser, name="klora_step")
    script_callbacks.on_before_ui(impl.on_before_ui, name="klora_tag_and_xyz")
    script_callbacks.on_ui_settings(impl.on_ui_settings, name="klora_settings")
    script_callbacks.on_script_unloaded(impl.on_script_unloaded, name="klora_cleanup")
    script_callbacks.on_app_started(impl.on_app_started, name="klora_api_check")
