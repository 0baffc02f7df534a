"""The webui's argument object: every option of :data:`klora.options.OPTIONS`, checked, from any entrance.

One argument list, three entrances:

* the panel: ``Script.ui()`` returns the components in :data:`ARG_NAMES` order; every hook gets their values,
* the API: ``alwayson_scripts: {"K-LoRA": {"args": [...]}}`` with the same positional list (shorter lists keep
  the panel defaults for the rest) or a list holding one dict of named fields,
* the tag ``<klora:CONTENT:STYLE[:CW[:SW]][:key=value...]>`` (:mod:`klora.webui.tag`), which wins over the
  panel.

:class:`KLoraArgs` is made from the options table: its fields are the options, in the table's order, with
the table's defaults, and every value is checked against the table on construction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import field, make_dataclass, replace
from typing import Any

from klora import options
from klora.options import NO_LORA, OPTIONS, PATTERNS, FusionOptions, OptionError

TITLE = "K-LoRA"
"""Script title; also the key of ``alwayson_scripts`` in the API (matched case-insensitively by the webui)."""

KLoraArgsError = OptionError
"""A K-LoRA argument is missing or invalid; ``str(err)`` is a message fit to show the user."""

ARG_NAMES: tuple[str, ...] = tuple(o.name for o in OPTIONS)
"""Order of the components ``Script.ui()`` returns, hence of the script args and the API's positional list."""


class _Args:
    """The behaviour of :class:`KLoraArgs` (its fields come from the options table)."""

    given: frozenset[str]

    def __post_init__(self) -> None:
        for name in ARG_NAMES:
            object.__setattr__(self, name, options.check(name, getattr(self, name)))
        if PATTERNS[self.pattern].modulo and self.alpha == 0:
            raise KLoraArgsError("K-LoRA argument 'alpha' must be > 0 with pattern s* (its scale is taken "
                                 "modulo alpha)", "alpha")
        if not isinstance(self.given, frozenset):
            object.__setattr__(self, "given", frozenset(self.given))

    @property
    def resolved_alpha(self) -> float:
        """α actually used: the given value, else the pattern's default."""
        return PATTERNS[self.pattern].alpha if self.alpha is None else self.alpha

    @property
    def resolved_beta(self) -> float:
        """β actually used: the given value, else the pattern's default."""
        return PATTERNS[self.pattern].beta if self.beta is None else self.beta

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

    def to_fusion_options(self, seed: int) -> FusionOptions:
        """The engine's options; ``seed`` seeds the ``random`` mode (pass the image seed)."""
        values = {name: getattr(self, name) for name in ARG_NAMES}
        values.update(alpha=self.resolved_alpha, beta=self.resolved_beta)
        return FusionOptions.from_fields(values, seed=int(seed))

    def to_dict(self) -> dict[str, Any]:
        """The named-field form the API accepts (codes, not labels)."""
        return {name: getattr(self, name) for name in ARG_NAMES}

    def to_ui_values(self) -> list[Any]:
        """The panel components' values in :data:`ARG_NAMES` order (labels for radios and dropdowns)."""
        return [ui_value(name, self) for name in ARG_NAMES]


KLoraArgs = make_dataclass(
    "KLoraArgs",
    [*((o.name, Any, field(default=o.default)) for o in OPTIONS),
     ("given", frozenset, field(default=frozenset(), compare=False, repr=False))],
    bases=(_Args,), frozen=True,
)
KLoraArgs.__module__ = __name__
KLoraArgs.__doc__ = """Everything the panel, the tag and the API can set (the fields of
:data:`klora.options.OPTIONS`); ``alpha``/``beta`` None = the pattern's default. ``given``: the fields a tag
or an XYZ cell set explicitly (not an argument of the script). Whether a pair is chosen is checked separately
by ``require_pair``, because a panel without names is fine when a tag names them."""


def ui_value(name: str, args: KLoraArgs) -> Any:
    """The panel component's value of field ``name``: choice labels, "None" for no LoRA, resolved α/β."""
    opt = options.option(name)
    value = getattr(args, name)
    if opt.choices:
        return opt.label_of(value)
    if opt.type == "name":
        return value or NO_LORA
    if name == "alpha":
        return args.resolved_alpha
    if name == "beta":
        return args.resolved_beta
    if value is None and opt.unset is not None:  # an empty number box: what it sends for "unset"
        return opt.unset
    return value


def build(base: KLoraArgs, updates: Mapping[str, Any], *, given: Sequence[str] | frozenset[str] = ()
          ) -> KLoraArgs:
    """Apply parsed field updates; a pattern switch without α/β moves them to the new pattern's defaults."""
    updates = dict(updates)
    if "pattern" in updates and updates["pattern"] != base.pattern:
        updates.setdefault("alpha", None)
        updates.setdefault("beta", None)
    return replace(base, **updates, given=frozenset(given))


def from_dict(data: Mapping[str, Any], *, enabled_default: bool = True) -> KLoraArgs:
    """Named fields (field names, tag keys or aliases) → KLoraArgs; missing fields take the defaults.

    ``enabled`` defaults to True: sending the dict means "use K-LoRA". α/β missing = the pattern's defaults.
    """
    if not isinstance(data, Mapping):
        raise KLoraArgsError(f"K-LoRA arguments must be a list or a dict, got {type(data).__name__}")
    updates: dict[str, Any] = {"enabled": enabled_default}
    seen: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise KLoraArgsError(f"unknown K-LoRA argument {key!r}")
        name = options.field_name(key)
        if name in seen:
            raise KLoraArgsError(f"K-LoRA argument '{name}' given twice ({seen[name]!r} and {key!r})", name)
        seen[name] = key
        if value is None:  # null = the default (for alpha/beta: the pattern's value)
            continue
        parsed = options.parse(name, value)
        if name == "gamma" and "gamma_value" in parsed and "gamma_value" in data:
            raise KLoraArgsError("K-LoRA: 'gamma' is a number and 'gamma_value' is given too; give one",
                                 "gamma")
        updates.update(parsed)
    return build(KLoraArgs(), updates)


def from_script_args(args: Sequence[Any] | Mapping[str, Any] | KLoraArgs) -> KLoraArgs:
    """The script's ``*args`` (or an API ``args`` value) → validated KLoraArgs.

    Accepts the positional list in :data:`ARG_NAMES` order (shorter = defaults for the rest; None = default;
    labels or codes for choices), a list whose first item is a dict of named fields (the API form; the webui
    fills the remaining positions with panel defaults, which are then ignored), or the dict itself.
    Names are not required here; call ``require_pair`` after merging the tag.
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
        parsed = options.parse(name, value)
        if name == "gamma":
            gamma_updates = parsed  # a number at the gamma position beats the gamma_value position
        updates.update(parsed)
    updates.update(gamma_updates)
    return replace(KLoraArgs(), **updates)


def number_text(value: float) -> str:
    """Shortest text that reads back as the same float ("1" for 1.0)."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text
