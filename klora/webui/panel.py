"""The K-LoRA panel (gradio is imported only inside :func:`build_ui`): an accordion with the pair, the
strengths and the balance, the rule's parameters in an "Advanced" fold, the map switch, Analyze and "Copy as
tag". Labels and choices come from the options table; the components are returned in
:data:`klora.webui.args.ARG_NAMES` order. Works on Gradio 3.41 (A1111) and Gradio 4 (Forge, Neo): only
constructor arguments and events both have."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from klora import options
from klora.options import NO_LORA, PATTERNS
from klora.webui.args import ARG_NAMES, TITLE, KLoraArgs, KLoraArgsError, from_script_args, ui_value
from klora.webui.infotext import paste_getters
from klora.webui.tag import TAG_NAME, format_tag

Analyze = Callable[[KLoraArgs, int], tuple[Any, str]]
"""``analyze(args, steps)`` → (selection-map image or None, markdown summary)."""


def pattern_defaults(pattern_value: Any) -> tuple[float, float]:
    """(α, β) the panel shows after the user picks a pattern (code or label): that pattern's defaults."""
    spec = PATTERNS[options.parse("pattern", pattern_value)["pattern"]]
    return spec.alpha, spec.beta


def run_analyze(analyze: Analyze, values: Sequence[Any], steps: Any) -> tuple[Any, str]:
    """The Analyze button: panel values → ``analyze(args, steps)`` → (image or None, markdown).

    Any error becomes a readable message in the markdown, never a traceback.
    """
    try:
        args = from_script_args(list(values)).require_pair()
        try:
            n = int(float(steps))
        except (TypeError, ValueError):
            raise KLoraArgsError(f"K-LoRA: the step count for the analysis must be a number, got {steps!r}",
                                 "steps") from None
        if n < 1:
            raise KLoraArgsError("K-LoRA: the step count for the analysis must be at least 1", "steps")
        return analyze(args, n)
    except KLoraArgsError as err:
        message = str(err).removeprefix("K-LoRA: ")
        return None, f"**Cannot analyze:** {md_escape(message)}"
    except Exception as err:  # the host's analysis failed: say why, keep the UI alive
        return None, f"**K-LoRA analysis failed:** {md_escape(f'{type(err).__name__}: {err}')}"


def _major(version: str) -> int:
    match = re.match(r"\d+", str(version))
    return int(match.group()) if match else 0


def md_escape(text: str) -> str:
    """``text`` shown literally in gradio Markdown."""
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


@dataclass
class TabComponents:
    """Components of the txt2img/img2img tab the panel works with, caught by the script's
    ``after_component`` (modules/scripts.py ``Script.after_component``): the tab's sampling steps (the
    Analyze steps follow them) and prompt ("Copy as tag" writes into it). None where the host has no such
    component."""

    steps: Any = None
    prompt: Any = None


def tag_into_prompt(prompt: Any, values: Sequence[Any]) -> tuple[str, str]:
    """"Copy as tag": ``prompt`` with the panel's settings as its ``<klora:…>`` tag (replacing a tag already
    there), and a line for the summary. The prompt is unchanged, and the line says why, for settings that
    cannot be written as a tag."""
    prompt = prompt if isinstance(prompt, str) else ""
    try:
        text = format_tag(from_script_args(list(values)).require_pair())
    except KLoraArgsError as err:
        return prompt, f"**Cannot write a tag:** {md_escape(str(err).removeprefix('K-LoRA: '))}"
    rest = re.sub(rf"\s*<{TAG_NAME}:[^>]*>", "", prompt).rstrip()
    return (f"{rest} {text}" if rest else text), f"Tag written to the prompt: `{text}`"


def build_ui(script: Any, is_img2img: bool, lora_names: Callable[[], list[str]], refresh: Callable[[], Any],
             analyze: Analyze, defaults: KLoraArgs | None = None,
             resolve_name: Callable[[str, str | None], str | None] | None = None,
             tab: TabComponents | None = None) -> list[Any]:
    """Build the K-LoRA panel inside the current gradio Blocks; return its components in ARG_NAMES order.

    First the pair, the strengths and the balance (subject ↔ style); the rule's parameters (pattern, α, β, γ,
    mode, scope, text encoder, K) in an "Advanced" fold. ``lora_names()`` lists the LoRAs (as the Lora tab
    names them), ``refresh()`` rescans the LoRA folders, ``analyze`` draws the map. ``defaults`` sets the
    initial values (e.g. the pattern from the settings); ``resolve_name`` maps a pasted name to a local file
    (:func:`klora.webui.infotext.infotext_paste_values`); ``tab`` links the Analyze steps to the tab's
    sampling steps and lets "Copy as tag" write into the prompt. Also sets ``script.infotext_fields``.
    Side-effect free otherwise and idempotent: the API calls ``ui()`` again inside a throwaway Blocks.
    """
    import gradio as gr
    from modules.ui_common import create_refresh_button
    from modules.ui_components import InputAccordion

    d = (defaults or KLoraArgs()).resolved()
    eid = script.elem_id
    opt = options.option
    tab = tab or TabComponents()

    def choices() -> list[str]:
        try:
            found = [str(n) for n in lora_names()]
        except Exception:
            found = []
        return [NO_LORA, *found]

    def refreshed() -> dict[str, Any]:
        return {"choices": choices()}

    def lora(name: str) -> Any:
        box = gr.Dropdown(label=opt(name).label, choices=choices(), value=getattr(d, name) or NO_LORA,
                          allow_custom_value=True, elem_id=eid(name))
        create_refresh_button(box, refresh, refreshed, eid(f"{name}_refresh"))
        return box

    def slider(name: str, low: float, high: float, step: float) -> Any:
        value = {"alpha": d.resolved_alpha, "beta": d.resolved_beta}.get(name, getattr(d, name))
        return gr.Slider(label=opt(name).label, minimum=low, maximum=high, step=step, value=value,
                         elem_id=eid(name))

    def pick(name: str, component: Any = None) -> Any:
        labels = list(opt(name).choices.values())
        value = opt(name).label_of(getattr(d, name))
        return (component or gr.Radio)(label=opt(name).label, choices=labels, value=value, elem_id=eid(name))

    with InputAccordion(d.enabled, label=TITLE, elem_id=eid("enable")) as enabled:
        with gr.Row(elem_id=eid("pair_row"), elem_classes=["klora-row"]):
            content, style = lora("content"), lora("style")
        with gr.Row(elem_id=eid("balance_row"), elem_classes=["klora-row"]):
            balance = slider("balance", -1.0, 1.0, 0.05)
        with gr.Row(elem_id=eid("strength_row"), elem_classes=["klora-row"]):
            content_strength = slider("content_strength", -4.0, 4.0, 0.05)
            style_strength = slider("style_strength", -4.0, 4.0, 0.05)
        with gr.Accordion("Advanced", open=False, elem_id=eid("advanced")):
            with gr.Row(elem_id=eid("schedule_row"), elem_classes=["klora-row"]):
                pattern = pick("pattern")
                alpha, beta = slider("alpha", 0.0, 5.0, 0.025), slider("beta", 0.0, 5.0, 0.025)
            with gr.Row(elem_id=eid("gamma_row"), elem_classes=["klora-row"]):
                gamma = pick("gamma")
                gamma_value = gr.Number(label=opt("gamma_value").label, value=d.gamma_value,
                                        visible=d.gamma == "manual", elem_id=eid("gamma_value"))
                k = gr.Number(label=f"{opt('k').label}, 0: rank × rank", value=ui_value("k", d), precision=0,
                              elem_id=eid("k"))
            with gr.Row(elem_id=eid("mode_row"), elem_classes=["klora-row"]):
                mode, scope, te = pick("mode", gr.Dropdown), pick("scope"), pick("te")
        with gr.Row(elem_id=eid("map_row"), elem_classes=["klora-row"]):
            show_map = gr.Checkbox(label=opt("show_map").label, value=d.show_map, elem_id=eid("show_map"))
            steps = getattr(tab.steps, "value", None)
            analyze_steps = gr.Slider(label="Steps to analyze", minimum=1, maximum=150, step=1,
                                      value=steps if isinstance(steps, int | float) else 20,
                                      elem_id=eid("analyze_steps"))
            analyze_button = gr.Button("Analyze", elem_id=eid("analyze"))
            tag_button = gr.Button("Copy as tag", elem_id=eid("copy_tag"))
        with gr.Row(elem_id=eid("analysis_row"), elem_classes=["klora-row"]):
            # Gradio 4 sends images as lossy webp by default: the map's cells need png (no such argument in 3)
            image_format = {"format": "png"} if _major(gr.__version__) >= 4 else {}
            map_image = gr.Image(label="Selection map", type="pil", interactive=False, visible=False,
                                 elem_id=eid("map_image"), **image_format)
            summary = gr.Markdown("", elem_id=eid("summary"))

    by_name = {"enabled": enabled, "content": content, "style": style, "content_strength": content_strength,
               "style_strength": style_strength, "pattern": pattern, "alpha": alpha, "beta": beta,
               "gamma": gamma, "gamma_value": gamma_value, "mode": mode, "scope": scope, "te": te,
               "show_map": show_map, "balance": balance, "k": k}
    components = [by_name[name] for name in ARG_NAMES]

    # user picks a pattern → α/β move to its defaults. `.input` (user action only) so that pasting an
    # infotext, which sets pattern and β together, is not overwritten; `.change` where `.input` is missing.
    pattern_event = getattr(pattern, "input", None) or pattern.change
    pattern_event(fn=pattern_defaults, inputs=[pattern], outputs=[alpha, beta])
    gamma.change(fn=lambda v: gr.update(visible=options.parse("gamma", v).get("gamma") == "manual"),
                 inputs=[gamma], outputs=[gamma_value])
    if tab.steps is not None:
        tab.steps.change(fn=lambda v: v, inputs=[tab.steps], outputs=[analyze_steps])

    def on_analyze(*values: Any) -> tuple[Any, str]:
        image, text = run_analyze(analyze, values[:-1], values[-1])
        return gr.update(value=image, visible=image is not None), text

    analyze_button.click(fn=on_analyze, inputs=[*components, analyze_steps], outputs=[map_image, summary])
    if tab.prompt is not None:
        tag_button.click(fn=tag_into_prompt_event, inputs=[tab.prompt, *components],
                         outputs=[tab.prompt, summary])
    else:
        tag_button.click(fn=lambda *values: tag_into_prompt("", values)[1], inputs=components,
                         outputs=[summary])

    try:
        from modules.infotext_utils import PasteField  # A1111 ≥ 1.8, Forge, Neo
    except ImportError:  # older: plain (component, getter) pairs
        def PasteField(component: Any, target: Any, **_: Any) -> tuple[Any, Any]:
            return (component, target)

    getters = paste_getters(resolve_name)
    script.infotext_fields = [PasteField(by_name[name], getters[name]) for name in ARG_NAMES
                              if name != "show_map"]
    return components


def tag_into_prompt_event(prompt: Any, *values: Any) -> tuple[str, str]:
    """The "Copy as tag" event with the tab's prompt as its first input."""
    return tag_into_prompt(prompt, values)
