"""The XYZ plot axes (``[K-LoRA] …``, one per option the options table gives an axis label) and how a cell's
values reach the generation: ``apply`` stores them on the processing object, :func:`apply_overrides` puts them
over the panel and the tag."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from klora import options
from klora.options import OPTIONS
from klora.webui.args import TITLE, KLoraArgs, KLoraArgsError, build
from klora.webui.tag import merge_tag_over_panel

XYZ_ATTR = "_klora_xyz"
"""Attribute of the processing object where XYZ axis values are stored (a fresh dict per cell)."""


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


def _updates(name: str, value: Any) -> dict[str, Any]:
    try:
        updates = options.parse(name, value)
        replace(KLoraArgs(), **updates)  # ranges (α, β ≥ 0, γ > 0)
    except KLoraArgsError as err:
        raise RuntimeError(f"[{TITLE}] XYZ plot: {err}") from None
    if name in ("content", "style") and not updates[name]:
        raise RuntimeError(f"[{TITLE}] XYZ plot: the {name} LoRA name is empty")
    return updates


def _apply(name: str) -> Callable[[Any, Any, Any], None]:
    def apply(p: Any, x: Any, xs: Any) -> None:
        # xyz_grid makes a shallow copy of p per cell: store a new dict, never mutate a shared one
        current = getattr(p, XYZ_ATTR, None) or {}
        setattr(p, XYZ_ATTR, {**current, **_updates(name, x)})

    return apply


def _confirm(name: str) -> Callable[[Any, Any], None]:
    def confirm(p: Any, xs: Any) -> None:
        for x in xs:
            _updates(name, x)

    return confirm


def _fixed(values: list[str]) -> Callable[[], list[str]]:
    return lambda: list(values)


def axes(lora_names: Callable[[], list[str]] | None = None) -> list[XyzAxis]:
    """The K-LoRA axes of the XYZ plot, in the options table's order."""
    out = []
    for opt in OPTIONS:
        if opt.xyz is None:
            continue
        choices: Callable[[], list[str]] | None = None
        if opt.type == "bool":
            choices = _fixed(["True", "False"])
        elif opt.type == "name" and lora_names is not None:
            choices = lora_names
        elif opt.type == "choice":
            choices = _fixed(list(opt.choices.values()))
        typ = float if opt.type == "number" else str
        out.append(XyzAxis(f"[{TITLE}] {opt.xyz}", typ, _apply(opt.name), _confirm(opt.name), choices,
                           opt.xyz_cost))
    return out


def overrides(p: Any) -> dict[str, Any]:
    """The XYZ values stored on ``p`` for this cell ({} outside a plot)."""
    value = getattr(p, XYZ_ATTR, None)
    return dict(value) if isinstance(value, Mapping) else {}


def apply_overrides(args: KLoraArgs, p: Any) -> KLoraArgs:
    """``args`` with the XYZ cell's values on top. Any K-LoRA axis turns K-LoRA on unless the "Enabled"
    axis says otherwise; a pattern axis without α/β axes moves them to the pattern's defaults."""
    values = overrides(p)
    if not values:
        return args
    return build(args, {"enabled": True, **values}, given=args.given | frozenset(values))


def effective_args(panel: KLoraArgs, tag_args: KLoraArgs | None, p: Any = None) -> KLoraArgs:
    """Panel < tag < XYZ cell: the settings one image uses (check ``require_pair`` next)."""
    return apply_overrides(merge_tag_over_panel(panel, tag_args), p)


def register_axes(lora_names: Callable[[], list[str]] | None = None) -> int:
    """Add the K-LoRA axes to the built-in XYZ plot script; returns how many were added.

    Call it from ``script_callbacks.on_before_ui``. The XYZ module is found in ``scripts.scripts_data`` by
    what it offers (``axis_options`` and ``AxisOption``; A1111, Forge and Neo name it ``xyz_grid.py``,
    modules/script_loading.py ``load_module``); labels already present are skipped, because ``before_ui``
    runs again when the UI reloads.
    """
    from modules import scripts  # the webui's; only here

    xyz = next((data.module for data in scripts.scripts_data
                if hasattr(data.module, "axis_options") and hasattr(data.module, "AxisOption")), None)
    if xyz is None:
        return 0
    present = {getattr(option, "label", None) for option in xyz.axis_options}
    added = 0
    for axis in axes(lora_names):
        if axis.label in present:
            continue
        # scripts/xyz_grid.py: AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0,
        # choices=None, prepare=None)
        xyz.axis_options.append(xyz.AxisOption(axis.label, axis.type, axis.apply, confirm=axis.confirm,
                                               cost=axis.cost, choices=axis.choices))
        added += 1
    return added
