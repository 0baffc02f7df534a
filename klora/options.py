"""Every K-LoRA option, once: the table that the engine, the webui and the command line are derived from.

:data:`OPTIONS` lists the options in the order of the panel's components, which is also the order of the
script's positional arguments and so of the HTTP API's positional list (new options go at the end, or old
API calls would shift). Each :class:`Option` says what the value is, its default, how the panel labels it
and its choices, what the tag, the infotext and the command line call it, and whether it is an XYZ axis.
From it come :class:`FusionOptions` (what the engine takes), the webui's argument object, tag, infotext,
XYZ axes and API check (``klora.webui``), and the CLI's argparse (``klora.cli``). Every spelling a user may
type is read by :func:`parse`, so a value the tag refuses is refused by the CLI and the API too.

The scale patterns: ``s`` (the paper, S(τ) = 1.5·τ + 0.5) and ``s*`` (the official code's default from the
supplementary material, S(τ) = (1.5·τ + 1.275) mod 1.5), in :data:`PATTERNS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "FAMILY_DEFAULTS",
    "OPTIONS",
    "PATTERNS",
    "FusionOptions",
    "Option",
    "OptionError",
    "PatternSpec",
    "family_defaults",
    "field_name",
    "option",
    "parse",
]


class OptionError(ValueError):
    """An option value that cannot be used; ``str(err)`` is a message fit to show the user, ``field`` the
    option it is about (None when it is about no single option)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PatternSpec:
    """S(τ) = α·τ + β with these defaults; ``modulo``: take S modulo α (pattern ``s*``)."""

    alpha: float
    beta: float
    modulo: bool


PATTERNS: dict[str, PatternSpec] = {"s": PatternSpec(1.5, 0.5, False), "s*": PatternSpec(1.5, 1.275, True)}

@dataclass(frozen=True)
class FamilyDefaults:
    """Option values a model family uses unless the user chose them, and how the infotext names the family."""

    label: str
    values: Mapping[str, Any]


FAMILY_DEFAULTS: dict[str, FamilyDefaults] = {
    # The flow-matching DiTs use s*. The official K-LoRA code has one DiT path, Flux's, and it always takes
    # S modulo alpha (inference_flux.py never passes the pattern on), so every DiT result of the authors was
    # made with s*; its README recommends s* for Flux and its SDXL script switched its default to s* too.
    # ComfyUI-ZQX's s for Qwen-Image and Z-Image is its generic default, untested on real models by its own
    # account. Chroma is Flux's architecture; Z-Image, Lumina 2, Qwen-Image and Wan are flow-matching DiTs
    # trained and sampled like Flux, for which s* is the only evidence there is (an extrapolation: no one has
    # compared s and s* on them). SD UNets keep the paper's s.
    "flux": FamilyDefaults("Flux", {"pattern": "s*"}),
    "chroma": FamilyDefaults("Chroma", {"pattern": "s*"}),
    "zimage": FamilyDefaults("Z-Image", {"pattern": "s*"}),
    "lumina2": FamilyDefaults("Lumina 2", {"pattern": "s*"}),
    "qwen-image": FamilyDefaults("Qwen-Image", {"pattern": "s*"}),
    "wan": FamilyDefaults("Wan", {"pattern": "s*"}),
}

ValueType = Literal["bool", "name", "number", "choice", "gamma"]


@dataclass(frozen=True)
class Option:
    """One option.

    ``type``: ``bool``; ``name`` (a LoRA name, "" = none); ``number`` (finite, within ``minimum``/``maximum``,
    whole with ``integer``; ``optional``: None means "the default rule": the pattern's α/β, K = r_c·r_s);
    ``choice`` (one of ``choices``, code → panel label); ``gamma`` (a choice, or a number > 0 that means
    "manual" with that value).
    ``tag``: the key in ``<klora:…:key=value>`` (None: the tag cannot set it); ``aliases``: other names the
    tag and the API's named form accept; ``infotext``: its key inside the ``K-LoRA`` infotext field;
    ``cli``: its flag in ``python -m klora inspect``; ``xyz``: the XYZ plot axis label (None: no axis) and
    ``xyz_cost`` its cost (how much changing it costs: the plot orders axes by it); ``engine``: whether
    :class:`FusionOptions` takes it.
    """

    name: str
    type: ValueType
    default: Any
    label: str
    help: str
    choices: Mapping[str, str] = field(default_factory=dict)
    value_aliases: Mapping[str, str] = field(default_factory=dict)
    optional: bool = False
    minimum: float | None = None
    exclusive: bool = False  # the minimum itself is not allowed
    maximum: float | None = None
    integer: bool = False  # a whole number
    unset: float | None = None  # a number that also means None (gradio's empty number box sends 0)
    tag: str | None = None
    aliases: tuple[str, ...] = ()
    infotext: str | None = None
    infotext_default: bool = True  # written to the infotext also when it holds its default
    cli: str | None = None
    xyz: str | None = None
    xyz_cost: float = 0.0
    engine: bool = False

    def describe_choices(self) -> str:
        return ", ".join(self.choices)

    def label_of(self, code: str) -> str:
        return self.choices[code]


def _choice(name: str, labels: dict[str, str], default: str, label: str, help: str, **kw: Any) -> Option:
    return Option(name, "choice", default, label, help, choices=labels, tag=name, infotext=name,
                  cli=f"--{name}", xyz=kw.pop("xyz", label), engine=True, **kw)


OPTIONS: tuple[Option, ...] = (
    Option("enabled", "bool", False, "K-LoRA", "apply K-LoRA to this generation", aliases=("enable",),
           xyz="Enabled"),
    Option("content", "name", "", "Content LoRA", "the subject LoRA (a dog, a character)",
           aliases=("content_lora",), infotext="content", xyz="Content LoRA", xyz_cost=0.5),
    Option("style", "name", "", "Style LoRA", "the style LoRA (watercolor, a painter)",
           aliases=("style_lora",), infotext="style", xyz="Style LoRA", xyz_cost=0.5),
    Option("content_strength", "number", 1.0, "Content strength",
           "multiplies the content LoRA's delta, as <lora:name:X> would", tag="cw",
           aliases=("content_weight",), infotext="cw", cli="--content-strength", xyz="Content strength",
           engine=True),
    Option("style_strength", "number", 1.0, "Style strength",
           "multiplies the style LoRA's delta, as <lora:name:X> would", tag="sw",
           aliases=("style_weight",), infotext="sw", cli="--style-strength", xyz="Style strength",
           engine=True),
    _choice("pattern", {"s": "s (paper)", "s*": "s* (official)"}, "s", "Pattern",
            "the style scale S(tau) = alpha*tau + beta: s (paper: 1.5, 0.5) or s* (official code: 1.5, "
            "1.275, S mod alpha)", value_aliases={"sstar": "s*", "official": "s*"}),
    Option("alpha", "number", None, "α (slope)",
           "alpha of S(tau) = alpha*tau + beta (default: the pattern's)",
           optional=True, minimum=0.0, tag="alpha", infotext="alpha", cli="--alpha", xyz="Alpha",
           engine=True),
    Option("beta", "number", None, "β (offset)", "beta of S(tau) = alpha*tau + beta (default: the pattern's)",
           optional=True, minimum=0.0, tag="beta", infotext="beta", cli="--beta", xyz="Beta", engine=True),
    Option("gamma", "gamma", "auto", "γ (balance)",
           "balances LoRAs of different magnitude: auto (mean of per-layer ratios, outliers cut), paper "
           "(eq. 9) or a number", choices={"auto": "auto", "paper": "paper (eq. 9)", "manual": "manual"},
           tag="gamma", infotext="gamma", cli="--gamma", xyz="Gamma", xyz_cost=0.1, engine=True),
    Option("gamma_value", "number", 1.0, "γ value", "the manual gamma", minimum=0.0, exclusive=True,
           tag="gamma_value"),
    _choice("mode", {"klora": "K-LoRA", "topk": "Top-K only", "fixed": "Fixed schedule", "random": "Random",
                     "merge": "Direct merge"}, "klora", "Mode",
            "the selection rule: klora, or the paper's ablations topk, fixed, random, merge (both deltas)",
            value_aliases={"direct": "merge", "fixedschedule": "fixed", "topkonly": "topk"}),
    _choice("scope", {"all": "All layers", "attention": "Attention only"}, "all", "Scope",
            "the layers K-LoRA decides: all shared ones, or attention projections only (others get both "
            "deltas)", value_aliases={"attn": "attention", "alllayers": "all"}, xyz_cost=0.1),
    # "Neither", not "None": the webui's hints.js gives every "None" text its own tooltip
    _choice("te", {"both": "Both", "content": "Content", "style": "Style", "none": "Neither"}, "both",
            "Text encoder", "text-encoder layers (run once per prompt): both deltas, content, style or none",
            value_aliases={"contentonly": "content", "styleonly": "style"}, aliases=("text_encoder",)),
    Option("show_map", "bool", False, "Show selection map",
           "add the map of which layer used which LoRA at which step to the results", tag="map",
           aliases=("map",)),
    # options added after the first release go here, at the end: the API's positional list keeps its order
    Option("balance", "number", 0.0, "Balance: subject ↔ style",
           "moves every layer's switch from the subject to the style: negative keeps the subject longer, "
           "positive hands over to the style earlier; the style side is weighted by 4^balance (0: the paper)",
           minimum=-1.0, maximum=1.0, tag="balance", infotext="balance", infotext_default=False,
           cli="--balance", xyz="Balance", engine=True),
    Option("k", "number", None, "K (Top-K entries)",
           "how many of each delta's largest entries are summed (default, or 0: the product of the two "
           "ranks, as the paper)", optional=True, unset=0, minimum=1.0, integer=True, tag="k", infotext="k",
           infotext_default=False, cli="--k", xyz="K", xyz_cost=0.1, engine=True),
)
"""The panel's components, the script's positional arguments and the API's positional list, in order."""

_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
_ALIASES: dict[str, str] = {a: o.name for o in OPTIONS for a in (*o.aliases, *((o.tag and [o.tag]) or []))}


def option(name: str) -> Option:
    """The option called ``name`` (its field name)."""
    return _BY_NAME[name]


def field_name(key: str) -> str:
    """The option a name given by a user means (field name, tag key or alias, any case)."""
    k = key.strip().lower()
    if k in _BY_NAME:
        return k
    if k in _ALIASES:
        return _ALIASES[k]
    known = ", ".join(_BY_NAME)
    aliases = ", ".join(sorted(_ALIASES))
    raise OptionError(f"unknown K-LoRA argument {key!r}; known: {known} (aliases: {aliases})")


# ------------------------------------------------------------------------------------------------ reading


def _norm(text: str) -> str:
    return re.sub(r"[\s\-_().]", "", text.lower())


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
NO_LORA = "None"
"""The dropdown value meaning "no LoRA chosen"; read as the empty name."""


def _error(opt: Option, what: str, value: Any) -> OptionError:
    return OptionError(f"K-LoRA argument '{opt.name}' must be {what}, got {value!r}", opt.name)


def _as_number(value: Any) -> float | None:
    """A JSON number or a number's text as a float (maybe not finite); None for anything else."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _number(opt: Option, value: Any) -> float | None:
    if opt.optional and (value is None
                         or (isinstance(value, str) and value.strip().lower() in ("", "default", "auto"))):
        return None
    number = _as_number(value)
    if opt.optional and number is not None and number == opt.unset:
        return None
    if number is None or not math.isfinite(number):
        extra = " or 'default'" if opt.optional else ""
        raise _error(opt, f"a finite number{extra}", value)
    if opt.integer and number != int(number):
        raise _error(opt, "a whole number", value)
    if opt.minimum is not None and (number < opt.minimum or (opt.exclusive and number == opt.minimum)):
        raise _error(opt, f"{'>' if opt.exclusive else '≥'} {opt.minimum:g}", value)
    if opt.maximum is not None and number > opt.maximum:
        raise _error(opt, f"≤ {opt.maximum:g}", value)
    if opt.integer:
        return int(number)
    return number


def _choice_error(opt: Option, value: Any) -> OptionError:
    shown = ", ".join(f"'{label}'" for label in opt.choices.values())
    extra = " or a number > 0" if opt.type == "gamma" else ""
    return OptionError(f"K-LoRA argument '{opt.name}': {value!r} is not one of {opt.describe_choices()}"
                       f"{extra} (or the panel labels {shown})", opt.name)


def _code(opt: Option, value: Any) -> str:
    if isinstance(value, str):
        key = _norm(value)
        for code, label in opt.choices.items():
            if key in (_norm(code), _norm(label)):
                return code
        if key in opt.value_aliases:
            return opt.value_aliases[key]
    raise _choice_error(opt, value)


def parse(name: str, value: Any) -> dict[str, Any]:
    """A raw value of option ``name`` (text from a tag, an infotext or an XYZ cell, a JSON value, a panel
    label) → the field values it means: ``{name: value}``, or for a γ number ``{"gamma": "manual",
    "gamma_value": x}``. Raises :class:`OptionError` with a message naming the option."""
    opt = _BY_NAME.get(name)
    if opt is None:
        raise OptionError(f"unknown K-LoRA argument {name!r}", name)
    if opt.type == "bool":
        if isinstance(value, bool):
            return {name: value}
        if isinstance(value, int | float) and value in (0, 1):
            return {name: bool(value)}
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return {name: value.strip().lower() in _TRUE}
        raise _error(opt, "true or false", value)
    if opt.type == "name":
        if value is None:
            return {name: ""}
        if not isinstance(value, str):
            raise _error(opt, "a LoRA name (text)", value)
        return {name: "" if value.strip() in (NO_LORA, "none", "") else value}  # exact: names may have spaces
    if opt.type == "number":
        return {name: _number(opt, value)}
    if opt.type == "gamma":
        number = _as_number(value)
        if number is not None:
            if not (math.isfinite(number) and number > 0):
                raise _choice_error(opt, value)
            return {"gamma": "manual", "gamma_value": number}
        return {name: _code(opt, value)}
    return {name: _code(opt, value)}


def check(name: str, value: Any) -> Any:
    """``value`` if it is already a valid value of field ``name`` (a code for choices, a float for numbers),
    else :class:`OptionError`. Numbers come back as floats (whole-number options as ints)."""
    opt = _BY_NAME[name]
    if opt.type == "bool":
        if not isinstance(value, bool):
            raise _error(opt, "true or false", value)
        return value
    if opt.type == "name":
        if not isinstance(value, str):
            raise _error(opt, "a LoRA name (text)", value)
        return value
    if opt.type == "number":
        if value is None and opt.optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _error(opt, "a finite number", value)
        return _number(opt, value)
    if value not in opt.choices:
        raise _choice_error(opt, value)
    return value


# ------------------------------------------------------------------------------------------ the engine's


@dataclass(frozen=True)
class FusionOptions:
    """Everything that shapes a plan (the ``engine`` options of :data:`OPTIONS`, checked against it, plus the
    seed of mode ``random``). ``alpha``/``beta`` None: the pattern's defaults. ``gamma``: ``"auto"``,
    ``"paper"`` or a number > 0. ``k`` None: K = r_c·r_s per layer."""

    pattern: Literal["s", "s*"] = "s"
    alpha: float | None = None
    beta: float | None = None
    gamma: Literal["auto", "paper"] | float = "auto"
    mode: Literal["klora", "topk", "fixed", "random", "merge"] = "klora"
    scope: Literal["all", "attention"] = "all"
    te: Literal["both", "content", "style", "none"] = "both"
    content_strength: float = 1.0
    style_strength: float = 1.0
    balance: float = 0.0
    k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for opt in OPTIONS:
            if opt.engine and opt.name != "gamma":
                object.__setattr__(self, opt.name, check(opt.name, getattr(self, opt.name)))
        g = self.gamma
        if isinstance(g, str):
            if g not in ("auto", "paper"):
                raise _choice_error(option("gamma"), g)
        elif isinstance(g, bool) or not isinstance(g, int | float) or not (math.isfinite(g) and g > 0):
            raise _choice_error(option("gamma"), g)
        if PATTERNS[self.pattern].modulo and self.resolved_alpha == 0:
            raise OptionError("K-LoRA argument 'alpha' must be > 0 with pattern s* (its scale is taken "
                              "modulo alpha)", "alpha")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise OptionError(f"the seed must be an integer, got {self.seed!r}", "seed")

    @property
    def resolved_alpha(self) -> float:
        return float(PATTERNS[self.pattern].alpha if self.alpha is None else self.alpha)

    @property
    def resolved_beta(self) -> float:
        return float(PATTERNS[self.pattern].beta if self.beta is None else self.beta)

    @property
    def style_factor(self) -> float:
        """What ``balance`` multiplies the style side of the rule by: 4^balance (γ·4^b·S(τ)·S_s)."""
        return 4.0 ** self.balance

    @classmethod
    def from_fields(cls, values: Mapping[str, Any], seed: int = 0) -> FusionOptions:
        """From option field values (as :func:`parse` gives them; ``gamma`` "manual" takes ``gamma_value``);
        fields the engine does not take are ignored."""
        kwargs = {o.name: values[o.name] for o in OPTIONS if o.engine and o.name in values}
        if kwargs.get("gamma") == "manual":
            kwargs["gamma"] = float(values.get("gamma_value", option("gamma_value").default))
        return cls(**kwargs, seed=seed)


def family_defaults(family: str, values: Mapping[str, Any], given: Iterable[str] = ()
                    ) -> tuple[dict[str, Any], str | None]:
    """The updates ``family``'s defaults make to option ``values`` and a note for the infotext (None: none).

    An option counts as chosen by the user, and keeps its value, when it is in ``given`` (set by a tag or an
    XYZ cell) or differs from the table's default; the pattern, α and β count as one choice (α and β belong to
    the pattern, and a panel always sends numbers, so its defaults cannot be told from a choice)."""
    spec = FAMILY_DEFAULTS.get(family)
    if spec is None:
        return {}, None
    chosen = set(given)
    defaults = {o.name: o.default for o in OPTIONS}
    pattern_group = {"pattern", "alpha", "beta"}
    pattern = PATTERNS[defaults["pattern"]]
    if (values.get("pattern", defaults["pattern"]) != defaults["pattern"]
            or values.get("alpha") not in (None, pattern.alpha)
            or values.get("beta") not in (None, pattern.beta)):
        chosen |= pattern_group
    if chosen & pattern_group:
        chosen |= pattern_group
    updates: dict[str, Any] = {}
    for name, value in spec.values.items():
        if name in chosen or values.get(name, defaults[name]) != defaults[name]:
            continue
        updates[name] = value
        if name == "pattern":
            updates.update(alpha=None, beta=None)
    if not updates:
        return {}, None
    shown = ", ".join(f"{name} {value}" for name, value in spec.values.items() if name in updates)
    return updates, f"{spec.label} default {shown}"


def engine_options() -> Iterable[Option]:
    """The options :class:`FusionOptions` takes, in table order."""
    return (o for o in OPTIONS if o.engine)
