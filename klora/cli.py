"""``python -m klora inspect CONTENT STYLE``: show how K-LoRA would fuse two LoRA files.

Every failure (missing or unreadable file, a pair with no shared layers, a bad number) ends with exit
status 2 and one line on stderr; set ``KLORA_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import IO, TYPE_CHECKING, Any, NoReturn

from klora import options

if TYPE_CHECKING:
    from klora.fusion import Plan
    from klora.layers import LoraFile

PROG = "python -m klora"
MAX_STEPS = 1000

JSON_HELP = """\
--json writes one object with "gamma", "gamma_method", "steps", "pattern", "alpha", "beta", "mode", "scope",
"te", "content_strength", "style_strength", "balance", "k" (null: r_c*r_s per layer), "seed", "content",
"style" and "layers". "layers" maps each layer, in model order, to {"k", "score_content", "score_style",
"threshold", "choices", "source", "key"}. The layer's name is its key exactly as the content file spells it
(without the ".lora_down.weight"-style suffix); a layer only the style file has is named as
the style file spells it. "source" is "shared", "content" (only the content file has the layer) or "style"
(only the style file has it); "key" is the canonical layer key. "k", "score_content" and "score_style"
are null for layers that are not scored (a layer only one file has, text-encoder layers, layers outside
--scope); "threshold"
(mode klora: content while S(tau) < threshold; mode topk: content if above 1) is null where it is not
defined or not finite. "choices" has one letter per step i = 0 .. N-1 at progress tau = i/N: C content,
S style, B both deltas, - neither. With "--json -" the JSON goes to stdout and the summary to stderr.

Exit status: 0 on success, 2 on any error (one line on stderr).
"""


class CliError(Exception):
    """A failure to report as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line (usage stays available through --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _option_type(name: str):
    """argparse type of an option: :func:`klora.options.parse`, so the CLI accepts and refuses exactly what
    the webui's tag and API do."""

    def convert(text: str) -> Any:
        try:
            values = options.parse(name, text)
        except options.OptionError as e:
            message = str(e).removeprefix("K-LoRA argument ")
            if name == "pattern" and text.startswith("s") and os.path.exists(text):
                message += ("; the shell replaced an unquoted s* by the names of files starting with 's': "
                            "quote it, --pattern 's*'")
            raise argparse.ArgumentTypeError(message) from None
        if name == "gamma" and values["gamma"] == "manual":  # the CLI takes the number itself
            if "gamma_value" not in values:
                raise argparse.ArgumentTypeError(f"gamma must be auto, paper or a number > 0, got {text!r}")
            return values["gamma_value"]
        return values[name]

    convert.__name__ = name  # argparse names the option's type in its messages
    return convert


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be a whole number, got {text!r}") from None
    if not 1 <= value <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"steps must be between 1 and {MAX_STEPS}, got {value}")
    return value


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"threads must be a whole number of at least 1, got {text!r}")
    return value


def _int(kind: str):
    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind} must be a whole number, got {text!r}") from None

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="K-LoRA tools: fuse a content LoRA and a style LoRA.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    p = sub.add_parser(
        "inspect",
        help="show which LoRA each layer applies at each step",
        description="Score a content and a style LoRA (.safetensors) with the K-LoRA rule and show, for an "
        "N-step run, which one each layer applies at each step. Prints a summary; optionally writes JSON "
        "and a PNG selection map.",
        epilog=JSON_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("content", metavar="CONTENT", help="content (subject) LoRA, .safetensors")
    p.add_argument("style", metavar="STYLE", help="style LoRA, .safetensors")
    p.add_argument("--steps", type=_steps, default=30, metavar="N", help="sampling steps (default 30)")
    for opt in options.engine_options():
        metavar = {"gamma": "auto|paper|VALUE"}.get(opt.name, "|".join(opt.choices) if opt.choices else "X")
        shown = f"; default {opt.default}" if opt.default is not None else ""
        p.add_argument(opt.cli, dest=opt.name, type=_option_type(opt.name), default=opt.default,
                       metavar=metavar, help=opt.help + shown)
    p.add_argument("--seed", type=_int("seed"), default=0, help="seed of mode random (default 0)")
    p.add_argument("--threads", type=_threads, default=0, metavar="N",
                   help="CPU threads for scoring (default: torch's); on a busy machine 1 is often fastest")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the products are formed: cpu (default), cuda, cuda:1, mps…")
    p.add_argument("--no-cache", action="store_true",
                   help="neither read nor write the score tables kept on disk ($KLORA_CACHE_DIR, else klora/ "
                   "in the user's cache folder) so that a second run does not score the same files again")
    p.add_argument("--json", metavar="PATH|-", default=None, help="write the plan as JSON ('-': stdout)")
    p.add_argument("--png", metavar="PATH", default=None, help="write the selection map as PNG")
    p.add_argument("--title", default=None, help="title line of the PNG (default: the two file names)")
    return parser


def _check_path(path: str, role: str) -> None:
    if not os.path.exists(path):
        raise CliError(f"{role} LoRA not found: {path}")
    if not os.path.isfile(path):
        raise CliError(f"{role} LoRA is not a file: {path}")


def _check_pair(content: LoraFile, style: LoraFile) -> None:
    """Refuse pairs that cannot be fused: nothing shared, or shared layers whose deltas do not fit each other
    (:func:`klora.layers.layout`: a 1×1 conv stored flat by one file and 4-D by the other is one layer)."""
    shared = [key for key in content.layers if key in style.layers]
    hint = "(LoRAs for different base models?)"
    if not shared:
        raise CliError(f"{content.name} and {style.name} have no layer in common {hint}")
    if not any(k.startswith("unet/") for k in shared) and any(k.startswith("unet/") for k in content.layers) \
            and any(k.startswith("unet/") for k in style.layers):
        raise CliError(f"{content.name} and {style.name} have no UNet layer in common {hint}")
    for key in shared:
        a, b = content.layers[key], style.layers[key]
        if a.layout != b.layout:
            raise CliError(f"{a.file_key} has shape {tuple(a.shape)} in {content.name} but {tuple(b.shape)} "
                           f"in {style.name} {hint}")


def _num(x: Any) -> float | None:
    """A JSON-safe float: None for a missing or non-finite value."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def plan_json(plan: Plan, content: LoraFile, style: LoraFile, steps: int) -> dict[str, Any]:
    """The ``--json`` document (see ``JSON_HELP``)."""
    from klora.viz import ordered_keys, plan_parameters

    p = plan_parameters(plan)
    layers: dict[str, Any] = {}
    for key in ordered_keys(plan):
        lp = plan.layers[key]
        owner = style if lp.source == "style" else content
        name = owner.layers[key].file_key if key in owner.layers else key
        if name in layers:  # two schemes spelling different layers alike: keep both, canonically
            name = key
        layers[name] = {
            "k": None if lp.k is None else int(lp.k),
            "score_content": _num(lp.score_content),
            "score_style": _num(lp.score_style),
            "threshold": _num(lp.threshold),
            "choices": plan.choices(key, steps),
            "source": lp.source,
            "key": key,
        }
    return {
        "gamma": _num(p["gamma"]),
        "gamma_method": p["gamma_method"],
        "steps": steps,
        "pattern": p["pattern"],
        "alpha": _num(p["alpha"]),
        "beta": _num(p["beta"]),
        "mode": p["mode"],
        "scope": p["scope"],
        "te": p["te"],
        "content_strength": p["content_strength"],
        "style_strength": p["style_strength"],
        "balance": p["balance"],
        "k": p["k"],
        "seed": p["seed"],
        "content": content.path,
        "style": style.path,
        "layers": layers,
    }


def _write_text(stream: IO[str], text: str) -> None:
    """Write, falling back to ASCII where the stream's encoding lacks a character (e.g. cp1252)."""
    try:
        stream.write(text)
    except UnicodeEncodeError:
        ascii_text = text.replace("→", "->").replace("–", "-").replace("·", "*")
        stream.write(ascii_text.encode("ascii", "replace").decode("ascii"))
    stream.flush()


def _check_output(path: str | None) -> None:
    """Refuse an output path that cannot be written before any scoring (a folder, a missing folder)."""
    if path is None or path == "-":
        return
    if os.path.isdir(path):
        raise CliError(f"cannot write {path}: it is a folder")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CliError(f"cannot write {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"cannot write {path}: the folder {folder} is not writable")


def inspect(args: argparse.Namespace) -> int:
    _check_path(args.content, "content")
    _check_path(args.style, "style")
    _check_output(args.json)
    _check_output(args.png)
    # torch is imported from here on (a second or more): bad paths and options are reported before that
    import torch

    from klora.formats import read_lora
    from klora.fusion import make_plan
    from klora.options import FusionOptions
    from klora.viz import render_selection_map, summarize

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:  # an unknown name, or a device this torch cannot use
        raise CliError(f"cannot use device {args.device!r}: {_one_line(e)}") from None
    from klora import scores

    if not args.no_cache:
        from klora.diskcache import default_cache_dir

        scores.set_disk_cache(default_cache_dir())
    content = read_lora(args.content, scores.known_files())
    style = read_lora(args.style, scores.known_files())
    fusion_options = FusionOptions(**{o.name: getattr(args, o.name) for o in options.engine_options()},
                                   seed=args.seed)
    _check_pair(content, style)
    if content.sha256 == style.sha256:
        _write_text(sys.stderr, f"{PROG} inspect: warning: {args.content} and {args.style} are the same "
                                "file, so every layer gets that LoRA whichever side is chosen\n")
    plan = make_plan(content, style, fusion_options, device)

    out = sys.stderr if args.json == "-" else sys.stdout
    notes = []
    if args.json is not None:
        doc = json.dumps(plan_json(plan, content, style, args.steps), indent=1, allow_nan=False)
        if args.json == "-":
            _write_text(sys.stdout, doc + "\n")
        else:
            _save(args.json, lambda path: _write_file(path, doc + "\n"))
            notes.append(f"wrote {args.json}")
    if args.png is not None:
        title = args.title
        if title is None:
            title = f"K-LoRA selection map: {content.name} + {style.name}"
        image = render_selection_map(plan, args.steps, title=title)
        _save(args.png, lambda path: image.save(path, format="PNG"))
        notes.append(f"wrote {args.png} ({image.width}x{image.height})")
    header = f"K-LoRA plan: content {content.name}, style {style.name}, {args.steps} steps"
    _write_text(out, "\n".join([header, summarize(plan, args.steps), *notes]) + "\n")
    return 0


def _write_file(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def _save(path: str, write) -> None:
    try:
        write(path)
    except OSError as e:
        raise CliError(f"cannot write {path}: {e.strerror or e}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m klora``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2, already reported in one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "inspect":
            return inspect(args)
        raise CliError(f"unknown command {args.command}")
    except KeyboardInterrupt:
        _write_text(sys.stderr, f"{PROG} {args.command}: interrupted\n")
        return 130
    except Exception as e:
        if os.environ.get("KLORA_DEBUG"):
            raise
        if isinstance(e, (CliError, OSError, ValueError)):  # LoraFormatError is a ValueError
            message = _one_line(e)
        else:
            message = f"{type(e).__name__}: {_one_line(e)}"
        _write_text(sys.stderr, f"{PROG} {args.command}: error: {message}\n")
        return 2
