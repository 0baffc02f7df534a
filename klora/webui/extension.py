"""The extension's entry points, bound to the running host: the script's hooks, the callbacks it registers,
the tag's extra network, the Analyze button, the settings and the panel. ``scripts/klora.py`` makes one
:class:`Extension` and forwards to it; everything host-specific is behind ``Extension.host``.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Iterable
from typing import Any

from modules import extra_networks, shared

from klora import apply, fusion, scores
from klora.diskcache import DEFAULT_MAX_BYTES
from klora.layers import LoraFormatError
from klora.webui import api, infotext, loras, panel, session, tag, xyz
from klora.webui.args import KLoraArgs, KLoraArgsError
from klora.webui.hosts.base import Host
from klora.webui.loras import KLoraInputError
from klora.webui.session import TAG_ATTR, Session, session_of

log = logging.getLogger("klora")

SETTINGS_SECTION = ("klora", "K-LoRA")
DISK_CACHE_MB = DEFAULT_MAX_BYTES // 2**20  # the setting's default: the engine's bound, in MB


class ExtraNetworkKLora(extra_networks.ExtraNetwork):
    """``<klora:CONTENT:STYLE:…>``: registered so that the webui strips the tag from the text the model sees.
    ``activate`` only records the tag's parameters on ``p`` (called at every activation, with [] when the
    prompt has no tag); the work happens in the script's ``after_extra_networks_activate``, after every
    network (including the builtin Lora, which rebuilds its list) has activated."""

    def __init__(self) -> None:
        super().__init__(tag.TAG_NAME)

    def activate(self, p: Any, params_list: list[Any]) -> None:
        p.__dict__[TAG_ATTR] = list(params_list)

    def deactivate(self, p: Any) -> None:
        pass


def prompt_lora_names(extra_network_data: Any) -> list[str]:
    """The LoRA names of the prompt's ``<lora:NAME:…>`` tags (``<lyco:…>`` on older webuis), from the parsed
    extra networks (modules/extra_networks.py ``parse_prompts``)."""
    if not isinstance(extra_network_data, dict):
        return []
    names = []
    for network in ("lora", "lyco"):
        for params in extra_network_data.get(network, []) or []:
            positional = getattr(params, "positional", None) or []
            if positional and isinstance(positional[0], str):
                names.append(positional[0])
    return names


def selection_map(plan: fusion.Plan, steps: int, args: KLoraArgs) -> Any:
    from klora import viz

    try:  # the webui's own font (A1111's Pillow 9.5 has no scalable default one)
        from modules.paths_internal import roboto_ttf_file

        viz.use_font(roboto_ttf_file)
    except (ImportError, AttributeError):
        pass
    return viz.render_selection_map(plan, max(1, steps), title=f"K-LoRA: {args.content} × {args.style}")


def webui_cache_dir() -> str:
    """The folder for K-LoRA's score tables: ``klora`` in the webui's cache folder (modules/cache.py
    ``cache_dir``, ``SD_WEBUI_CACHE_DIR``; A1111 before 1.9 has none: ``cache`` in the data folder)."""
    try:
        from modules.cache import cache_dir
    except ImportError:
        from modules.paths_internal import data_path

        cache_dir = os.path.join(data_path, "cache")
    return os.path.join(cache_dir, "klora")


def apply_cache_size() -> None:
    """The score caches from the settings: pairs kept in memory, MB of score tables on disk (0: none)."""
    size = getattr(shared.opts, "klora_cache_size", 8)
    disk_mb = getattr(shared.opts, "klora_disk_cache_mb", DISK_CACHE_MB)
    try:
        scores.set_cache_size(max(0, int(size)))
        scores.set_disk_cache(webui_cache_dir() if float(disk_mb) > 0 else None, int(float(disk_mb) * 2**20))
    except (TypeError, ValueError, ImportError) as err:
        log.warning("K-LoRA: bad score cache settings (%r, %r MB): %s", size, disk_mb, err)


def panel_defaults() -> KLoraArgs:
    opts = shared.opts
    try:
        return KLoraArgs(pattern=getattr(opts, "klora_default_pattern", "s"),
                         show_map=bool(getattr(opts, "klora_default_show_map", False)))
    except (AttributeError, KLoraArgsError):
        return KLoraArgs()


def make_warnings_visible(logger: logging.Logger = log) -> None:
    """Let K-LoRA's warnings reach the console on hosts whose root logger drops them (Forge Neo sets it to
    ERROR unless ``SD_WEBUI_LOG_LEVEL`` is set): the ``klora`` logger passes warnings to the root's handlers
    itself. (What a generation warns is also in the infotext and under the images.)"""
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)


class Extension:
    """K-LoRA on one host. The methods named after script hooks take the script's ``args``. ``notices``: what
    went wrong outside any generation (the API check or the XYZ axes not installed …), shown by Analyze."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.notices: list[str] = []
        make_warnings_visible()

    def notice(self, message: str) -> None:
        """A warning outside any generation: the console, and Analyze's summary."""
        log.warning(message)
        if message not in self.notices:
            self.notices.append(message)

    # -- the script's hooks ----------------------------------------------------------------------

    def before_process(self, p: Any, script_args: Iterable[Any]) -> None:
        session.sweep()

    def process(self, p: Any, script_args: Iterable[Any]) -> None:
        """Start of a generation: a fresh session (a copy of ``p`` may carry its original's, which is not
        ours)."""
        p.__dict__[session.SESSION_ATTR] = Session(p, script_args, self.host)
        p.__dict__[TAG_ATTR] = None
        params = getattr(p, "extra_generation_params", None)
        if isinstance(params, dict):
            params.pop(infotext.WARNING_KEY, None)  # a copy of p may carry its original's

    def after_extra_networks_activate(self, p: Any, script_args: Iterable[Any],
                                      extra_network_data: Any = None) -> None:
        s = session_of(p)
        if s is None:
            self.process(p, script_args)
            s = session_of(p)
            assert s is not None
        tag_params = p.__dict__.get(TAG_ATTR)
        if tag_params is None and isinstance(extra_network_data, dict):
            tag_params = list(extra_network_data.get(tag.TAG_NAME, []))
        s.activate(tag_params, prompt_lora_names(extra_network_data))
        if s.setup is None:
            return
        session.wrap(p, s)
        if getattr(p, "is_hr_pass", False) and not s.windows:
            # on only from the hires activation, inside a p.sample that is not wrapped: attach now (the hires
            # conditioning is computed next) until postprocess_batch
            s.fallback = True
            s.sync()

    def process_batch(self, p: Any, script_args: Iterable[Any]) -> None:
        """With ``p.disable_extra_networks`` there is no activation: K-LoRA still follows the panel."""
        if getattr(p, "disable_extra_networks", False):
            p.__dict__[TAG_ATTR] = []
            self.after_extra_networks_activate(p, script_args, {})

    def process_before_every_sampling(self, p: Any) -> None:
        """Start of a sampling pass (A1111 ≥ 1.10, Forge): τ at the pass's start; attach if our wrapper was
        bypassed; the host's own preparation (Forge: the hooks' memory)."""
        s = session_of(p)
        if s is None or s.setup is None:
            return
        s.progress.start_pass(p)
        if not s.windows and not s.refiner_off:
            s.fallback = True  # no wrapper frame: keep the hooks until postprocess_batch
            s.sync()
        setup = s.setup
        if setup is not None and not s.refiner_off and p.sd_model is setup.model:
            self.host.before_sampling(p, setup)

    def postprocess_batch(self, p: Any) -> None:
        """After a batch's sampling: our wrapper frames are closed, so anything attached now came through the
        fallback of :meth:`process_before_every_sampling`; remove it, and any wrapper left on ``p``, before
        extensions copy ``p`` in ``postprocess_image``."""
        s = session_of(p)
        if s is not None:
            s.detach()
            session.unwrap(p, s)

    def postprocess(self, p: Any, processed: Any) -> None:
        s = session_of(p)
        if s is None:
            return
        s.windows.clear()
        s.detach()
        session.unwrap(p, s)
        apply.clear_cache()  # factors are reused across the batches and passes of a generation, not after
        setup = s.last_setup
        if setup is not None and setup.args.show_map and processed is not None:
            try:
                image = selection_map(setup.plan, int(p.steps), setup.args)
            except Exception as err:  # the map is an extra; never fail the generation for it
                self.notice(f"K-LoRA: could not draw the selection map: {err}")
            else:
                processed.images.append(image)
                infotexts = getattr(processed, "infotexts", None)
                if isinstance(infotexts, list) and infotexts:
                    infotexts.append(infotexts[0])

    # -- callbacks -------------------------------------------------------------------------------

    def register_callbacks(self, script_callbacks: Any) -> None:
        """Register the callbacks below with the webui's ``modules.script_callbacks``, by name where it takes
        one (A1111 1.8 and later, Forge, Neo: the names order callbacks in the settings; 1.6 and 1.7 take the
        callback alone)."""
        for event, callback, name in (
            ("on_cfg_denoiser", self.on_cfg_denoiser, "klora_step"),
            ("on_before_ui", self.on_before_ui, "klora_tag_and_xyz"),
            ("on_ui_settings", self.on_ui_settings, "klora_settings"),
            ("on_script_unloaded", self.on_script_unloaded, "klora_cleanup"),
            ("on_app_started", self.on_app_started, "klora_api_check"),
        ):
            register = getattr(script_callbacks, event)
            if "name" in inspect.signature(register).parameters:
                register(callback, name=name)
            else:
                register(callback)

    def on_cfg_denoiser(self, params: Any) -> None:
        """``script_callbacks.on_cfg_denoiser``: set τ before the model call(s) of each denoiser step."""
        denoiser = getattr(params, "denoiser", None)
        s = session_of(getattr(denoiser, "p", None)) if denoiser is not None else session.window_session
        if session.attached_sessions() - {s}:
            session.sweep(keep=s)  # hooks of a session not sampling now must not touch this sampling
        if s is None or s.setup is None or s.refiner_off:
            return
        if s.model_switched() and not s.follow_switch():
            s.refiner_off = True
            s.detach()
            s.note("not applied after the switch to the refiner")
            return
        if denoiser is not None:
            s.progress.from_denoiser(s.p, denoiser)
        else:
            s.progress.from_callback(s.p, params)

    def on_app_started(self, demo: Any, app: Any) -> None:
        """``script_callbacks.on_app_started`` (also fired by ``api_only()``): bad K-LoRA args in an API
        request, and names the webui's LoRA list lacks, get HTTP 422 with the reason — the webui only logs
        exceptions raised in script hooks, so the request would otherwise succeed without K-LoRA."""
        try:
            api.install_api_validation(app, name_exists=loras.lora_exists)
        except Exception as err:  # K-LoRA works without it; bad args then only warn with the image
            self.notice(f"K-LoRA: API argument check not installed: {err}")

    def on_script_unloaded(self) -> None:
        for s in session.attached_sessions():
            s.windows.clear()
            s.detach()
        apply.clear_cache()

    def on_before_ui(self) -> None:
        """Register the tag and the XYZ plot axes (``extra_networks.initialize()`` ran just before)."""
        extra_networks.register_extra_network(ExtraNetworkKLora())
        try:
            xyz.register_axes(loras.lora_names)
        except Exception as err:  # the XYZ script may be missing or changed; K-LoRA works without its axes
            self.notice(f"K-LoRA: XYZ plot axes not added: {err}")

    def on_ui_settings(self) -> None:
        """Settings → K-LoRA: panel defaults and the score cache size."""
        try:
            import gradio as gr
        except ImportError:  # only the webui's UI needs the component classes
            gr = None
        opts = shared.opts
        info = shared.OptionInfo
        opts.add_option("klora_default_pattern", info(
            "s", "Default pattern", gr.Radio if gr else None, {"choices": ["s", "s*"]},
            section=SETTINGS_SECTION).info("s: the paper's linear scale; s*: the official code's"
                                           ).needs_reload_ui())
        opts.add_option("klora_default_show_map", info(
            False, "Show the selection map by default", section=SETTINGS_SECTION).needs_reload_ui())
        opts.add_option("klora_cache_size", info(
            8, "LoRA pairs whose scores are kept in memory", gr.Number if gr else None, {"precision": 0},
            onchange=apply_cache_size, section=SETTINGS_SECTION).info("scores are computed once per pair"))
        opts.add_option("klora_disk_cache_mb", info(
            DISK_CACHE_MB, "MB of LoRA score tables kept on disk", gr.Number if gr else None,
            {"precision": 0}, onchange=apply_cache_size, section=SETTINGS_SECTION).info(
                "so that a restart does not score known LoRAs again; 0: none"))
        apply_cache_size()

    # -- the panel ---------------------------------------------------------------------------------

    def analyze(self, args: KLoraArgs, steps: int) -> tuple[Any, str]:
        """The Analyze button: the selection map and the summary for a pair on the loaded model, without
        generating."""
        from klora import viz

        model = shared.sd_model
        note = None
        try:
            if model is not None:
                args, note = session.with_family_defaults(args, self.host.family(model))
            content, style = loras.load_pair(args.content, args.style)
            options = args.to_fusion_options(0)
            plan = fusion.make_plan(content, style, options, session.scoring_device())
        except KLoraInputError as err:
            return None, f"**{err}**"
        except LoraFormatError as err:
            return None, f"**K-LoRA: cannot read LoRA file** `{err}`"
        except ValueError as err:
            return None, f"**K-LoRA:** {err}"
        lines = [viz.summarize(plan, steps), *session.pair_warnings(args, content, style)]
        if model is not None:
            try:
                refusal = self.host.refusal(model)
                if refusal:
                    lines.append(f"Loaded model: {refusal}.")
                else:
                    cov = apply.cover(plan, content, style, self.host.targets(model, plan.layers))
                    described = cov.describe()
                    lines.append(f"Loaded model ({self.host.label}, {self.host.family(model)}): "
                                 f"{len(cov.mapped)} of {len(plan.layers)} layers found"
                                 + (f" ({described})" if described else "") + ".")
            except Exception as err:  # the analysis is useful without it
                log.debug("K-LoRA: coverage check failed: %s", err)
        if note:
            lines.append(f"({note})")
        lines.extend(self.notices)
        return selection_map(plan, steps, args), "```\n" + "\n\n".join(lines) + "\n```"

    def build_ui(self, script: Any, is_img2img: bool, tab: panel.TabComponents | None = None) -> list[Any]:
        return panel.build_ui(script, is_img2img, loras.lora_names, loras.refresh_lora_names, self.analyze,
                              defaults=panel_defaults(), resolve_name=loras.resolve_pasted_name, tab=tab)
