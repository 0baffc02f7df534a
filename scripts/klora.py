"""K-LoRA: the always-visible script (title "K-LoRA").

The webui imports this file with the extension's folder on ``sys.path`` (modules/scripts.py ``load_scripts``),
so ``import klora`` finds the package next to it. The work happens in ``klora/webui/``: the host is detected
by the packages it ships (``klora.webui.hosts``) and an ``Extension`` bound to it gets every hook. Callbacks
are registered here, at import: the webui clears them and imports this file again when it reloads its scripts,
so they never pile up.
"""

from __future__ import annotations

import logging
from typing import Any

from modules import script_callbacks, scripts

from klora.webui import args as klora_args
from klora.webui import hosts, panel, tag

log = logging.getLogger("klora")

try:
    host = hosts.load(hosts.detect())
    HOST_ERROR: str | None = None
except RuntimeError as err:  # a webui fork without an adapter: the panel says so, generation is untouched
    host = None
    HOST_ERROR = str(err)
    log.error(HOST_ERROR)

if host is not None:
    from klora.webui.extension import Extension

    ext: Any = Extension(host)
else:
    ext = None


class KLoraScript(scripts.Script):
    """The panel and the generation hooks; every hook gets the panel's values (``ARG_NAMES`` order)."""

    def title(self) -> str:
        return klora_args.TITLE

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def after_component(self, component: Any, **kwargs: Any) -> None:
        """Catch this tab's sampling steps and prompt (created before the scripts' panels) for the panel."""
        tab = "img2img" if getattr(self, "is_img2img", False) else "txt2img"
        elem_id = kwargs.get("elem_id")
        if elem_id in (f"{tab}_steps", f"{tab}_prompt"):
            if not hasattr(self, "tab_components"):
                self.tab_components = panel.TabComponents()
            setattr(self.tab_components, elem_id.removeprefix(f"{tab}_"), component)

    def ui(self, is_img2img: bool) -> list[Any]:
        tab = getattr(self, "tab_components", None)
        if ext is None:
            return panel.build_ui(self, is_img2img, list, list, _no_host, tab=tab)
        return ext.build_ui(self, is_img2img, tab)

    def before_process(self, p: Any, *args: Any) -> None:
        if ext is not None:
            ext.before_process(p, args)

    def process(self, p: Any, *args: Any) -> None:
        if ext is not None:
            ext.process(p, args)
        elif HOST_ERROR and _wanted(p, args):
            p.comment(HOST_ERROR)

    def after_extra_networks_activate(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if ext is not None:
            ext.after_extra_networks_activate(p, args, kwargs.get("extra_network_data"))

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if ext is not None:
            ext.process_batch(p, args)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if ext is not None:
            ext.process_before_every_sampling(p)

    def postprocess_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        if ext is not None:
            ext.postprocess_batch(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        if ext is not None:
            ext.postprocess(p, processed)


def _no_host(args: Any, steps: int) -> tuple[Any, str]:
    return None, f"**{HOST_ERROR}**"


def _wanted(p: Any, args: tuple[Any, ...]) -> bool:
    try:
        enabled = klora_args.from_script_args(list(args)).enabled
        return enabled or f"<{tag.TAG_NAME}:" in str(getattr(p, "prompt", ""))
    except klora_args.KLoraArgsError:
        return True


if ext is not None:
    ext.register_callbacks(script_callbacks)
