"""Human-readable views of a fusion plan: a text summary and the selection map (the paper's Fig. 6).

The map has one row per layer in model order (UNet down, mid, up blocks, then the text encoders) and one
column per sampling step ``i`` at progress ``tau = i / N``; each cell is coloured by the delta applied there.
Only Pillow is used (the webui ships it; it does not ship matplotlib), and only Latin-1 text is drawn,
because Pillow's default font has no Greek letters or arrows.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw, ImageFont

from klora.keys import DIT_FAMILIES, is_text_encoder, layer_order

if TYPE_CHECKING:
    from klora.fusion import Plan

#: Letter of ``Plan.choices`` → what it means.
CHOICE_NAMES: dict[str, str] = {"C": "content", "S": "style", "B": "both", "-": "none"}
#: Cell colours of the selection map (blue content and green style, as in the paper's Fig. 6).
COLORS: dict[str, tuple[int, int, int]] = {
    "C": (45, 105, 200),
    "S": (60, 165, 90),
    "B": (235, 165, 45),
    "-": (205, 205, 205),
}
BACKGROUND = (255, 255, 255)
INK = (30, 30, 30)
MUTED = (110, 110, 110)
RULE = (175, 175, 175)

# --------------------------------------------------------------------------------------------- blocks


def block_of(key: str) -> str:
    """The block a canonical layer key belongs to: ``down 1``, ``mid``, ``up 2``, ``TE1``, ``TE2``; DiTs
    (component ``transformer``): ``double``, ``single`` (Flux; Qwen-Image's blocks are double-stream too),
    the block kinds of the other families (``context refiner``, ``noise refiner``, ``layers``; ``blocks``),
    ``in``, ``out``."""
    component, _, path = key.partition("/")
    if component.startswith("te"):
        return component.upper()
    if component == "transformer":
        if re.match(r"(transformer_blocks|double_blocks)_\d+_", path):
            return "double"
        if re.match(r"(single_transformer_blocks|single_blocks)_\d+_", path):
            return "single"
        for family in DIT_FAMILIES:
            if m := family.block_re.match(path):
                return m.group(1).replace("_", " ")
        out = re.match(r"(norm_out|proj_out|final_layer|all_final_layer)", path)
        return "out" if out else "in"  # embedders
    m = re.match(r"(down|up)_blocks_(\d+)_", path)
    if m:
        return f"{m.group(1)} {m.group(2)}"
    if path.startswith("mid_block_"):
        return "mid"
    if re.match(r"(conv_in|time_embedding|add_embedding|time_proj)", path):
        return "in"
    if re.match(r"(conv_norm_out|conv_out)", path):
        return "out"
    return "other"


def ordered_keys(plan: Plan) -> list[str]:
    """The plan's layer keys as the map shows them: the denoiser's in forward order, then the text encoders'
    (whose rows do not change over the steps) in forward order (:func:`klora.keys.layer_order`)."""
    return sorted(plan.layers, key=lambda key: (is_text_encoder(key), layer_order(key)))


def blocks(plan: Plan) -> list[tuple[str, list[str]]]:
    """``[(block name, [keys in model order])]`` in model order."""
    out: list[tuple[str, list[str]]] = []
    for key in ordered_keys(plan):
        name = block_of(key)
        if out and out[-1][0] == name:
            out[-1][1].append(key)
        else:
            out.append((name, [key]))
    return out


# -------------------------------------------------------------------------------------------- summary


def plan_parameters(plan: Plan) -> dict[str, Any]:
    """Pattern, resolved alpha/beta, gamma and the other options the plan was made with."""
    o = plan.options
    return {
        "pattern": o.pattern,
        "alpha": float(plan.alpha),
        "beta": float(plan.beta),
        "gamma": float(plan.gamma),
        "gamma_method": str(plan.gamma_method),
        "gamma_note": str(getattr(plan, "gamma_note", "") or ""),
        "mode": o.mode,
        "scope": o.scope,
        "te": o.te,
        "content_strength": o.content_strength,
        "style_strength": o.style_strength,
        "balance": o.balance,
        "k": o.k,
        "seed": o.seed,
    }


def choice_table(plan: Plan, steps: int) -> dict[str, str]:
    """``{key: one letter per step}`` for every layer, in model order."""
    return {key: plan.choices(key, steps) for key in ordered_keys(plan)}


_SPARKS = " ▁▂▃▄▅▆▇█"


def _sparkline(values: list[float | None], width: int = 60) -> str:
    if len(values) > width:  # sample evenly so that the line stays one terminal row
        values = [values[round(j * (len(values) - 1) / (width - 1))] for j in range(width)]
    return "".join("·" if v is None else _SPARKS[round(v * (len(_SPARKS) - 1))] for v in values)


def _fmt_float(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}"


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"step {lo}" if lo == hi else f"steps {lo}–{hi}"


def _block_line(name: str, keys: list[str], table: dict[str, str]) -> str:
    """``up 1: 36 layers; flips C→S at steps 3–12 (30 layers); 6 stay style``."""
    flips: dict[tuple[str, str], list[int]] = defaultdict(list)
    steady: Counter[str] = Counter()
    for key in keys:
        row = table[key]
        at = [i for i in range(1, len(row)) if row[i] != row[i - 1]]
        for i in at:
            flips[(row[i - 1], row[i])].append(i)
        if not at:
            steady[row[0] if row else "-"] += 1
    parts = [f"{name}: {len(keys)} layer{'s' if len(keys) != 1 else ''}"]
    if flips:
        parts.append("flips " + ", ".join(
            f"{a}→{b} at {_span(at)} ({len(at)} layer{'s' if len(at) != 1 else ''})"
            for (a, b), at in sorted(flips.items(), key=lambda kv: (min(kv[1]), kv[0]))
        ))
    if steady:
        every = "all " if not flips and len(keys) > 1 and len(steady) == 1 else ""
        parts.append(", ".join(f"{every}{n} stay{'s' if n == 1 else ''} {CHOICE_NAMES[c]}"
                               for c, n in steady.most_common()))
    return "; ".join(parts)


def summarize(plan: Plan, steps: int) -> str:
    """A short human summary of a plan over an ``steps``-step run (progress tau = i/steps at step i)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    p = plan_parameters(plan)
    table = choice_table(plan, steps)
    sources = Counter(lp.source for lp in plan.layers.values())
    shared = Counter(key.partition("/")[0] for key, lp in plan.layers.items() if lp.source == "shared")
    comp_text = ", ".join(f"{c} {n}" for c, n in sorted(shared.items()))
    k_range = plan.k_range
    k_text = "K n/a" if k_range is None else "K " + (
        f"{k_range[0]}" if k_range[0] == k_range[1] else f"{k_range[0]}–{k_range[1]}")
    scored = sum(lp.k is not None for lp in plan.layers.values())
    gamma_how = p["gamma_method"] + (f": {p['gamma_note']}" if p["gamma_note"] else "")

    lines = [
        f"layers: {sources['shared']} shared ({comp_text or 'none'}), {sources['content']} content only, "
        f"{sources['style']} style only; {scored} scored, {k_text}",
        f"gamma {_fmt_float(p['gamma'])} ({gamma_how})"
        + (f"; balance {p['balance']:+g} (style side × {4.0 ** p['balance']:.3g})" if p["balance"] else "")
        + ("" if p["mode"] == "klora" else f"; not used by mode {p['mode']}"),
        f"pattern {p['pattern']}: S(tau) = {_fmt_float(p['alpha'])}·tau + {_fmt_float(p['beta'])}"
        + (f" mod {_fmt_float(p['alpha'])}" if p["pattern"] == "s*" else "")
        + f"; mode {p['mode']}, scope {p['scope']}, te {p['te']}, strengths content "
        f"{_fmt_float(p['content_strength'])} / style {_fmt_float(p['style_strength'])}",
    ]
    shares = plan.content_share(steps)
    marks = sorted({round(j * (steps - 1) / 5) for j in range(6)})
    row = "  ".join(f"{i}:{'-' if shares[i] is None else f'{shares[i]:.0%}'}" for i in marks)
    lines.append(f"content share of the layers decided per step ({steps} steps): {row}")
    lines.append(f"  step 0 {_sparkline(shares)} step {steps - 1}")
    lines.append("flips by block (first step of the new choice; C content, S style, B both, - none):")
    lines.extend("  " + _block_line(name, keys, table) for name, keys in blocks(plan))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- image


_font_files: list[str] = []
"""TrueType fonts to draw with, in order of preference (:func:`use_font`), before the system's."""
_SYSTEM_FONTS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",  # Debian, Ubuntu
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",  # Fedora
    "/usr/share/fonts/TTF/DejaVuSans.ttf",  # Arch
    "C:/Windows/Fonts/segoeui.ttf",
    "C:/Windows/Fonts/arial.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "/Library/Fonts/Arial.ttf",
)
# the webui's own font when the CLI runs from the extension's folder (webui/extensions/<ext>/klora/viz.py)
_WEBUI_FONT = Path(__file__).resolve().parents[3] / "modules" / "Roboto-Regular.ttf"


def use_font(path: str) -> None:
    """Draw the maps with this TrueType font (the webui passes its own Roboto: the Pillow A1111 pins, 9.5,
    has no scalable default font, and its bitmap font is unreadable at gallery size)."""
    if path not in _font_files:
        _font_files.insert(0, path)
        _font.cache_clear()


@functools.lru_cache(maxsize=16)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """A TrueType font at ``size`` px: the one given to :func:`use_font`, the webui's, the system's; else
    Pillow's default at that size (Pillow ≥ 10.1); else Pillow's fixed bitmap font (last resort)."""
    for path in (*_font_files, str(_WEBUI_FONT), *_SYSTEM_FONTS):
        try:
            return ImageFont.truetype(path, size)
        except OSError:
            continue
    try:
        return ImageFont.load_default(size=size)  # type: ignore[call-arg]
    except TypeError:  # Pillow < 10.1 takes no size
        return ImageFont.load_default()


_FALLBACKS = {"τ": "tau", "γ": "gamma", "α": "alpha", "β": "beta", "→": "->", "–": "-", "·": "*", "≤": "<="}


def _drawable(text: str, font: Any) -> str:
    """``text`` with the symbols ``font`` has no glyph for spelled out. Pillow's bitmap font draws Latin-1
    only; a TrueType font's missing glyph draws as its box, the same mask as an unassigned code point."""
    if not isinstance(font, ImageFont.FreeTypeFont):
        for symbol, spelled in _FALLBACKS.items():
            text = text.replace(symbol, spelled)
        return text.encode("latin-1", "replace").decode("latin-1")
    missing = font.getmask("\uffff")
    for symbol, spelled in _FALLBACKS.items():
        if symbol in text:
            mask = font.getmask(symbol)
            if mask.size == missing.size and bytes(mask) == bytes(missing):
                text = text.replace(symbol, spelled)
    return text


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    left, _, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom


def _tick_step(steps: int, cell_w: int, min_gap: int = 34) -> int:
    for base in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000):
        if base * cell_w >= min_gap:
            return base
    return max(1, steps)


@dataclass(frozen=True)
class MapLayout:
    """Geometry of a selection map: where the cell of (layer, step) lies."""

    width: int
    height: int
    grid_x: int  # left edge of the step-0 column
    cell_w: int
    row_h: int
    row_y: dict[str, int]  # layer key → top edge of its row
    block_spans: list[tuple[str, int, int]]  # (block, top, bottom) of each block's rows
    grid_top: int
    grid_bottom: int

    def cell_box(self, key: str, step: int) -> tuple[int, int, int, int]:
        """``(left, top, right, bottom)`` of a cell, right/bottom exclusive."""
        x = self.grid_x + step * self.cell_w
        y = self.row_y[key]
        return x, y, x + self.cell_w, y + self.row_h

    def cell_center(self, key: str, step: int) -> tuple[int, int]:
        left, top, right, bottom = self.cell_box(key, step)
        return (left + right - 1) // 2, (top + bottom - 1) // 2


# sizes in px
_MARGIN = 14
_GRID_MIN_W = 640
_GRID_TARGET_H = 720
_BLOCK_GAP = 3
_SECTION_GAP = 9
_SHARE_H = 44


def _row_height(n_layers: int) -> int:
    return max(1, min(14, _GRID_TARGET_H // max(1, n_layers)))


def _cell_width(steps: int) -> int:
    return max(1, math.ceil(_GRID_MIN_W / steps))


def _wrap(draw: ImageDraw.ImageDraw, words: list[str], font: Any, width: int, sep: str = "   ") -> list[str]:
    lines: list[str] = []
    cur = ""
    for w in words:
        trial = w if not cur else cur + sep + w
        if cur and _text_size(draw, trial, font)[0] > width:
            lines.append(cur)
            cur = w
        else:
            cur = trial
    if cur:
        lines.append(cur)
    return lines


def render_selection_map(plan: Plan, steps: int, title: str | None = None) -> Image.Image:
    """Draw which delta each layer applies at each step (rows: layers in model order; columns: steps)."""
    image, _ = _render(plan, steps, title)
    assert image is not None
    return image


def map_layout(plan: Plan, steps: int, title: str | None = None) -> MapLayout:
    """The geometry :func:`render_selection_map` uses for the same arguments."""
    return _render(plan, steps, title, draw_it=False)[1]


def _render(plan: Plan, steps: int, title: str | None,
            draw_it: bool = True) -> tuple[Image.Image | None, MapLayout]:
    if steps < 1:
        raise ValueError("steps must be at least 1")
    if not plan.layers:
        raise ValueError("the plan has no layers")
    table = choice_table(plan, steps)
    groups = blocks(plan)
    p = plan_parameters(plan)

    # sizes for a map shown at about two thirds of its width (the panel, the gallery)
    title_font, font, small = _font(20), _font(15), _font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag", font)[1] + 4
    title_h = _text_size(probe, "Ag", title_font)[1] + 6

    cell_w, row_h = _cell_width(steps), _row_height(len(table))
    grid_w = steps * cell_w
    label_w = max(_text_size(probe, _drawable(name, font), font)[0] for name, _ in groups) + 18
    share_label = "content share"
    label_w = max(label_w, _text_size(probe, share_label, small)[0] + 10)
    grid_x = _MARGIN + label_w
    width = grid_x + grid_w + _text_size(probe, "100%", small)[0] + 6 + _MARGIN

    # header: title, parameters (wrapped), legend
    head = _drawable(title or "K-LoRA selection map", title_font)
    width = max(width, _text_size(probe, head, title_font)[0] + 2 * _MARGIN)
    params = [f"pattern {p['pattern']}", f"α {_fmt_float(p['alpha'])}", f"β {_fmt_float(p['beta'])}"]
    if p["mode"] == "klora":  # the only mode that uses γ (and the balance)
        params.append(f"γ {_fmt_float(p['gamma'])} ({p['gamma_method']})")
        if p["balance"]:
            params.append(f"balance {p['balance']:+g}")
    if p["k"] is not None:
        params.append(f"K {p['k']}")
    params += [f"mode {p['mode']}", f"scope {p['scope']}", f"te {p['te']}",
               f"{len(table)} layers × {steps} steps"]
    param_lines = _wrap(probe, [_drawable(s, font) for s in params], font, width - 2 * _MARGIN)
    present = {c for row in table.values() for c in row}
    legend = [c for c in ("C", "S", "B", "-") if c in ("C", "S") or c in present]
    y = _MARGIN
    title_y = y
    y += title_h
    params_y = y
    y += line_h * len(param_lines)
    legend_y = y + 2
    sw = line_h - 6  # legend swatch size
    legend_w = sum(sw + 5 + _text_size(probe, CHOICE_NAMES[c], font)[0] + 16 for c in legend)
    note = "rows: layers in model order   columns: sampling steps"
    note_xy = (_MARGIN + legend_w + 8, legend_y)
    if note_xy[0] + _text_size(probe, note, font)[0] > width - _MARGIN:
        note_xy = (_MARGIN, legend_y + line_h)
    y = note_xy[1] + line_h + 8

    # grid rows
    grid_top = y
    row_y: dict[str, int] = {}
    spans: list[tuple[str, int, int]] = []
    prev_section = None
    for name, keys in groups:
        section = keys[0].partition("/")[0]
        if prev_section is not None:
            y += _SECTION_GAP if section != prev_section else _BLOCK_GAP
        prev_section = section
        top = y
        for key in keys:
            row_y[key] = y
            y += row_h
        spans.append((name, top, y))
    grid_bottom = y

    share_top = grid_bottom + 8
    share_bottom = share_top + _SHARE_H
    ticks_y = share_bottom + 3
    height = ticks_y + 6 + line_h * 2 + _MARGIN
    layout = MapLayout(width, height, grid_x, cell_w, row_h, row_y, spans, grid_top, grid_bottom)
    if not draw_it:
        return None, layout
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    draw.text((_MARGIN, title_y), head, font=title_font, fill=INK)
    for j, text in enumerate(param_lines):
        draw.text((_MARGIN, params_y + j * line_h), text, font=font, fill=MUTED)
    x = _MARGIN
    for c in legend:
        draw.rectangle((x, legend_y + 2, x + sw, legend_y + 2 + sw), fill=COLORS[c], outline=INK)
        x += sw + 5
        draw.text((x, legend_y), CHOICE_NAMES[c], font=font, fill=INK)
        x += _text_size(draw, CHOICE_NAMES[c], font)[0] + 16
    draw.text(note_xy, note, font=font, fill=MUTED)

    # cells: draw runs of equal letters as one rectangle per row
    for key, row in table.items():
        top = row_y[key]
        start = 0
        for i in range(1, steps + 1):
            if i == steps or row[i] != row[start]:
                draw.rectangle(
                    (grid_x + start * cell_w, top, grid_x + i * cell_w - 1, top + row_h - 1),
                    fill=COLORS.get(row[start], COLORS["-"]),
                )
                start = i

    # block labels with a bracket; labels are pushed apart when blocks are thinner than the text
    text_h = _text_size(draw, "Ag", font)[1]
    wanted = [((top + bottom) // 2 - text_h // 2, name, top, bottom) for name, top, bottom in spans]
    placed: list[int] = []
    for ly, *_ in wanted:
        placed.append(max(ly, placed[-1] + text_h + 1) if placed else ly)
    overflow = placed[-1] + text_h - grid_bottom if placed else 0
    if overflow > 0:  # shift back up from the bottom, never above the grid's top
        for j in range(len(placed) - 1, -1, -1):
            limit = grid_bottom - text_h - (len(placed) - 1 - j) * (text_h + 1)
            placed[j] = max(grid_top, min(placed[j], limit))
    bx = grid_x - 5
    for (_, name, top, bottom), ly in zip(wanted, placed, strict=True):
        draw.line((bx, top, bx, bottom - 1), fill=MUTED)
        draw.line((bx, top, bx + 2, top), fill=MUTED)
        draw.line((bx, bottom - 1, bx + 2, bottom - 1), fill=MUTED)
        label = _drawable(name, font)
        tw = _text_size(draw, label, font)[0]
        tx = bx - 6 - tw
        draw.text((tx, ly), label, font=font, fill=INK)
        mid_label, mid_block = ly + text_h // 2 + 1, (top + bottom) // 2
        if abs(mid_label - mid_block) > 2:
            draw.line((bx - 5, mid_label, bx, mid_block), fill=RULE)

    # content share strip (layers decided per step), the same columns as the grid
    shares = plan.content_share(steps)
    draw.rectangle((grid_x - 1, share_top - 1, grid_x + grid_w, share_bottom), outline=RULE)
    for i, share in enumerate(shares):
        x0, x1 = grid_x + i * cell_w, grid_x + (i + 1) * cell_w - 1
        if share is None:
            draw.rectangle((x0, share_top, x1, share_bottom - 1), fill=COLORS["-"])
            continue
        split = share_bottom - round(share * _SHARE_H)
        if split > share_top:
            draw.rectangle((x0, share_top, x1, split - 1), fill=COLORS["S"])
        if split < share_bottom:
            draw.rectangle((x0, split, x1, share_bottom - 1), fill=COLORS["C"])
    for text, ty in (("100%", share_top), ("0%", share_bottom - _text_size(draw, "0%", small)[1])):
        draw.text((grid_x + grid_w + 4, ty), text, font=small, fill=MUTED)
    sl_w, sl_h = _text_size(draw, share_label, small)
    draw.text((grid_x - 8 - sl_w, share_top + (_SHARE_H - sl_h) // 2), share_label, font=small, fill=MUTED)

    # step ticks: every few steps, and the last step (a regular tick too close to it gives way)
    every = _tick_step(steps, cell_w)
    ticks = list(range(0, steps, every))
    if ticks[-1] != steps - 1:
        crowded = (steps - 1 - ticks[-1]) * cell_w < _text_size(draw, str(steps - 1), small)[0] + 8
        if crowded and len(ticks) > 1:
            ticks.pop()
        ticks.append(steps - 1)
    for i in ticks:
        cx = grid_x + i * cell_w + cell_w // 2
        draw.line((cx, ticks_y, cx, ticks_y + 3), fill=INK)
        label = str(i)
        tw = _text_size(draw, label, small)[0]
        draw.text((min(max(cx - tw // 2, grid_x), width - _MARGIN - tw), ticks_y + 5), label, font=small,
                  fill=INK)
    axis = _drawable(f"sampling step i  (progress τ = i/{steps})", font)
    aw = _text_size(draw, axis, font)[0]
    draw.text((grid_x + (grid_w - aw) // 2, ticks_y + 6 + line_h), axis, font=font, fill=MUTED)
    return image, layout
