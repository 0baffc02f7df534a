"""``python -m klora inspect``: JSON, summary, PNG and one-line errors with exit status 2."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open
from synth import te_layer_shapes, tiny_unet_shapes, write_kohya
from test_viz import CONTENT_ONLY, STYLE_ONLY, write_pair

from klora import viz
from klora.cli import main
from klora.formats import read_lora
from klora.fusion import make_plan
from klora.options import FusionOptions

ROOT = Path(__file__).resolve().parents[1]
LETTER = {"content": "C", "style": "S", "both": "B", "none": "-"}
TOP_KEYS = {"gamma", "steps", "pattern", "alpha", "beta", "layers"}
LAYER_KEYS = {"k", "score_content", "score_style", "threshold", "choices"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    c, s = write_pair(tmp_path_factory.mktemp("cli"))
    return str(c), str(s)


def _plan(pair: tuple[str, str], **options):
    content, style = read_lora(pair[0]), read_lora(pair[1])
    return content, style, make_plan(content, style, FusionOptions(**options))


def _run_json(pair, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "plan.json"
    assert main(["inspect", *pair, "--json", str(out), *extra]) == 0
    return json.loads(out.read_text(encoding="utf-8"))


def _raw_names(path: str) -> set[str]:
    with safe_open(path, framework="pt") as f:
        return set(f.keys())


def test_json_matches_the_plan(pair, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    steps = 16
    doc = _run_json(pair, tmp_path, "--steps", str(steps))
    assert set(doc) >= TOP_KEYS
    content, style, plan = _plan(pair)
    assert (doc["steps"], doc["pattern"], doc["alpha"], doc["beta"]) == (steps, "s", 1.5, 0.5)
    assert doc["gamma"] == pytest.approx(plan.gamma, rel=1e-12) and doc["gamma_method"] == "auto"
    assert len(doc["layers"]) == len(set(content.layers) | set(style.layers))

    content_names, style_names = _raw_names(pair[0]), _raw_names(pair[1])
    flips = 0
    for name, entry in doc["layers"].items():
        assert set(entry) >= LAYER_KEYS
        key = entry["key"]
        # the name is spelled as in the file that has the layer: the content file unless only the style has it
        if key in content.layers:
            assert f"{name}.lora_down.weight" in content_names
        else:
            assert entry["source"] == "style" and key in STYLE_ONLY
            assert f"{name}.lora_A.weight" in style_names
        want = "".join(LETTER[plan.choose(key, i / steps)] for i in range(steps))
        assert entry["choices"] == want
        flips += want.count("CS")
        lp = plan.layers[key]
        assert entry["source"] == lp.source
        if key in CONTENT_ONLY | STYLE_ONLY or key.startswith("te"):
            assert entry["k"] is None and entry["threshold"] is None
            assert (entry["score_content"], entry["score_style"]) == (None, None)
        else:
            assert entry["k"] == lp.k and isinstance(entry["k"], int)
            assert entry["score_content"] == pytest.approx(lp.score_content, rel=1e-12)
            assert entry["score_style"] == pytest.approx(lp.score_style, rel=1e-12)
            assert entry["threshold"] == pytest.approx(lp.score_content / (plan.gamma * lp.score_style))
    assert flips > 0, "the pair must make some layer flip"
    assert [e["key"] for e in doc["layers"].values()] == viz.ordered_keys(plan)

    out = capsys.readouterr()
    assert viz.summarize(plan, steps) in out.out and out.err == ""


def test_pattern_s_star_implies_its_beta(pair, tmp_path: Path) -> None:
    doc = _run_json(pair, tmp_path, "--pattern", "s*", "--steps", "20")
    assert (doc["pattern"], doc["alpha"], doc["beta"]) == ("s*", 1.5, 1.275)
    _, _, plan = _plan(pair, pattern="s*")
    rows = {e["key"]: e["choices"] for e in doc["layers"].values()}
    assert rows == {k: "".join(LETTER[plan.choose(k, i / 20)] for i in range(20)) for k in plan.layers}
    plain = _run_json(pair, tmp_path, "--steps", "20")
    assert rows != {e["key"]: e["choices"] for e in plain["layers"].values()}

    given = _run_json(pair, tmp_path, "--pattern", "s*", "--beta", "1.0", "--alpha", "2")
    assert (given["alpha"], given["beta"]) == (2.0, 1.0)


def test_options_reach_the_plan(pair, tmp_path: Path) -> None:
    args = ["--gamma", "0.8", "--mode", "topk", "--scope", "attention", "--te", "style",
            "--content-strength", "0.7", "--style-strength", "1.3", "--steps", "5"]
    doc = _run_json(pair, tmp_path, *args)
    _, _, plan = _plan(pair, gamma=0.8, mode="topk", scope="attention", te="style", content_strength=0.7,
                       style_strength=1.3)
    assert doc["gamma"] == 0.8 and doc["gamma_method"] == "manual" and doc["mode"] == "topk"
    rows = {e["key"]: e["choices"] for e in doc["layers"].values()}
    assert rows == {k: "".join(LETTER[plan.choose(k, i / 5)] for i in range(5)) for k in plan.layers}
    assert {r for k, r in rows.items() if k.startswith("te1/")} == {"SSSSS"}
    assert any(set(r) == {"B"} for r in rows.values())  # shared layers outside the attention scope


def test_json_to_stdout_keeps_the_summary_on_stderr(pair, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", *pair, "--steps", "6", "--json", "-"]) == 0
    out = capsys.readouterr()
    doc = json.loads(out.out)
    assert doc["steps"] == 6 and all(len(e["choices"]) == 6 for e in doc["layers"].values())
    assert "shared" in out.err and "flips by block" in out.err


def test_png_cells_match_the_json(pair, tmp_path: Path) -> None:
    steps = 18
    png = tmp_path / "map.png"
    doc = _run_json(pair, tmp_path, "--steps", str(steps), "--png", str(png), "--pattern", "s*")
    image = Image.open(png)
    assert image.format == "PNG"
    _, _, plan = _plan(pair, pattern="s*")
    layout = viz.map_layout(plan, steps)
    assert image.size == (layout.width, layout.height)
    assert image.width >= 600 and layout.cell_w * steps >= 600
    assert image.height > len(doc["layers"]) * layout.row_h
    rgb = image.convert("RGB").load()
    letters = set()
    for entry in doc["layers"].values():
        for i, letter in enumerate(entry["choices"]):
            assert rgb[layout.cell_center(entry["key"], i)] == viz.COLORS[letter]
            letters.add(letter)
    assert {"C", "S", "B"} <= letters


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--json" in text and "style file spells it" in text and "null" in text


# -------------------------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def bad(pair, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.safetensors").write_bytes(b"\x00\x01 not a safetensors file at all")
    (d / "truncated.safetensors").write_bytes(Path(pair[0]).read_bytes()[:3000])
    (d / "lora.pt").write_bytes(pickle.dumps({"a": 1}))
    te = te_layer_shapes("te1", hidden=32, layers=2, intermediate=64)
    unet = tiny_unet_shapes()
    up = {k: v for k, v in unet.items() if k.startswith("unet/up_blocks")}
    down = {k: v for k, v in unet.items() if k.startswith("unet/down_blocks")}
    return {
        "garbage": str(d / "garbage.safetensors"),
        "truncated": str(d / "truncated.safetensors"),
        "pickle": str(d / "lora.pt"),
        "up": str(write_kohya(d / "up.safetensors", up, seed=3)),
        "down_te": str(write_kohya(d / "down_te.safetensors", {**down, **te}, seed=4)),
        "up_te": str(write_kohya(d / "up_te.safetensors", {**up, **te}, seed=5)),
        "te_wide": str(write_kohya(d / "te_wide.safetensors",
                                   {**down, **te_layer_shapes("te1", 48, 2, 64)}, seed=6)),
    }


BAD = [
    ("missing file", lambda c, s, b: [c, s + ".missing"], "not found"),
    ("directory", lambda c, s, b: [str(Path(c).parent), s], "not a file"),
    ("not safetensors", lambda c, s, b: [b["garbage"], s], "corrupt"),
    ("truncated", lambda c, s, b: [c, b["truncated"]], "truncated"),
    ("pickle", lambda c, s, b: [b["pickle"], s], "pickled"),
    ("no shared layer", lambda c, s, b: [b["down_te"], b["up"]], "no layer in common"),
    ("only te shared", lambda c, s, b: [b["down_te"], b["up_te"]], "no UNet layer in common"),
    ("shape mismatch", lambda c, s, b: [b["down_te"], b["te_wide"]], "shape"),
    ("steps 0", lambda c, s, b: [c, s, "--steps", "0"], "steps"),
    ("steps negative", lambda c, s, b: [c, s, "--steps", "-4"], "steps"),
    ("steps fraction", lambda c, s, b: [c, s, "--steps", "2.5"], "steps"),
    ("steps huge", lambda c, s, b: [c, s, "--steps", "100000"], "steps"),
    ("alpha nan", lambda c, s, b: [c, s, "--alpha", "nan"], "alpha"),
    ("alpha inf", lambda c, s, b: [c, s, "--alpha", "inf"], "alpha"),
    ("beta word", lambda c, s, b: [c, s, "--beta", "high"], "beta"),
    ("s* alpha 0", lambda c, s, b: [c, s, "--pattern", "s*", "--alpha", "0"], "alpha"),
    ("gamma 0", lambda c, s, b: [c, s, "--gamma", "0"], "gamma"),
    ("gamma negative", lambda c, s, b: [c, s, "--gamma", "-1"], "gamma"),
    ("gamma word", lambda c, s, b: [c, s, "--gamma", "big"], "gamma"),
    ("gamma nan", lambda c, s, b: [c, s, "--gamma", "nan"], "gamma"),
    ("unknown pattern", lambda c, s, b: [c, s, "--pattern", "z"], "pattern"),
    ("unknown mode", lambda c, s, b: [c, s, "--mode", "mix"], "mode"),
    ("strength nan", lambda c, s, b: [c, s, "--content-strength", "nan"], "strength"),
    ("seed word", lambda c, s, b: [c, s, "--seed", "x"], "seed"),
    ("png in missing dir", lambda c, s, b: [c, s, "--png", str(Path(c).parent / "no" / "m.png")],
     "cannot write"),
    ("json in missing dir", lambda c, s, b: [c, s, "--json", str(Path(c).parent / "no" / "p.json")],
     "cannot write"),
    ("one file only", lambda c, s, b: [c], "STYLE"),
    # the webui's limits: a plan inspected here can be reproduced with the tag
    ("beta negative", lambda c, s, b: [c, s, "--beta", "-3"], "beta"),
    ("alpha negative", lambda c, s, b: [c, s, "--alpha", "-0.5"], "alpha"),
    ("balance too large", lambda c, s, b: [c, s, "--balance", "1.5"], "balance"),
    ("k fraction", lambda c, s, b: [c, s, "--k", "2.5"], "whole number"),
    ("k negative", lambda c, s, b: [c, s, "--k", "-4"], "k"),
    ("threads zero", lambda c, s, b: [c, s, "--threads", "0"], "threads"),
    ("png is a folder", lambda c, s, b: [c, s, "--png", str(Path(c).parent)], "is a folder"),
]


@pytest.mark.parametrize(("make_args", "fragment"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_status_2(pair, bad, capsys, make_args, fragment: str) -> None:
    status = main(["inspect", *make_args(*pair, bad)])
    out = capsys.readouterr()
    assert status == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.err, out.err
    assert fragment.lower() in lines[0].lower()
    assert "error" in lines[0]


def test_unknown_command_is_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["paint"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main([]) == 2


# ------------------------------------------------------------------------------------------ subprocess


def test_python_dash_m_klora_inspect(pair) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("KLORA_DEBUG", None)
    ok = subprocess.run([sys.executable, "-m", "klora", "inspect", *pair, "--steps", "8", "--json", "-"],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["steps"] == 8 and {len(e["choices"]) for e in doc["layers"].values()} == {8}
    assert "flips by block" in ok.stderr

    bad = subprocess.run([sys.executable, "-m", "klora", "inspect", pair[0], pair[1] + ".nope"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


def test_summary_on_a_cp1252_console(pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Windows console or redirect without UTF-8: arrows and dashes fall back to ASCII, no crash."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252")
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(["inspect", *pair, "--steps", "12"]) == 0
    stream.flush()
    text = raw.getvalue().decode("cp1252")
    assert "flips by block" in text and "C->S at step" in text and "→" not in text


def test_bad_output_path_is_refused_before_any_file_is_read(pair, tmp_path: Path, capsys) -> None:
    """The output folder is checked first: a typo costs nothing, even with input that would fail later."""
    missing = str(tmp_path / "nowhere" / "map.png")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    assert main(["inspect", pair[0], str(garbage), "--png", missing]) == 2
    err = capsys.readouterr().err
    assert "cannot write" in err and "corrupt" not in err  # the style file was never read


def test_unquoted_s_star_gets_a_hint(pair, tmp_path: Path, monkeypatch, capsys) -> None:
    """An unquoted s* is replaced by the shell with the names of files starting with 's'."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "style.safetensors").write_bytes(b"")
    (tmp_path / "setup.txt").write_text("")
    assert main(["inspect", *pair, "--pattern", "setup.txt", "style.safetensors"]) == 2
    assert "quote it, --pattern 's*'" in capsys.readouterr().err


def test_same_file_warns_and_still_inspects(pair, capsys) -> None:
    assert main(["inspect", pair[0], pair[0]]) == 0
    captured = capsys.readouterr()
    assert "warning" in captured.err and "same file" in captured.err and "K-LoRA plan" in captured.out


def test_k_balance_and_threads_reach_the_plan(pair, tmp_path: Path) -> None:
    import torch

    threads = torch.get_num_threads()
    try:
        doc = _run_json(pair, tmp_path, "--k", "3", "--balance", "0.5", "--threads", "1")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    *_, plan = _plan(pair, k=3, balance=0.5)
    scored = [v for v in doc["layers"].values() if v["k"] is not None]
    assert scored and all(v["k"] == 3 for v in scored)
    assert {v["key"]: v["choices"] for v in doc["layers"].values()} == \
        {key: plan.choices(key, doc["steps"]) for key in plan.layers}



def test_through_a_real_shell(pair, tmp_path: Path) -> None:
    """Run the way a user does, by a shell: an unquoted s* expanded by it gets the hint, a quoted one works,
    --threads and the same-file warning reach the terminal."""
    (tmp_path / "style.safetensors").write_bytes(b"")
    (tmp_path / "sky.png").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("KLORA_DEBUG", None)
    command = f"{sys.executable} -m klora inspect {pair[0]} {pair[1]} --threads 1 --steps 6 --pattern"
    unquoted = subprocess.run(f"{command} s*", shell=True, capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=300)
    assert unquoted.returncode == 2 and "quote it, --pattern 's*'" in unquoted.stderr
    quoted = subprocess.run(f"{command} 's*'", shell=True, capture_output=True, text=True, env=env,
                            cwd=tmp_path, timeout=300)
    assert quoted.returncode == 0, quoted.stderr
    assert "pattern s*" in quoted.stdout
    same = subprocess.run(f"{sys.executable} -m klora inspect {pair[0]} {pair[0]} --steps 4", shell=True,
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert same.returncode == 0 and "same file" in same.stderr


def test_a_second_run_reads_the_scores_from_the_disk_cache(pair, tmp_path: Path, monkeypatch) -> None:
    """The first run writes one table per file and the files' sha256 into $KLORA_CACHE_DIR; a second process
    reads them instead of hashing the files and forming the products (a fresh subprocess: nothing in memory)
    and prints the same plan; --no-cache neither reads nor writes."""
    cache = tmp_path / "cache"
    then = time.time_ns() - 60 * 10**9  # files saved a minute ago (a file just written is hashed every time)
    for path in pair:
        os.utime(path, ns=(then, then))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "KLORA_CACHE_DIR": str(cache)}
    env.pop("KLORA_DEBUG", None)

    def run(*extra: str) -> str:
        done = subprocess.run([sys.executable, "-m", "klora", "inspect", *pair, "--json", "-", *extra],
                              capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = run()
    entries = sorted(cache.glob("*.safetensors"))
    assert len(entries) == 2 and (cache / "files.json").is_file()
    stamps = [e.stat().st_mtime_ns for e in entries]
    probe = ("import sys, runpy; import klora.scores as s, klora.formats.container as c; "
             "s.layer_stats = lambda *a, **k: sys.exit('a product was formed'); "
             "c.sha256 = lambda *a, **k: sys.exit('a file was hashed'); "
             f"sys.argv = ['klora', 'inspect', {pair[0]!r}, {pair[1]!r}, '--json', '-']; "
             "runpy.run_module('klora', run_name='__main__')")
    second = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env,
                            timeout=300)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout) == json.loads(first)
    assert [e.stat().st_mtime_ns for e in entries] >= stamps
    for entry in entries:
        entry.unlink()
    assert json.loads(run("--no-cache")) == json.loads(first) and not list(cache.glob("*.safetensors"))


def test_unknown_device_is_one_line(pair, capsys) -> None:
    assert main(["inspect", *pair, "--device", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "cannot use device 'nonsense'" in err and len(err.strip().splitlines()) == 1
