"""The user documentation names what the code offers: every tag key, CLI flag and XYZ axis of the options
table, the API's positional order, and the README's test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from klora.options import OPTIONS
from klora.webui.args import ARG_NAMES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
REFERENCE = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")


def test_every_tag_key_is_in_the_readme_and_the_reference_table() -> None:
    table = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", REFERENCE, flags=re.M))
    documented = {key for row in table for key in row if key}
    for opt in OPTIONS:
        if opt.tag:
            assert f"`{opt.tag}`" in README, opt.tag
            assert opt.tag in documented, opt.tag


def test_every_cli_flag_is_in_the_synopsis() -> None:
    synopsis = REFERENCE[REFERENCE.index("python -m klora inspect CONTENT"):]
    synopsis = synopsis[: synopsis.index("```")]
    for flag in [o.cli for o in OPTIONS if o.cli] + ["--steps", "--seed", "--threads", "--json", "--png",
                                                      "--title"]:
        assert flag in synopsis, flag


def test_every_xyz_axis_and_the_positional_order_are_documented() -> None:
    for opt in OPTIONS:
        if opt.xyz:
            assert opt.xyz in REFERENCE, opt.xyz
    assert ", ".join(ARG_NAMES) in " ".join(REFERENCE.split())


def test_readme_gives_the_command_ci_runs() -> None:
    command = 'pip install -e ".[test]" && ruff check . && python -m pytest -q'
    assert command in README
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_relative_links_point_to_files() -> None:
    for doc in (ROOT / "README.md", *(ROOT / "docs").glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)|src=\"([^\"]+)\"", text):
            path = next(t for t in target if t)
            assert (doc.parent / path).exists(), f"{doc.name}: {path}"
