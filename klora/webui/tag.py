"""The prompt tag ``<klora:CONTENT:STYLE[:CW[:SW]][:key=value...]>`` and how it combines with the panel.

The tag is registered as an extra network, so the webui removes it from the text the model sees and hands its
items to us. Positional items: the content and the style LoRA, then optionally their strengths (like
``<lora:name:1>``). Named items: the options whose ``tag`` key the options table gives (``cw``, ``sw``,
``alpha``, ``beta``, ``pattern``, ``gamma``, ``mode``, ``scope``, ``te``, ``map`` …; the long field names are
accepted too). Precedence for one image: panel < tag < XYZ plot cell
(:func:`klora.webui.xyz.effective_args`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from klora import options
from klora.options import NO_LORA, OPTIONS, PATTERNS
from klora.webui.args import ARG_NAMES, KLoraArgs, KLoraArgsError, build, number_text

TAG_NAME = "klora"
TAG_KEYS: tuple[str, ...] = tuple(o.tag for o in OPTIONS if o.tag)
"""The ``key=value`` items the tag takes (the long field names of the same options are accepted too)."""
_TAG_FIELDS = frozenset(o.name for o in OPTIONS if o.tag)
_USAGE = f"<{TAG_NAME}:CONTENT:STYLE> (optionally :CW:SW strengths and key=value options)"


class TagError(KLoraArgsError):
    """The ``<klora:...>`` tag in the prompt cannot be used; the image is then made without K-LoRA."""


def _tag_text(params: Any) -> str:
    return f"<{TAG_NAME}:{':'.join(str(item) for item in getattr(params, 'items', []) or [])}>"


def _split_items(params: Any) -> tuple[list[str], list[tuple[str, str]]]:
    """Positional and named items of an ``extra_networks.ExtraNetworkParams``.

    Recomputed from ``.items`` as modules/extra_networks.py ``ExtraNetworkParams.__init__`` does (an item
    with exactly one '=' is named), so that a key given twice is seen rather than collapsed in ``.named``;
    objects without ``.items`` fall back to ``.positional``/``.named``.
    """
    items = getattr(params, "items", None)
    if isinstance(items, list | tuple):
        positional: list[str] = []
        named: list[tuple[str, str]] = []
        for item in items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                named.append((parts[0], parts[1]))
            else:
                positional.append(str(item))
        return positional, named
    return ([str(p) for p in getattr(params, "positional", None) or []],
            [(str(k), str(v)) for k, v in (getattr(params, "named", None) or {}).items()])


def _tag_field(key: str) -> str:
    try:
        name = options.field_name(key)
    except KLoraArgsError:
        return ""
    return name if name in _TAG_FIELDS else ""


def parse_tag(params_list: Sequence[Any] | None) -> KLoraArgs | None:
    """The ``<klora>`` tags of a prompt (``ExtraNetworkParams`` objects) → enabled KLoraArgs, or None if none.

    Options the tag leaves out come from the panel (:func:`merge_tag_over_panel`); ``.given`` lists the fields
    the tag set. Raises :class:`TagError` with a message naming the problem.
    """
    if not params_list:
        return None
    if len(params_list) > 1:
        tags = ", ".join(_tag_text(p) for p in params_list)
        raise TagError(f"K-LoRA: the prompt has {len(params_list)} <{TAG_NAME}> tags ({tags}); use only one.")
    params = params_list[0]
    text = _tag_text(params)
    positional, named = _split_items(params)
    positional = [p.strip() for p in positional]
    if len(positional) < 2:
        unknown = [key for key, _ in named if not _tag_field(key)]
        hint = (f"; {unknown[0].strip()!r}=... was read as an option (a LoRA name with one '=' cannot be "
                f"used in the tag)") if unknown else ""
        raise TagError(f"K-LoRA tag {text} needs two LoRA names: {_USAGE}{hint}")
    if len(positional) > 4:
        extra = ", ".join(repr(p) for p in positional[4:])
        raise TagError(f"K-LoRA tag {text} has too many items ({extra}); the form is {_USAGE}. "
                       f"Options are written key=value ({', '.join(TAG_KEYS)}).")
    for index, what in enumerate(("content", "style")):
        if not positional[index] or positional[index] in (NO_LORA, "none"):
            raise TagError(f"K-LoRA tag {text}: the {what} LoRA name is empty; the form is {_USAGE}")

    updates: dict[str, Any] = {"enabled": True, "content": positional[0], "style": positional[1]}
    set_by: dict[str, str] = {}
    try:
        for index, name in ((2, "content_strength"), (3, "style_strength")):
            if len(positional) > index:
                updates.update(options.parse(name, positional[index]))
                set_by[name] = f"position {index + 1}"
        for key, value in named:
            name = _tag_field(key)
            if not name:
                raise TagError(f"K-LoRA tag {text}: unknown option {key.strip()!r}; options are "
                               f"{', '.join(TAG_KEYS)} (a LoRA name with one '=' cannot be used in the tag)")
            if name in set_by:
                raise TagError(f"K-LoRA tag {text}: {name} is given twice "
                               f"({set_by[name]} and {key.strip()}=)")
            set_by[name] = f"{key.strip()}="
            updates.update(options.parse(name, value.strip()))
        return build(KLoraArgs(), updates, given=frozenset(updates))
    except TagError:
        raise
    except KLoraArgsError as err:
        raise TagError(f"K-LoRA tag {text}: {err}", err.field) from None


def format_tag(args: KLoraArgs) -> str:
    """The shortest tag that reproduces ``args`` over a default panel."""
    for name in ("content", "style"):
        value = getattr(args, name)
        if not value or any(c in value for c in ":<>") or value.count("=") == 1:
            raise KLoraArgsError(f"K-LoRA: the {name} LoRA name {value!r} cannot be written in a tag", name)
    default = KLoraArgs()
    items = [args.content, args.style]
    pattern = PATTERNS[args.pattern]
    for opt in OPTIONS:
        value = getattr(args, opt.name)
        if opt.name == "gamma" and value == "manual":
            items.append(f"gamma={number_text(args.gamma_value)}")
            continue
        if not opt.tag or opt.name in ("gamma_value", "show_map") or value == getattr(default, opt.name):
            continue
        if opt.name in ("alpha", "beta") and (value is None or value == getattr(pattern, opt.name)):
            continue
        items.append(f"{opt.tag}={number_text(value) if opt.type == 'number' else value}")
    return f"<{TAG_NAME}:{':'.join(items)}>"


def merge_tag_over_panel(panel: KLoraArgs, tag: KLoraArgs | None) -> KLoraArgs:
    """The tag wins: its names and the options it set replace the panel's; the rest come from the panel.

    The result is enabled whether or not the panel's box is ticked. Switching the pattern without giving α/β
    moves them to the new pattern's defaults, as the panel's pattern radio does. ``given`` of the result: the
    fields the tag set. ``tag`` None → ``panel``.
    """
    if tag is None:
        return panel
    names = tag.given or frozenset(ARG_NAMES)
    updates = {name: getattr(tag, name) for name in ARG_NAMES if name in names}
    updates["enabled"] = True
    return build(panel, updates, given=names)
