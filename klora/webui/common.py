"""Host-neutral webui glue: the argument model, the <klora> tag, infotext, API args, XYZ axes, the panel.

Everything here is pure Python except the functions that build the UI or register XYZ axes, which import
``gradio`` and the webui's ``modules`` inside their bodies, so this module imports (and is tested) without a
webui. The same code serves AUTOMATIC1111 (Gradio 3.41) and Forge (Gradio 4).

One argument list, three entrances:

* the panel: ``Script.ui()`` returns the components in :data:`ARG_NAMES` order; every hook gets their values,
* the API: ``alwayson_scripts: {"K-LoRA": {"args": [...]}}`` with the same positional list (shorter lists keep
  the panel defaults for the rest) or a list holding one dict of named fields,
* the tag ``<klora:CONTENT:STYLE[:CW[:SW]][:key=value...]>``, which wins over the panel.

Precedence for one image: panel < tag < XYZ plot cell (:func:`effective_args`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from klora.options import FusionOptions

TITLE = "K-LoRA"
"""Script title; also the key of ``alwayson_scripts`` in the API (matched case-insensitively by the webui)."""

INFOTEXT_KEY = "K-LoRA"
INFOTEXT_HASHES_KEY = "K-LoRA hashes"
WARNING_KEY = "K-LoRA warning"
"""Infotext field for what went wrong (e.g. an unknown name in a tag). It states a problem, never settings:
pasting an infotext that has it and no ``K-LoRA`` field unticks the panel (:func:`infotext_paste_values`).
The webui's ``p.comment`` text is not part of the API's answer; this field is (``extra_generation_params``).
"""
TAG_NAME = "klora"
XYZ_ATTR = "_klora_xyz"
"""Attribute of the processing object where XYZ axis values are stored (a fresh dict per cell)."""

NO_LORA = "None"
"""Dropdown value meaning "no LoRA chosen"; read back as the empty name."""

PATTERN_DEFAULTS: dict[str, tuple[float, float]] = {"s": (1.5, 0.5), "s*": (1.5, 1.275)}
"""(α, β) of each scale pattern: ``s`` from the paper, ``s*`` from the official code (β = 0.85 α)."""

# Choice tables: internal code -> label shown in the panel. Codes go to the infotext and the engine; the
# panel, the API, the tag and XYZ accept either (case, spaces, '-', '_', '.', '(' and ')' are ignored).
PATTERN_LABELS: dict[str, str] = {"s": "s (paper)", "s*": "s* (official)"}
GAMMA_LABELS: dict[str, str] = {"auto": "auto", "paper": "paper (eq. 9)", "manual": "manual"}
MODE_LABELS: dict[str, str] = {
    "klora": "K-LoRA",
    "topk": "Top-K only",
    "fixed": "Fixed schedule",
    "random": "Random",
    "merge": "Direct merge",
}
SCOPE_LABELS: dict[str, str] = {"all": "All layers", "attention": "Attention only"}
# "Neither", not "None": the webui's hints.js gives every "None" text its own tooltip
TE_LABELS: dict[str, str] = {"both": "Both", "content": "Content", "style": "Style", "none": "Neither"}

_EXTRA_CHOICE_ALIASES: dict[str, dict[str, str]] = {
    "pattern": {"sstar": "s*", "official": "s*"},
    "gamma": {},
    "mode": {"direct": "merge", "fixedschedule": "fixed", "topkonly": "topk"},
    "scope": {"attn": "attention", "alllayers": "all"},
    "te": {"contentonly": "content", "styleonly": "style"},
}

_CHOICES: dict[str, dict[str, str]] = {
    "pattern": PATTERN_LABELS,
    "gamma": GAMMA_LABELS,
    "mode": MODE_LABELS,
    "scope": SCOPE_LABELS,
    "te": TE_LABELS,
}


class KLoraArgsError(ValueError):
    """A K-LoRA argument is missing or invalid. ``str(err)`` is a message fit to show the user."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class TagError(KLoraArgsError):
    """The ``<klora:...>`` tag in the prompt cannot be used; the image is then made without K-LoRA."""


@dataclass(frozen=True)
class KLoraArgs:
    """Everything the panel, the tag and the API can set. ``alpha``/``beta`` None = the pattern's default.

    Construction checks types, choices and ranges (:class:`KLoraArgsError`). Whether a pair is chosen is
    checked separately by :meth:`require_pair`, because a panel without names is fine when a tag names them.
    """

    enabled: bool = False
    content: str = ""
    style: str = ""
    content_strength: float = 1.0
    style_strength: float = 1.0
    pattern: Literal["s", "s*"] = "s"
    alpha: float | None = None
    beta: float | None = None
    gamma: Literal["auto", "paper", "manual"] = "auto"
    gamma_value: float = 1.0
    mode: Literal["klora", "topk", "fixed", "random", "merge"] = "klora"
    scope: Literal["all", "attention"] = "all"
    te: Literal["both", "content", "style", "none"] = "both"
    show_map: bool = False
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)
    """Fields set explicitly by a tag (not an argument; used by :func:`merge_tag_over_panel`)."""

    def __post_init__(self) -> None:
        for name in ("enabled", "show_map"):
            if not isinstance(getattr(self, name), bool):
                raise KLoraArgsError(f"K-LoRA argument '{name}' must be true or false, "
                                     f"got {getattr(self, name)!r}", name)
        for name in ("content", "style"):
            if not isinstance(getattr(self, name), str):
                raise KLoraArgsError(f"K-LoRA argument '{name}' must be a LoRA name (text), "
                                     f"got {getattr(self, name)!r}", name)
        for name, labels in _CHOICES.items():
            if getattr(self, name) not in labels:
                raise KLoraArgsError(_choice_message(name, getattr(self, name)), name)
        for name in ("content_strength", "style_strength", "gamma_value", "alpha", "beta"):
            value = getattr(self, name)
            if value is None and name in ("alpha", "beta"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise KLoraArgsError(f"K-LoRA argument '{name}' must be a finite number, got {value!r}", name)
            object.__setattr__(self, name, float(value))
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise KLoraArgsError(f"K-LoRA argument '{name}' must be ≥ 0, got {value!r}", name)
        if self.pattern == "s*" and self.alpha == 0:
            raise KLoraArgsError("K-LoRA argument 'alpha' must be > 0 with pattern s* (its scale is taken "
                                 "modulo alpha)", "alpha")
        if self.gamma_value <= 0:
            raise KLoraArgsError(f"K-LoRA argument 'gamma_value' must be > 0, got {self.gamma_value!r}",
                                 "gamma_value")
        if not isinstance(self.given, frozenset):
            object.__setattr__(self, "given", frozenset(self.given))

    # ------------------------------------------------------------------ derived values

    @property
    def resolved_alpha(self) -> float:
        """α actually used: the given value, else the pattern's default."""
        return PATTERN_DEFAULTS[self.pattern][0] if self.alpha is None else self.alpha

    @property
    def resolved_beta(self) -> float:
        """β actually used: the given value, else the pattern's default."""
        return PATTERN_DEFAULTS[self.pattern][1] if self.beta is None else self.beta

    @property
    def gamma_option(self) -> str | float:
        """γ as the engine takes it: "auto", "paper" or the manual value."""
        return self.gamma_value if self.gamma == "manual" else self.gamma

    def resolved(self) -> KLoraArgs:
        """A copy with α and β filled in from the pattern (what the infotext records)."""
        return replace(self, alpha=self.resolved_alpha, beta=self.resolved_beta, given=frozenset())

    def require_pair(self) -> KLoraArgs:
        """Raise :class:`KLoraArgsError` unless both a content and a style LoRA are named; return self."""
        missing = [name for name in ("content", "style") if not getattr(self, name)]
        if missing:
            what = " and no ".join(f"{name} LoRA" for name in missing)
            raise KLoraArgsError(f"K-LoRA: no {what} chosen", missing[0])
        return self

    def fusion_kwargs(self, seed: int) -> dict[str, Any]:
        """Keyword arguments of ``klora.fusion.FusionOptions`` for these settings and the image seed."""
        return {
            "pattern": self.pattern,
            "alpha": self.resolved_alpha,
            "beta": self.resolved_beta,
            "gamma": self.gamma_option,
            "mode": self.mode,
            "scope": self.scope,
            "te": self.te,
            "content_strength": self.content_strength,
            "style_strength": self.style_strength,
            "seed": int(seed),
        }

    def to_fusion_options(self, seed: int) -> FusionOptions:
        """The engine's options; ``seed`` seeds the ``random`` mode (pass the image seed)."""
        from klora.options import FusionOptions

        return FusionOptions(**self.fusion_kwargs(seed))

    def to_dict(self) -> dict[str, Any]:
        """The named-field form the API accepts (codes, not labels)."""
        return {name: getattr(self, name) for name in ARG_NAMES}

    def to_ui_values(self) -> list[Any]:
        """The panel components' values in :data:`ARG_NAMES` order (labels for radios and dropdowns)."""
        return [_ui_value(name, getattr(self, name), self) for name in ARG_NAMES]


ARG_NAMES: tuple[str, ...] = tuple(f.name for f in fields(KLoraArgs) if f.name != "given")
"""Order of the components ``Script.ui()`` returns, hence of the script args and the API's positional list."""

ALIASES: dict[str, str] = {
    "cw": "content_strength",
    "sw": "style_strength",
    "content_weight": "content_strength",
    "style_weight": "style_strength",
    "text_encoder": "te",
    "map": "show_map",
    "enable": "enabled",
    "content_lora": "content",
    "style_lora": "style",
}
"""Other names accepted for fields in the API dict and the tag."""

TAG_KEYS: tuple[str, ...] = ("cw", "sw", "alpha", "beta", "pattern", "gamma", "mode", "scope", "te", "map")
"""The ``key=value`` items the tag takes (the long field names of the same options are accepted too)."""

_TAG_FIELDS = frozenset({"content_strength", "style_strength", "alpha", "beta", "pattern", "gamma",
                         "gamma_value", "mode", "scope", "te", "show_map"})


# ----------------------------------------------------------------------------------------------------------
# value coercion (shared by the positional list, the API dict, the tag, the infotext and XYZ)


def _norm(text: str) -> str:
    return re.sub(r"[\s\-_().]", "", text.lower())


def _choice_message(name: str, value: Any) -> str:
    labels = _CHOICES[name]
    codes = ", ".join(labels)
    shown = ", ".join(f"'{label}'" for label in labels.values())
    return f"K-LoRA argument '{name}': {value!r} is not one of {codes} (or the panel labels {shown})"


def _to_choice(name: str, value: Any) -> str:
    labels = _CHOICES[name]
    if isinstance(value, str):
        key = _norm(value)
        for code, label in labels.items():
            if key in (_norm(code), _norm(label)):
                return code
        if key in _EXTRA_CHOICE_ALIASES[name]:
            return _EXTRA_CHOICE_ALIASES[name][key]
    raise KLoraArgsError(_choice_message(name, value), name)


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise KLoraArgsError(f"K-LoRA argument '{name}' must be true or false, got {value!r}", name)


def _to_float(name: str, value: Any, *, optional: bool = False) -> float | None:
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "default"))):
        return None
    number: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        extra = " or 'default' (the pattern's value)" if optional else ""
        raise KLoraArgsError(f"K-LoRA argument '{name}' must be a finite number{extra}, got {value!r}", name)
    return number


def _to_name(name: str, value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise KLoraArgsError(f"K-LoRA argument '{name}' must be a LoRA name (text), got {value!r}", name)
    return "" if value.strip() in (NO_LORA, "none", "") else value  # otherwise exact: names may have spaces


def _coerce(name: str, value: Any) -> dict[str, Any]:
    """One raw value for field ``name`` → the field updates it means (γ numbers also set the mode)."""
    if name in ("enabled", "show_map"):
        return {name: _to_bool(name, value)}
    if name in ("content", "style"):
        return {name: _to_name(name, value)}
    if name in ("alpha", "beta"):
        return {name: _to_float(name, value, optional=True)}
    if name in ("content_strength", "style_strength", "gamma_value"):
        return {name: _to_float(name, value)}
    if name == "gamma":
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            number = _to_float(name, value)
        elif isinstance(value, str):
            try:
                number = _to_float(name, float(value.strip()))
            except ValueError:
                number = None
        if number is not None:
            if number <= 0:
                raise KLoraArgsError(f"K-LoRA argument 'gamma' must be auto, paper or a number > 0, "
                                     f"got {value!r}", name)
            return {"gamma": "manual", "gamma_value": number}
        try:
            return {"gamma": _to_choice(name, value)}
        except KLoraArgsError:
            raise KLoraArgsError(
                f"K-LoRA argument 'gamma': {value!r} is not auto, paper, manual or a number > 0", name
            ) from None
    if name in _CHOICES:
        return {name: _to_choice(name, value)}
    raise KLoraArgsError(_unknown_message(name), name)


def _unknown_message(key: str) -> str:
    return (f"unknown K-LoRA argument {key!r}; known: {', '.join(ARG_NAMES)} "
            f"(aliases: {', '.join(sorted(ALIASES))})")


def _field_for(key: str) -> str:
    key_n = key.strip().lower()
    if key_n in ARG_NAMES:
        return key_n
    if key_n in ALIASES:
        return ALIASES[key_n]
    raise KLoraArgsError(_unknown_message(key), None)


def _build(base: KLoraArgs, updates: Mapping[str, Any], *, given: Iterable[str] = ()) -> KLoraArgs:
    """Apply coerced field updates; a pattern switch without α/β moves them to the new pattern's defaults."""
    updates = dict(updates)
    if "pattern" in updates and updates["pattern"] != base.pattern:
        updates.setdefault("alpha", None)
        updates.setdefault("beta", None)
    return replace(base, **updates, given=frozenset(given))


# ----------------------------------------------------------------------------------------------------------
# the script args: positional list (panel / API) or one dict of named fields (API)


def from_dict(data: Mapping[str, Any], *, enabled_default: bool = True) -> KLoraArgs:
    """Named fields (ARG_NAMES or :data:`ALIASES`) → KLoraArgs; missing fields take the defaults.

    ``enabled`` defaults to True: sending the dict means "use K-LoRA". α/β missing = the pattern's defaults.
    """
    if not isinstance(data, Mapping):
        raise KLoraArgsError(f"K-LoRA arguments must be a list or a dict, got {type(data).__name__}")
    updates: dict[str, Any] = {"enabled": enabled_default}
    seen: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise KLoraArgsError(_unknown_message(repr(key)))
        name = _field_for(key)
        if name in seen:
            raise KLoraArgsError(f"K-LoRA argument '{name}' given twice ({seen[name]!r} and {key!r})", name)
        seen[name] = key
        if value is None:  # null = the default (for alpha/beta: the pattern's value)
            continue
        coerced = _coerce(name, value)
        if name == "gamma" and "gamma_value" in coerced and "gamma_value" in data:
            raise KLoraArgsError("K-LoRA: 'gamma' is a number and 'gamma_value' is given too; give one",
                                 "gamma")
        updates.update(coerced)
    return _build(KLoraArgs(), updates)


def from_script_args(args: Sequence[Any] | Mapping[str, Any] | KLoraArgs) -> KLoraArgs:
    """The script's ``*args`` (or an API ``args`` value) → validated KLoraArgs.

    Accepts the positional list in :data:`ARG_NAMES` order (shorter = defaults for the rest; None = default;
    labels or codes for choices), a list whose first item is a dict of named fields (the API form; the webui
    fills the remaining positions with panel defaults, which are then ignored), or the dict itself.
    Names are not required here; call :meth:`KLoraArgs.require_pair` after merging the tag.
    """
    if isinstance(args, KLoraArgs):
        return args
    if isinstance(args, Mapping):
        return from_dict(args)
    if isinstance(args, str | bytes) or not isinstance(args, Sequence):
        raise KLoraArgsError(f"K-LoRA arguments must be a list or a dict, got {type(args).__name__}")
    if len(args) >= 1 and isinstance(args[0], Mapping):
        return from_dict(args[0])
    if len(args) > len(ARG_NAMES):
        raise KLoraArgsError(f"K-LoRA takes at most {len(ARG_NAMES)} positional arguments "
                             f"({', '.join(ARG_NAMES)}), got {len(args)}")
    updates: dict[str, Any] = {}
    gamma_updates: dict[str, Any] = {}
    for name, value in zip(ARG_NAMES, args, strict=False):
        if value is None:
            continue
        coerced = _coerce(name, value)
        if name == "gamma":
            gamma_updates = coerced  # a number at the gamma position beats the gamma_value position
        updates.update(coerced)
    updates.update(gamma_updates)
    return replace(KLoraArgs(), **updates)


def _ui_value(name: str, value: Any, args: KLoraArgs) -> Any:
    if name in _CHOICES:
        return _CHOICES[name][value]
    if name in ("content", "style"):
        return value or NO_LORA
    if name == "alpha":
        return args.resolved_alpha
    if name == "beta":
        return args.resolved_beta
    return value


# ----------------------------------------------------------------------------------------------------------
# the prompt tag <klora:CONTENT:STYLE[:CW[:SW]][:key=value...]>


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


def parse_tag(params_list: Sequence[Any] | None) -> KLoraArgs | None:
    """The ``<klora>`` tags of a prompt (``ExtraNetworkParams`` objects) → enabled KLoraArgs, or None if none.

    Positional items: CONTENT, STYLE, then optionally the content and the style strength as numbers (like
    ``<lora:name:1>``). Named items: ``cw sw alpha beta pattern gamma mode scope te map`` (and the long field
    names). Options the tag leaves out come from the panel (:func:`merge_tag_over_panel`); ``.given`` lists
    the fields the tag set. Raises :class:`TagError` with a message naming the problem.
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
    usage = f"<{TAG_NAME}:CONTENT:STYLE> (optionally :CW:SW strengths and key=value options)"
    if len(positional) < 2:
        unknown = [key for key, _ in named if ALIASES.get(key.strip().lower(), key.strip().lower())
                   not in _TAG_FIELDS]
        hint = (f"; {unknown[0].strip()!r}=... was read as an option (a LoRA name with one '=' cannot be "
                f"used in the tag)") if unknown else ""
        raise TagError(f"K-LoRA tag {text} needs two LoRA names: {usage}{hint}")
    if len(positional) > 4:
        extra = ", ".join(repr(p) for p in positional[4:])
        raise TagError(f"K-LoRA tag {text} has too many items ({extra}); the form is {usage}. "
                       f"Options are written key=value ({', '.join(TAG_KEYS)}).")
    for index, what in enumerate(("content", "style")):
        if not positional[index] or positional[index] in (NO_LORA, "none"):
            raise TagError(f"K-LoRA tag {text}: the {what} LoRA name is empty; the form is {usage}")

    updates: dict[str, Any] = {"enabled": True, "content": positional[0], "style": positional[1]}
    set_by: dict[str, str] = {}
    try:
        for index, name in ((2, "content_strength"), (3, "style_strength")):
            if len(positional) > index:
                updates[name] = _to_float(name, positional[index])
                set_by[name] = f"position {index + 1}"
        for key, value in named:
            try:
                name = _field_for(key)
            except KLoraArgsError:
                name = ""
            if name not in _TAG_FIELDS:
                raise TagError(f"K-LoRA tag {text}: unknown option {key.strip()!r}; options are "
                               f"{', '.join(TAG_KEYS)} (a LoRA name with one '=' cannot be used in the tag)")
            if name in set_by:
                raise TagError(f"K-LoRA tag {text}: {name} is given twice "
                               f"({set_by[name]} and {key.strip()}=)")
            set_by[name] = f"{key.strip()}="
            updates.update(_coerce(name, value.strip()))
        return _build(KLoraArgs(), updates, given=updates)
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
    for key, name in (("cw", "content_strength"), ("sw", "style_strength")):
        if getattr(args, name) != getattr(default, name):
            items.append(f"{key}={_fmt(getattr(args, name))}")
    if args.pattern != default.pattern:
        items.append(f"pattern={args.pattern}")
    if args.alpha is not None and args.alpha != PATTERN_DEFAULTS[args.pattern][0]:
        items.append(f"alpha={_fmt(args.alpha)}")
    if args.beta is not None and args.beta != PATTERN_DEFAULTS[args.pattern][1]:
        items.append(f"beta={_fmt(args.beta)}")
    if args.gamma == "manual":
        items.append(f"gamma={_fmt(args.gamma_value)}")
    elif args.gamma != default.gamma:
        items.append(f"gamma={args.gamma}")
    for name in ("mode", "scope", "te"):
        if getattr(args, name) != getattr(default, name):
            items.append(f"{name}={getattr(args, name)}")
    return f"<{TAG_NAME}:{':'.join(items)}>"


def merge_tag_over_panel(panel: KLoraArgs, tag: KLoraArgs | None) -> KLoraArgs:
    """The tag wins: its names and the options it set replace the panel's; the rest come from the panel.

    The result is enabled whether or not the panel's box is ticked. Switching the pattern without giving α/β
    moves them to the new pattern's defaults, as the panel's pattern radio does. ``tag`` None → ``panel``.
    """
    if tag is None:
        return panel
    names = tag.given or frozenset(ARG_NAMES)
    updates = {name: getattr(tag, name) for name in ARG_NAMES if name in names}
    updates["enabled"] = True
    return _build(panel, updates)


# ----------------------------------------------------------------------------------------------------------
# infotext


def _fmt(value: float) -> str:
    """Shortest text that reads back as the same float ("1" for 1.0)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


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


def format_infotext(args: KLoraArgs, gamma_used: float | None = None, note: str | None = None, *,
                    from_tag: bool = False) -> str:
    """The value of the ``K-LoRA`` infotext field: the pair and every parameter, γ with the value used.

    ``gamma_used`` is the γ the plan computed (shown after "auto"/"paper" in mode klora, the only mode that
    uses γ; a manual γ is shown as its value).
    ``note`` is free text (e.g. that the refiner segment ran without K-LoRA). ``from_tag`` records that a
    prompt tag supplied the settings, so pasting fills the panel but leaves its box unticked (the pasted
    prompt carries the tag). Write it with ``p.extra_generation_params[INFOTEXT_KEY] = ...``; the webui
    JSON-quotes it.
    """
    if args.gamma == "manual":
        gamma = _fmt(args.gamma_value)
    elif gamma_used is not None and math.isfinite(gamma_used) and args.mode == "klora":
        gamma = f"{args.gamma} {gamma_used:.4g}"
    else:
        gamma = args.gamma
    parts = [
        ("content", _quote_inner(args.content)),
        ("style", _quote_inner(args.style)),
        ("cw", _fmt(args.content_strength)),
        ("sw", _fmt(args.style_strength)),
        ("pattern", args.pattern),
        ("alpha", _fmt(args.resolved_alpha)),
        ("beta", _fmt(args.resolved_beta)),
        ("gamma", gamma),
        ("mode", args.mode),
        ("scope", args.scope),
        ("te", args.te),
    ]
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
    keymap = {"content": "content", "style": "style", "cw": "content_strength", "sw": "style_strength",
              "pattern": "pattern", "alpha": "alpha", "beta": "beta", "mode": "mode", "scope": "scope",
              "te": "te"}
    for key, name in keymap.items():
        if key in items:
            updates.update(_coerce(name, items[key]))
    if "gamma" in items:
        words = items["gamma"].split()
        if not words:
            raise KLoraArgsError("K-LoRA infotext: gamma is empty", "gamma")
        if words[0].lower() == "manual" and len(words) > 1:
            words = words[1:]
        updates.update(_coerce("gamma", words[0]))
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


# ----------------------------------------------------------------------------------------------------------
# XYZ plot


@dataclass(frozen=True)
class XyzAxis:
    """What ``scripts/xyz_grid.py``'s ``AxisOption(label, type, apply, format_value, confirm, cost, choices,
    prepare)`` needs: ``apply(p, x, xs)``, ``confirm(p, xs)`` and ``choices()``."""

    label: str
    type: Callable[[Any], Any]
    apply: Callable[[Any, Any, Any], None]
    confirm: Callable[[Any, Any], None] | None = None
    choices: Callable[[], list[str]] | None = None
    cost: float = 0.0


def _xyz_updates(name: str, value: Any) -> dict[str, Any]:
    try:
        updates = _coerce(name, value)
        replace(KLoraArgs(), **updates)  # ranges (α, β ≥ 0, γ > 0)
    except KLoraArgsError as err:
        raise RuntimeError(f"[{TITLE}] XYZ plot: {err}") from None
    if name in ("content", "style") and not updates[name]:
        raise RuntimeError(f"[{TITLE}] XYZ plot: the {name} LoRA name is empty")
    return updates


def _xyz_apply(name: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, x: Any, xs: Any) -> None:
        # xyz_grid makes a shallow copy of p per cell: store a new dict, never mutate a shared one
        current = getattr(p, XYZ_ATTR, None) or {}
        setattr(p, XYZ_ATTR, {**current, **_xyz_updates(name, x)})

    return apply


def _xyz_confirm(name: str) -> Callable[[Any, Any], None]:
    def confirm(p: Any, xs: Any) -> None:
        for x in xs:
            _xyz_updates(name, x)

    return confirm


def xyz_axes(lora_names: Callable[[], list[str]] | None = None) -> list[XyzAxis]:
    """The K-LoRA axes of the XYZ plot. Each ``apply`` stores its value in ``p._klora_xyz``."""

    def names() -> list[str]:
        return list(lora_names()) if lora_names is not None else []

    def labels(table: dict[str, str]) -> Callable[[], list[str]]:
        return lambda: list(table.values())

    specs = [
        ("Enabled", str, "enabled", lambda: ["True", "False"], 0.0),
        ("Content LoRA", str, "content", names if lora_names is not None else None, 0.5),
        ("Style LoRA", str, "style", names if lora_names is not None else None, 0.5),
        ("Content strength", float, "content_strength", None, 0.0),
        ("Style strength", float, "style_strength", None, 0.0),
        ("Pattern", str, "pattern", labels(PATTERN_LABELS), 0.0),
        ("Alpha", float, "alpha", None, 0.0),
        ("Beta", float, "beta", None, 0.0),
        ("Gamma", str, "gamma", None, 0.1),
        ("Mode", str, "mode", labels(MODE_LABELS), 0.0),
        ("Scope", str, "scope", labels(SCOPE_LABELS), 0.1),
        ("Text encoder", str, "te", labels(TE_LABELS), 0.0),
    ]
    return [XyzAxis(f"[{TITLE}] {label}", typ, _xyz_apply(name), _xyz_confirm(name), choices, cost)
            for label, typ, name, choices, cost in specs]


def xyz_overrides(p: Any) -> dict[str, Any]:
    """The XYZ values stored on ``p`` for this cell ({} outside a plot)."""
    value = getattr(p, XYZ_ATTR, None)
    return dict(value) if isinstance(value, Mapping) else {}


def apply_xyz_overrides(args: KLoraArgs, p: Any) -> KLoraArgs:
    """``args`` with the XYZ cell's values on top. Any K-LoRA axis turns K-LoRA on unless the "Enabled"
    axis says otherwise; a pattern axis without α/β axes moves them to the pattern's defaults."""
    overrides = xyz_overrides(p)
    if not overrides:
        return args
    updates = {"enabled": True, **overrides}
    return _build(args, updates)


def effective_args(panel: KLoraArgs, tag: KLoraArgs | None, p: Any = None) -> KLoraArgs:
    """Panel < tag < XYZ cell: the settings one image uses (check :meth:`KLoraArgs.require_pair` next)."""
    return apply_xyz_overrides(merge_tag_over_panel(panel, tag), p)


def register_xyz_axes(lora_names: Callable[[], list[str]] | None = None) -> int:
    """Add the K-LoRA axes to the built-in XYZ plot script; returns how many were added.

    Call it from ``script_callbacks.on_before_ui``. The XYZ module is found in ``scripts.scripts_data``
    (its module is named by file basename, ``xyz_grid.py``, see modules/script_loading.py ``load_module``);
    labels already present are skipped, because ``before_ui`` runs again when the UI reloads.
    """
    from modules import scripts  # the webui's; only here

    xyz = next((data.module for data in scripts.scripts_data
                if getattr(data.script_class, "__module__", None) == "xyz_grid.py"), None)
    if xyz is None:
        return 0
    present = {getattr(option, "label", None) for option in xyz.axis_options}
    added = 0
    for axis in xyz_axes(lora_names):
        if axis.label in present:
            continue
        # scripts/xyz_grid.py: AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0,
        # choices=None, prepare=None)
        xyz.axis_options.append(xyz.AxisOption(axis.label, axis.type, axis.apply, confirm=axis.confirm,
                                               cost=axis.cost, choices=axis.choices))
        added += 1
    return added


# ----------------------------------------------------------------------------------------------------------
# HTTP API: refuse bad K-LoRA args with 422 and a message (the webui catches exceptions in script hooks, so
# raising there would only log them)

API_PATHS: tuple[str, ...] = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")

_BETA_POSITION = ARG_NAMES.index("beta")
_PATTERN_POSITION = ARG_NAMES.index("pattern")


def _api_entry(payload: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The ``alwayson_scripts`` entry for K-LoRA (its key matched case-insensitively, as the webui does)."""
    scripts = payload.get("alwayson_scripts")
    if not isinstance(scripts, Mapping):
        return None
    entry = next((v for k, v in scripts.items() if isinstance(k, str) and k.lower() == TITLE.lower()), None)
    return entry if isinstance(entry, Mapping) else None


def normalize_api_args(raw: Any) -> Any:
    """The K-LoRA ``args`` of an API request as the webui must receive them; ``raw`` itself when fine.

    * a bare dict of named fields becomes ``[dict]``: modules/api/api.py ``init_script_args`` copies
      ``args[i]`` for ``i < len(args)``, which fails on a dict;
    * a positional list that gives the pattern but stops before β is padded with None through β: the webui
      fills missing trailing args with the panel's values, whose α/β belong to the panel's pattern, not to
      the one given (``[True, c, s, 1, 1, "s*"]`` would get β 0.5); None means "the pattern's default".
      Shorter lists are left alone: the panel's pattern, α and β belong together.
    """
    if isinstance(raw, Mapping):
        return [dict(raw)]
    if isinstance(raw, list) and _PATTERN_POSITION < len(raw) <= _BETA_POSITION \
            and not (raw and isinstance(raw[0], Mapping)):
        return [*raw, *([None] * (_BETA_POSITION + 1 - len(raw)))]
    return raw


def validate_api_payload(payload: Mapping[str, Any],
                         name_exists: Callable[[str], bool] | None = None) -> KLoraArgs | None:
    """Check the ``alwayson_scripts`` entry for K-LoRA of a txt2img/img2img request body.

    Returns the args (None when the request does not mention K-LoRA) or raises :class:`KLoraArgsError`.
    ``args`` may be a list or a bare dict of named fields (see :func:`normalize_api_args`). An enabled entry
    must name both LoRAs unless the prompt carries a ``<klora:`` tag; ``name_exists``, if given, is asked
    about each name (not when a tag is present: the tag's names replace the entry's, and a tag's problems
    are reported with the image, like in the UI).
    """
    entry = _api_entry(payload)
    if entry is None or entry.get("args") is None:
        return None
    raw = normalize_api_args(entry["args"])
    if not isinstance(raw, list):
        raise KLoraArgsError(f'alwayson_scripts["{TITLE}"]["args"] must be a list: the positional values '
                             f"({', '.join(ARG_NAMES)}) or one object of named fields, e.g. "
                             f'[{{"content": "dog", "style": "watercolor"}}]; got {type(raw).__name__}')
    args = from_script_args(raw)
    prompt = payload.get("prompt")
    has_tag = isinstance(prompt, str) and f"<{TAG_NAME}:" in prompt
    if args.enabled and not has_tag:
        args.require_pair()
        if name_exists is not None:
            for name in ("content", "style"):
                value = getattr(args, name)
                if not name_exists(value):
                    raise KLoraArgsError(f"K-LoRA: no LoRA named {value!r} (argument '{name}'); names are "
                                         "file names without extension, as /sdapi/v1/loras lists them", name)
    return args


def prepare_api_payload(payload: dict[str, Any],
                        name_exists: Callable[[str], bool] | None = None) -> bool:
    """Validate (:func:`validate_api_payload`) and normalize the K-LoRA args of ``payload`` in place.

    Returns True when the payload was changed. Raises :class:`KLoraArgsError` for bad args.
    """
    validate_api_payload(payload, name_exists)
    entry = _api_entry(payload)
    if entry is None or entry.get("args") is None:
        return False
    raw = entry["args"]
    fixed = normalize_api_args(raw)
    if fixed is raw or not isinstance(entry, dict):
        return False
    entry["args"] = fixed
    return True


class ApiArgsValidator:
    """Pure ASGI middleware for POSTs to txt2img/img2img: bad K-LoRA args are answered with HTTP 422
    ``{"error": "KLoraArgsError", "detail": message}`` before the webui sees them; args the webui would
    misread are rewritten (:func:`normalize_api_args`). Other requests pass untouched; the body is buffered
    and replayed to the app. Install with ``app.add_middleware(ApiArgsValidator, name_exists=...)``."""

    def __init__(self, app: Any, name_exists: Callable[[str], bool] | None = None,
                 paths: Iterable[str] = API_PATHS):
        self.app = app
        self.name_exists = name_exists
        self.paths = tuple(paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        is_generation = scope.get("type") == "http" and scope.get("method") == "POST" \
            and scope.get("path") in self.paths
        if not is_generation:
            await self.app(scope, receive, send)
            return
        messages: list[Any] = []
        body = b""
        while True:
            message = await receive()
            messages.append(message)
            if message.get("type") != "http.request":
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        error, new_body = self.prepare(body)
        if error is not None:
            data = json.dumps({"error": "KLoraArgsError", "detail": error}, ensure_ascii=False).encode()
            await send({"type": "http.response.start", "status": 422,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data})
            return
        if new_body is not None:
            rest = [m for m in messages if m.get("type") != "http.request"]
            messages = [{"type": "http.request", "body": new_body, "more_body": False}, *rest]
            headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(new_body)).encode())]}
        pending = iter(messages)

        async def replay() -> Any:
            for message in pending:
                return message
            return await receive()

        await self.app(scope, replay, send)

    def prepare(self, body: bytes) -> tuple[str | None, bytes | None]:
        """(error message or None, rewritten body or None = forward the body as it came). Bodies that are not
        JSON objects pass: the webui answers those itself."""
        if b"alwayson_scripts" not in body:
            return None, None
        try:
            payload = json.loads(body)
        except ValueError:
            return None, None
        if not isinstance(payload, dict):
            return None, None
        try:
            changed = prepare_api_payload(payload, self.name_exists)
        except KLoraArgsError as err:
            return str(err), None
        return None, (json.dumps(payload, ensure_ascii=False).encode() if changed else None)

    def check(self, body: bytes) -> str | None:
        """The error message for a request body, or None."""
        return self.prepare(body)[0]


def install_api_validation(app: Any, name_exists: Callable[[str], bool] | None = None) -> bool:
    """Put :class:`ApiArgsValidator` in front of a FastAPI/Starlette ``app`` (from ``on_app_started``).

    Starlette refuses ``add_middleware`` once the app has started, which it has by the time the webui calls
    ``on_app_started`` with the UI running; then the built middleware stack is wrapped instead. Installs
    once per app; returns True when it installed.
    """
    if getattr(app, "_klora_api_validation", False):
        return False
    stack = getattr(app, "middleware_stack", None)
    if stack is None:
        app.add_middleware(ApiArgsValidator, name_exists=name_exists)
    else:
        app.middleware_stack = ApiArgsValidator(stack, name_exists)
    app._klora_api_validation = True
    return True


# ----------------------------------------------------------------------------------------------------------
# the panel (gradio is imported only here)


def pattern_input_beta(pattern_value: Any) -> float:
    """β the panel shows after the user picks a pattern: that pattern's default."""
    return PATTERN_DEFAULTS[_to_choice("pattern", pattern_value)][1]


def pattern_input_alpha(pattern_value: Any) -> float:
    """α the panel shows after the user picks a pattern: that pattern's default."""
    return PATTERN_DEFAULTS[_to_choice("pattern", pattern_value)][0]


def run_analyze(analyze: Callable[[KLoraArgs, int], tuple[Any, str]], values: Sequence[Any],
                steps: Any) -> tuple[Any, str]:
    """The Analyze button: panel values → ``analyze(args, steps)`` → (image or None, markdown).

    Any error becomes a readable message in the markdown, never a traceback.
    """
    try:
        args = from_script_args(list(values)).require_pair()
        n = int(_to_float("steps", steps))
        if n < 1:
            raise KLoraArgsError("K-LoRA: the step count for the analysis must be at least 1", "steps")
        image, text = analyze(args, n)
        return image, text
    except KLoraArgsError as err:
        message = str(err).removeprefix("K-LoRA: ")
        return None, f"**Cannot analyze:** {_md_escape(message)}"
    except Exception as err:  # the host's analysis failed: say why, keep the UI alive
        return None, f"**K-LoRA analysis failed:** {_md_escape(f'{type(err).__name__}: {err}')}"


def _major(version: str) -> int:
    match = re.match(r"\d+", str(version))
    return int(match.group()) if match else 0


def _md_escape(text: str) -> str:
    return re.sub(r"([\\`*_\[\]<>#|])", r"\\\1", text)


def build_ui(script: Any, is_img2img: bool, lora_names: Callable[[], list[str]], refresh: Callable[[], Any],
             analyze: Callable[[KLoraArgs, int], tuple[Any, str]], defaults: KLoraArgs | None = None,
             resolve_name: Callable[[str, str | None], str | None] | None = None) -> list[Any]:
    """Build the K-LoRA panel inside the current gradio Blocks; return its components in ARG_NAMES order.

    ``lora_names()`` lists the LoRAs (as the Lora tab names them), ``refresh()`` rescans the LoRA folders,
    ``analyze(args, steps)`` returns (selection-map image or None, markdown summary). ``defaults`` sets the
    initial values (e.g. the pattern from the settings); ``resolve_name`` is passed to
    :func:`infotext_paste_values`. Also sets ``script.infotext_fields``. Side-effect
    free otherwise and idempotent: the API calls ``ui()`` again inside a throwaway Blocks.
    Works on Gradio 3.41 (A1111) and Gradio 4 (Forge): only constructor arguments and events both have.
    """
    import gradio as gr
    from modules.ui_common import create_refresh_button
    from modules.ui_components import InputAccordion

    d = (defaults or KLoraArgs()).resolved()
    eid = script.elem_id

    def choices() -> list[str]:
        try:
            found = [str(n) for n in lora_names()]
        except Exception:
            found = []
        return [NO_LORA, *found]

    def refreshed() -> dict[str, Any]:
        return {"choices": choices()}

    with InputAccordion(d.enabled, label=TITLE, elem_id=eid("enable")) as enabled:
        with gr.Row(elem_id=eid("pair_row"), elem_classes=["klora-row"]):
            content = gr.Dropdown(label="Content LoRA", choices=choices(), value=d.content or NO_LORA,
                                  allow_custom_value=True, elem_id=eid("content"))
            create_refresh_button(content, refresh, refreshed, eid("content_refresh"))
            style = gr.Dropdown(label="Style LoRA", choices=choices(), value=d.style or NO_LORA,
                                allow_custom_value=True, elem_id=eid("style"))
            create_refresh_button(style, refresh, refreshed, eid("style_refresh"))
        with gr.Row(elem_id=eid("strength_row"), elem_classes=["klora-row"]):
            content_strength = gr.Slider(label="Content strength", minimum=-4.0, maximum=4.0, step=0.05,
                                         value=d.content_strength, elem_id=eid("content_strength"))
            style_strength = gr.Slider(label="Style strength", minimum=-4.0, maximum=4.0, step=0.05,
                                       value=d.style_strength, elem_id=eid("style_strength"))
        with gr.Row(elem_id=eid("schedule_row"), elem_classes=["klora-row"]):
            pattern = gr.Radio(label="Pattern", choices=list(PATTERN_LABELS.values()),
                               value=PATTERN_LABELS[d.pattern], elem_id=eid("pattern"))
            alpha = gr.Slider(label="α (slope)", minimum=0.0, maximum=5.0, step=0.025, value=d.resolved_alpha,
                              elem_id=eid("alpha"))
            beta = gr.Slider(label="β (offset)", minimum=0.0, maximum=5.0, step=0.025, value=d.resolved_beta,
                             elem_id=eid("beta"))
        with gr.Row(elem_id=eid("gamma_row"), elem_classes=["klora-row"]):
            gamma = gr.Radio(label="γ (balance)", choices=list(GAMMA_LABELS.values()),
                             value=GAMMA_LABELS[d.gamma], elem_id=eid("gamma"))
            gamma_value = gr.Number(label="γ value", value=d.gamma_value, visible=d.gamma == "manual",
                                    elem_id=eid("gamma_value"))
        with gr.Row(elem_id=eid("mode_row"), elem_classes=["klora-row"]):
            mode = gr.Dropdown(label="Mode", choices=list(MODE_LABELS.values()), value=MODE_LABELS[d.mode],
                               elem_id=eid("mode"))
            scope = gr.Radio(label="Scope", choices=list(SCOPE_LABELS.values()), value=SCOPE_LABELS[d.scope],
                             elem_id=eid("scope"))
            te = gr.Radio(label="Text encoder", choices=list(TE_LABELS.values()), value=TE_LABELS[d.te],
                          elem_id=eid("te"))
        with gr.Row(elem_id=eid("map_row"), elem_classes=["klora-row"]):
            show_map = gr.Checkbox(label="Show selection map", value=d.show_map, elem_id=eid("show_map"))
            analyze_steps = gr.Slider(label="Steps to analyze", minimum=1, maximum=150, step=1, value=20,
                                      elem_id=eid("analyze_steps"))
            analyze_button = gr.Button("Analyze", elem_id=eid("analyze"))
        with gr.Row(elem_id=eid("analysis_row"), elem_classes=["klora-row"]):
            # Gradio 4 sends images as lossy webp by default: the map's cells need png (no such argument in 3)
            image_format = {"format": "png"} if _major(gr.__version__) >= 4 else {}
            map_image = gr.Image(label="Selection map", type="pil", interactive=False, visible=False,
                                 elem_id=eid("map_image"), **image_format)
            summary = gr.Markdown("", elem_id=eid("summary"))

    components = [enabled, content, style, content_strength, style_strength, pattern, alpha, beta, gamma,
                  gamma_value, mode, scope, te, show_map]

    # user picks a pattern → α/β move to its defaults. `.input` (user action only) so that pasting an
    # infotext, which sets pattern and β together, is not overwritten; `.change` where `.input` is missing.
    pattern_event = getattr(pattern, "input", None) or pattern.change
    pattern_event(fn=lambda v: (pattern_input_alpha(v), pattern_input_beta(v)), inputs=[pattern],
                  outputs=[alpha, beta])
    gamma.change(fn=lambda v: gr.update(visible=_to_choice("gamma", v) == "manual"), inputs=[gamma],
                 outputs=[gamma_value])

    def on_analyze(*values: Any) -> tuple[Any, str]:
        image, text = run_analyze(analyze, values[:-1], values[-1])
        return gr.update(value=image, visible=image is not None), text

    analyze_button.click(fn=on_analyze, inputs=[*components, analyze_steps], outputs=[map_image, summary])

    try:
        from modules.infotext_utils import PasteField  # A1111 ≥ 1.8 and Forge
    except ImportError:  # older: plain (component, getter) pairs
        def PasteField(component: Any, target: Any, **_: Any) -> tuple[Any, Any]:
            return (component, target)

    getters = paste_getters(resolve_name)
    script.infotext_fields = [PasteField(comp, getters[name]) for name, comp in zip(ARG_NAMES, components,
                                                                                        strict=True)
                              if name != "show_map"]
    return components
