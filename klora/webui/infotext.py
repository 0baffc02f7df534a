"""The image's infotext: one ``K-LoRA`` field with the pair and every option (keys from the options table),
the two files' short hashes, a warning field, and reading them back when an infotext is pasted.

``K-LoRA: "content: dog, style: watercolor, cw: 1, sw: 1, pattern: s, alpha: 1.5, beta: 0.5, gamma: auto
2.291, mode: klora, scope: all, te: both"`` (the webui JSON-quotes the value).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from klora import options
from klora.options import OPTIONS
from klora.webui.args import ARG_NAMES, KLoraArgs, KLoraArgsError, number_text

INFOTEXT_KEY = "K-LoRA"
INFOTEXT_HASHES_KEY = "K-LoRA hashes"
WARNING_KEY = "K-LoRA warning"
"""Infotext field for what went wrong (e.g. an unknown name in a tag). It states a problem, never settings:
pasting an infotext that has it and no ``K-LoRA`` field unticks the panel (:func:`infotext_paste_values`).
The webui's ``p.comment`` text is not part of the API's answer; this field is (``extra_generation_params``).
"""

_INFOTEXT_FIELDS: dict[str, str] = {o.infotext: o.name for o in OPTIONS if o.infotext}
"""Key inside the ``K-LoRA`` field → option."""


def _quote_inner(text: str) -> str:
    if text == "" or any(c in text for c in ',:"\n\\') or text != text.strip() or text.startswith("'"):
        return json.dumps(text, ensure_ascii=False)
    return text


_re_inner = re.compile(r'\s*(\w+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _split_inner(value: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, raw in _re_inner.findall(value):
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == '"' and raw[-1] == '"':
            try:
                raw = json.loads(raw)
            except ValueError as err:
                raise KLoraArgsError(f"K-LoRA infotext: cannot read {key!r}: {raw}", key) from err
        out[key] = raw
    return out


def _value(args: KLoraArgs, name: str, gamma_used: float | None) -> str:
    if name == "gamma":
        if args.gamma == "manual":
            return number_text(args.gamma_value)
        if gamma_used is not None and math.isfinite(gamma_used) and args.mode == "klora":
            return f"{args.gamma} {gamma_used:.4g}"
        return args.gamma
    opt = options.option(name)
    if opt.type == "name":
        return _quote_inner(getattr(args, name))
    if name == "alpha":
        return number_text(args.resolved_alpha)
    if name == "beta":
        return number_text(args.resolved_beta)
    value = getattr(args, name)
    return number_text(value) if opt.type == "number" else str(value)


def format_infotext(args: KLoraArgs, gamma_used: float | None = None, note: str | None = None, *,
                    from_tag: bool = False) -> str:
    """The value of the ``K-LoRA`` infotext field: the pair and every parameter, γ with the value used.

    ``gamma_used`` is the γ the plan computed (shown after "auto"/"paper" in mode klora, the only mode that
    uses γ; a manual γ is shown as its value). ``note`` is free text (e.g. that the refiner segment ran
    without K-LoRA). ``from_tag`` records that a prompt tag supplied the settings, so pasting fills the panel
    but leaves its box unticked (the pasted prompt carries the tag).
    """
    parts = [(key, _value(args, name, gamma_used)) for key, name in _INFOTEXT_FIELDS.items()
             if options.option(name).infotext_default or getattr(args, name) != options.option(name).default]
    if from_tag:
        parts.append(("source", "tag"))
    if note:
        parts.append(("note", _quote_inner(note)))
    return ", ".join(f"{key}: {value}" for key, value in parts)


def parse_infotext(value: str) -> KLoraArgs:
    """The ``K-LoRA`` infotext value → KLoraArgs (enabled unless it says ``source: tag``).

    γ "auto …"/"paper …" restore as auto/paper (recomputed on use), a number restores as manual γ.
    Unknown keys are ignored (newer versions may add some); bad values raise :class:`KLoraArgsError`.
    """
    if not isinstance(value, str):
        raise KLoraArgsError(f"K-LoRA infotext must be text, got {type(value).__name__}")
    items = _split_inner(value)
    if not items.get("content") or not items.get("style"):
        raise KLoraArgsError(f"K-LoRA infotext does not name a content and a style LoRA: {value!r}")
    updates: dict[str, Any] = {"enabled": items.get("source", "").strip().lower() != "tag"}
    for key, name in _INFOTEXT_FIELDS.items():
        if key not in items:
            continue
        raw = items[key]
        if name == "gamma":
            words = raw.split()
            if not words:
                raise KLoraArgsError("K-LoRA infotext: gamma is empty", "gamma")
            raw = words[1] if words[0].lower() == "manual" and len(words) > 1 else words[0]
        updates.update(options.parse(name, raw))
    return replace(KLoraArgs(), **updates)


def format_hashes(content_hash: str | None, style_hash: str | None) -> str | None:
    """``K-LoRA hashes`` infotext value (``content: <shorthash>, style: <shorthash>``); None if neither."""
    parts = [f"{key}: {value}" for key, value in (("content", content_hash), ("style", style_hash)) if value]
    return ", ".join(parts) or None


def parse_hashes(value: str | None) -> dict[str, str]:
    """``K-LoRA hashes`` value → {"content": hash, "style": hash} (missing keys left out)."""
    if not value:
        return {}
    return {k: v.strip() for k, v in _split_inner(value).items() if k in ("content", "style") and v.strip()}


def infotext_paste_values(params: Mapping[str, Any],
                          resolve: Callable[[str, str | None], str | None] | None = None) -> dict[str, Any]:
    """Parsed infotext (``infotext_utils.parse_generation_parameters``) → {ARG_NAME: panel component value}.

    Without a ``K-LoRA`` field: only ``enabled`` = False (pasting an image made without K-LoRA unticks the
    panel). With a bad one: {} (nothing changes). ``resolve(name, shorthash)`` may map a pasted name to the
    local name of the same file (return None to keep the name). ``show_map`` is never set.
    """
    value = params.get(INFOTEXT_KEY)
    if not value:
        return {"enabled": False}
    try:
        args = parse_infotext(str(value))
    except KLoraArgsError:
        return {}
    if resolve is not None:
        hashes = parse_hashes(params.get(INFOTEXT_HASHES_KEY))
        updates = {}
        for name in ("content", "style"):
            try:
                local = resolve(getattr(args, name), hashes.get(name))
            except Exception:
                local = None
            if local:
                updates[name] = local
        args = replace(args, **updates)
    values = dict(zip(ARG_NAMES, args.to_ui_values(), strict=True))
    values.pop("show_map")
    return values


def paste_getters(resolve: Callable[[str, str | None], str | None] | None = None
                  ) -> dict[str, Callable[[Mapping[str, Any]], Any]]:
    """One getter per ARG_NAME for ``PasteField(component, getter)``; a getter returns None = leave as is."""

    def getter(name: str) -> Callable[[Mapping[str, Any]], Any]:
        return lambda params: infotext_paste_values(params, resolve).get(name)

    return {name: getter(name) for name in ARG_NAMES}
