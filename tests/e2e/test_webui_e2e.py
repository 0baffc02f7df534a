"""End-to-end: K-LoRA inside a running AUTOMATIC1111 webui, driven over its HTTP API.

Skipped unless ``KLORA_WEBUI_URL`` is set (see webui_client.py for the other variables). Each generation is a
4-step 64×64 image with a fixed seed and a deterministic sampler, so "the same settings" must give the same
pixels and "K-LoRA on" must change them.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
from webui_client import (
    CONTENT,
    CONTENT_PEFT,
    STYLE,
    STYLE_PEFT,
    Generation,
    Webui,
    encode,
    infotext_fields,
    mean_abs_diff,
)

from klora.options import PATTERNS
from klora.webui import infotext
from klora.webui.args import ARG_NAMES

pytestmark = pytest.mark.skipif(not os.environ.get("KLORA_WEBUI_URL"), reason="KLORA_WEBUI_URL is not set")

MISSING = "klora_e2e_no_such_lora"


def items(value: str | None) -> dict[str, str]:
    """``content: a, style: b, …`` → {"content": "a", …} (values unquoted)."""
    assert value, "no K-LoRA infotext field"
    out = {}
    for key, raw in re.findall(r'\s*(\w+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', value):
        raw = raw.strip()
        out[key] = json.loads(raw) if raw.startswith('"') else raw
    return out


def assert_klora_field(gen: Generation, **expected: str) -> dict[str, str]:
    """The K-LoRA field is there, names the pair, and states every parameter (γ with the value used)."""
    assert gen.klora, f"no K-LoRA field in the infotext: {gen.infotext!r}"
    got = items(gen.klora)
    for key in ("content", "style", "cw", "sw", "pattern", "alpha", "beta", "gamma", "mode", "scope", "te"):
        assert key in got, f"K-LoRA field lacks {key!r}: {gen.klora!r}"
    expected = {"content": CONTENT, "style": STYLE, **expected}
    for key, value in expected.items():
        assert got.get(key) == value, f"K-LoRA field {key!r}: {got.get(key)!r} ≠ {value!r} in {gen.klora!r}"
    if got["mode"] == "klora" and got["gamma"].split()[0] in ("auto", "paper"):  # the modes that use γ
        assert re.fullmatch(r"(auto|paper) \d[\d.e+-]*", got["gamma"]), f"no γ value: {got['gamma']!r}"
    return got


def assert_differs(a: Generation, b: Generation, what: str) -> None:
    diff = mean_abs_diff(a.image, b.image)
    assert diff > 0.5, f"{what}: images do not differ (mean |Δ| = {diff:.3f} of 255)"


def assert_same(a: Generation, b: Generation, what: str) -> None:
    diff = mean_abs_diff(a.image, b.image)
    assert diff == 0, f"{what}: images differ (mean |Δ| = {diff:.3f} of 255)"


def assert_no_klora(gen: Generation) -> None:
    assert "K-LoRA" not in gen.fields, f"unexpected K-LoRA field: {gen.infotext!r}"


# --------------------------------------------------------------------------------------------------------
# registration


def test_script_info_lists_every_argument(webui: Webui, baseline: Generation) -> None:
    # 1.6 validates every choice as a string; the builtin scripts' radios (and K-LoRA's) give (label, value)
    _needs_webui(baseline, (1, 7), "/sdapi/v1/script-info answers HTTP 500 on A1111 1.6 (radio choices)")
    infos = [s for s in webui.get("/sdapi/v1/script-info") if s["name"] == "k-lora"]
    assert {s["is_img2img"] for s in infos} == {False, True}, infos
    for info in infos:
        assert info["is_alwayson"]
        assert len(info["args"]) == len(ARG_NAMES), [a["label"] for a in info["args"]]
        by_label = {a["label"]: a for a in info["args"]}
        lora_choices = [a for a in info["args"] if a.get("choices") and CONTENT in a["choices"]]
        assert len(lora_choices) == 2, f"content and style dropdowns should list {CONTENT}: {by_label}"
        assert all(STYLE in a["choices"] for a in lora_choices)


# --------------------------------------------------------------------------------------------------------
# txt2img: off, panel (list and dict), no leaks


def test_without_klora_no_field(baseline: Generation) -> None:
    assert_no_klora(baseline)
    assert baseline.image.size == (64, 64)


def test_disabled_panel_changes_nothing(webui: Webui, baseline: Generation) -> None:
    gen = webui.generate(klora=[False, CONTENT, STYLE])
    assert_no_klora(gen)
    assert_same(gen, baseline, "panel disabled vs no script args")


def test_panel_list_args_apply_klora(panel: Generation, baseline: Generation) -> None:
    assert_differs(panel, baseline, "K-LoRA (list args) vs without")
    got = assert_klora_field(panel, pattern="s", alpha="1.5", beta="0.5", mode="klora", scope="all",
                             te="both")
    assert got["gamma"].startswith("auto "), got
    assert "source" not in got, got
    assert "K-LoRA hashes" in panel.fields, panel.infotext


def test_dict_args_equal_list_args(webui: Webui, panel: Generation) -> None:
    gen = webui.generate(klora=[{"content": CONTENT, "style": STYLE}])
    assert_same(gen, panel, "dict args vs the same settings as a list")
    assert gen.klora == panel.klora


def test_dict_args_options_reach_the_infotext(webui: Webui, baseline: Generation) -> None:
    gen = webui.generate(klora=[{"content_lora": CONTENT, "style_lora": STYLE, "pattern": "s*", "gamma": 2,
                                 "scope": "attention", "sw": 0.8}])
    assert_differs(gen, baseline, "K-LoRA (dict args) vs without")
    assert_klora_field(gen, pattern="s*", alpha="1.5", beta="1.275", gamma="2", scope="attention", sw="0.8")


def test_same_request_twice_gives_the_same_image(webui: Webui, panel: Generation) -> None:
    again = webui.generate(klora=[True, CONTENT, STYLE])
    assert_same(again, panel, "a repeated K-LoRA request")
    assert again.klora == panel.klora


def test_no_leak_into_the_next_generation(webui: Webui, baseline: Generation) -> None:
    """After a K-LoRA image (with text-encoder deltas), the same prompt without K-LoRA is the baseline again:
    no hook left on the model, no conditioning cached with K-LoRA's text-encoder deltas."""
    webui.generate(klora=[{"content": CONTENT, "style": STYLE, "te": "both"}])
    after = webui.generate()
    assert_no_klora(after)
    assert_same(after, baseline, "plain generation after a K-LoRA one")


def test_per_step_choice_is_not_a_merge(webui: Webui, panel: Generation) -> None:
    """K-LoRA switches layers between the two LoRAs over the steps: not the same image as adding both."""
    merged = webui.generate(klora=[{"content": CONTENT, "style": STYLE, "mode": "merge"}])
    assert_klora_field(merged, mode="merge")
    assert_differs(panel, merged, "K-LoRA vs direct merge")
    no_te = webui.generate(klora=[{"content": CONTENT, "style": STYLE, "te": "none"}])
    assert_differs(panel, no_te, "text encoder deltas on vs off")


def test_selection_map_is_added_after_the_images(webui: Webui, panel: Generation) -> None:
    gen = webui.generate(klora=[{"content": CONTENT, "style": STYLE, "show_map": True}])
    assert len(gen.images) == 2, [im.size for im in gen.images]
    assert_same(gen, panel, "the generated image with the map shown vs without")
    assert gen.images[1].size != (64, 64) and min(gen.images[1].size) >= 128, gen.images[1].size


def test_batch_size_and_count(webui: Webui, baseline: Generation) -> None:
    batch = {"batch_size": 2, "n_iter": 2}
    plain = webui.generate(**batch)
    gen = webui.generate(klora=[True, CONTENT, STYLE], **batch)
    assert len(gen.images) == 4 and len(gen.info["infotexts"]) == 4
    for i, text in enumerate(gen.info["infotexts"]):
        value = infotext_fields(text).get("K-LoRA")
        assert value == gen.klora, f"image {i}: {text!r}"
        diff = mean_abs_diff(gen.images[i], plain.images[i])
        assert diff > 0.5, f"image {i} of the batch: K-LoRA made no difference ({diff:.3f})"


def test_interrupted_generation_leaves_nothing_behind(webui: Webui, baseline: Generation) -> None:
    """Interrupt a long K-LoRA generation mid-sampling; the next plain generation is the baseline again."""
    result: dict[str, object] = {}

    def run() -> None:
        result["gen"] = webui.generate(klora=[True, CONTENT, STYLE], steps=400)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    step = 0
    while time.monotonic() < deadline and thread.is_alive():
        state = webui.get("/sdapi/v1/progress?skip_current_image=true")["state"]
        step = state.get("sampling_step", 0)
        if state.get("job_count", 0) > 0 and step >= 2:
            break
        time.sleep(0.05)
    assert thread.is_alive(), "the generation ended before it could be interrupted"
    assert webui.post("/sdapi/v1/interrupt", {}).status == 200
    thread.join(timeout=120)
    assert not thread.is_alive(), "the interrupted generation did not return"
    gen = result.get("gen")
    assert isinstance(gen, Generation), result
    after = webui.generate()
    assert_no_klora(after)
    assert_same(after, baseline, f"plain generation after one interrupted at step {step}")


def test_builtin_lora_tags_still_work(webui: Webui, baseline: Generation, panel: Generation) -> None:
    prompt = f"{baseline.request['prompt']} <lora:{CONTENT}:0.5>"
    plain = webui.generate(prompt=prompt)
    both = webui.generate(prompt=prompt, klora=[True, CONTENT, STYLE])
    assert_differs(plain, baseline, "<lora> tag vs without")
    assert_differs(both, plain, "K-LoRA on top of a <lora> tag vs the tag alone")
    assert_differs(both, panel, "K-LoRA with a <lora> tag vs K-LoRA alone")
    assert "Lora hashes" in both.fields, both.infotext
    assert_klora_field(both)


def test_peft_files_work_like_kohya(webui: Webui, baseline: Generation, panel: Generation) -> None:
    """The same LoRAs in the diffusers/PEFT layout: the builtin loads nothing from them, K-LoRA reads them."""
    names = {lora["name"] for lora in webui.get("/sdapi/v1/loras")}
    if not {CONTENT_PEFT, STYLE_PEFT} <= names:
        pytest.skip(f"{CONTENT_PEFT} / {STYLE_PEFT} are not in the webui's LoRA list")
    gen = webui.generate(klora=[True, CONTENT_PEFT, STYLE_PEFT])
    assert_klora_field(gen, content=CONTENT_PEFT, style=STYLE_PEFT)
    assert_same(gen, panel, "K-LoRA on the PEFT files vs on the kohya files with the same weights")


# --------------------------------------------------------------------------------------------------------
# the tag


def test_tag_without_panel(webui: Webui, panel: Generation) -> None:
    gen = webui.generate(prompt=f"{panel.request['prompt']} <klora:{CONTENT}:{STYLE}>")
    got = assert_klora_field(gen, pattern="s", mode="klora")
    assert got.get("source") == "tag", got
    # the webui strips the tag from the text the model sees: same image as the panel with the same settings
    assert_same(gen, panel, "tag vs panel with the same settings")


def test_tag_options_win_over_the_panel(webui: Webui, baseline: Generation) -> None:
    prompt = f"{baseline.request['prompt']} <klora:{CONTENT}:{STYLE}:pattern=s*:gamma=3:te=none>"
    gen = webui.generate(prompt=prompt, klora=[True, CONTENT, STYLE, 1.0, 1.0, "s"])
    assert_differs(gen, baseline, "tag with options vs without")
    got = assert_klora_field(gen, pattern="s*", gamma="3", te="none")
    assert got.get("source") == "tag", got


# --------------------------------------------------------------------------------------------------------
# infotext round trip


def test_png_info_reads_the_field_back(webui: Webui) -> None:
    gen = webui.generate(klora=[{"content": CONTENT, "style": STYLE, "pattern": "s*", "alpha": 2,
                                 "gamma": 1.7, "mode": "topk", "te": "content"}])
    r = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + gen.b64[0]})
    assert r.status == 200, r.brief()
    data = r.json()
    assert data["info"] == gen.infotext
    _needs_parsed_png_info(gen)
    value = data["parameters"].get("K-LoRA")
    assert value == gen.klora, data["parameters"]
    args = infotext.parse_infotext(value)
    assert (args.enabled, args.content, args.style) == (True, CONTENT, STYLE)
    # β was not given: the infotext records the s* default, so the paste gives the same β
    assert (args.pattern, args.alpha, args.beta) == ("s*", 2.0, PATTERNS["s*"].beta)
    assert (args.gamma, args.gamma_value, args.mode, args.te) == ("manual", 1.7, "topk", "content")


def _needs_webui(gen: Generation, version: tuple[int, ...], why: str) -> None:
    """Skip the rest of a test on an A1111 older than ``version`` (as the infotext of ``gen`` says)."""
    if gen.webui_version and gen.webui_version < version:
        pytest.skip(why)


def _needs_infotext_requests(gen: Generation) -> None:
    _needs_webui(gen, (1, 8), "the API's infotext field came with A1111 1.8")


def _needs_parsed_png_info(gen: Generation) -> None:
    _needs_webui(gen, (1, 7), "/sdapi/v1/png-info parses the fields since A1111 1.7")


def test_infotext_request_reproduces_the_image(webui: Webui, panel: Generation) -> None:
    """``{"infotext": …}`` alone fills the prompt, seed, size … and the K-LoRA panel (its paste fields)."""
    _needs_infotext_requests(panel)
    r = webui.post("/sdapi/v1/txt2img", {"infotext": panel.infotext})
    assert r.status == 200, r.brief()
    gen = Webui.generation({"infotext": panel.infotext}, r.json())
    assert gen.klora == panel.klora, gen.infotext
    assert_same(gen, panel, "the image remade from its infotext")


# --------------------------------------------------------------------------------------------------------
# hires fix and img2img

HIRES = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "denoising_strength": 0.6,
         "hr_second_pass_steps": 4}


def test_hires_fix(webui: Webui) -> None:
    plain = webui.generate(**HIRES)
    gen = webui.generate(klora=[True, CONTENT, STYLE], **HIRES)
    assert gen.image.size == (128, 128)
    assert_differs(gen, plain, "hires fix with K-LoRA vs without")
    got = assert_klora_field(gen)
    assert "note" not in got, f"K-LoRA was not applied to the whole generation: {got}"
    assert "Hires upscale" in gen.fields, gen.infotext


def test_img2img(webui: Webui, baseline: Generation) -> None:
    init = {"init_images": [encode(baseline.image)], "denoising_strength": 0.6}
    plain = webui.generate("img2img", **init)
    gen = webui.generate("img2img", klora=[True, CONTENT, STYLE], **init)
    assert gen.image.size == (64, 64)
    assert_differs(gen, plain, "img2img with K-LoRA vs without")
    assert_klora_field(gen)
    prompt = f"{baseline.request['prompt']} <klora:{CONTENT}:{STYLE}>"
    tagged = webui.generate("img2img", prompt=prompt, **init)
    assert_same(tagged, gen, "img2img: tag vs panel with the same settings")


# --------------------------------------------------------------------------------------------------------
# bad input


def _assert_made_without_klora_with_warning(webui: Webui, baseline: Generation, needle: str,
                                            **request: object) -> Generation:
    """A tag K-LoRA cannot use (as in the UI): HTTP 200, the image made without K-LoRA, and the reason in the
    ``K-LoRA warning`` field of ``extra_generation_params`` and the infotext (the webui's ``p.comment`` text
    is not part of the API's answer); no ``K-LoRA`` field."""
    body = {**baseline.request, **request}
    r = webui.post("/sdapi/v1/txt2img", body)
    assert r.status == 200, f"HTTP {r.status}: {r.brief()}"
    gen = Webui.generation(body, r.json())
    assert_no_klora(gen)
    assert_same(gen, baseline, "image with a bad K-LoRA tag vs without K-LoRA")
    warning = (gen.info.get("extra_generation_params") or {}).get(infotext.WARNING_KEY)
    assert warning and needle in warning, (f"no warning naming {needle!r} in the API answer; "
                                           f"extra_generation_params={gen.info.get('extra_generation_params')}")
    assert warning.count("The image was made without K-LoRA.") == 1 and ". The image" in warning, warning
    assert gen.fields.get(infotext.WARNING_KEY) == warning, gen.infotext
    return gen


def test_bad_lora_name_in_the_panel(webui: Webui, baseline: Generation) -> None:
    """API args naming a LoRA the webui does not list: refused with a 4xx that names it."""
    body = {**baseline.request, "alwayson_scripts": {"K-LoRA": {"args": [True, MISSING, STYLE]}}}
    r = webui.post("/sdapi/v1/txt2img", body)
    assert r.status == 422, f"HTTP {r.status}: {r.brief()}"
    detail = r.json()["detail"]
    assert "K-LoRA" in detail and MISSING in detail and "'content'" in detail, detail


def test_bad_lora_name_in_the_tag(webui: Webui, baseline: Generation) -> None:
    _assert_made_without_klora_with_warning(
        webui, baseline, MISSING, prompt=f"{baseline.request['prompt']} <klora:{MISSING}:{STYLE}>")


def test_two_tags(webui: Webui, baseline: Generation) -> None:
    p = baseline.request["prompt"]
    _assert_made_without_klora_with_warning(
        webui, baseline, "tags", prompt=f"{p} <klora:{CONTENT}:{STYLE}> <klora:{STYLE}:{CONTENT}>")


def test_pasting_a_warning_infotext_does_not_enable_klora(webui: Webui, baseline: Generation) -> None:
    """The infotext of an image made without K-LoRA (bad tag) has a ``K-LoRA warning`` field: remade from
    that infotext without the tag, the image is the plain one (the warning turns nothing on)."""
    gen = _assert_made_without_klora_with_warning(
        webui, baseline, MISSING, prompt=f"{baseline.request['prompt']} <klora:{MISSING}:{STYLE}>")
    r = webui.post("/sdapi/v1/png-info", {"image": "data:image/png;base64," + gen.b64[0]})
    assert r.status == 200, r.brief()
    _needs_parsed_png_info(gen)
    params = r.json()["parameters"]
    assert params.get(infotext.WARNING_KEY) == gen.fields[infotext.WARNING_KEY] and "K-LoRA" not in params
    assert infotext.infotext_paste_values(params) == {"enabled": False}
    _needs_infotext_requests(gen)
    body = {"infotext": gen.infotext, "prompt": baseline.request["prompt"]}
    r = webui.post("/sdapi/v1/txt2img", body)
    assert r.status == 200, r.brief()
    again = Webui.generation(body, r.json())
    assert_no_klora(again)
    assert infotext.WARNING_KEY not in again.fields, again.infotext
    assert_same(again, baseline, "image remade from a warning infotext")


BAD_ARGS = {
    "unknown pattern": ([True, CONTENT, STYLE, 1.0, 1.0, "zzz"], "pattern"),
    "strength not a number": ([True, CONTENT, STYLE, "strong"], "content_strength"),
    "negative alpha": ([{"content": CONTENT, "style": STYLE, "alpha": -1}], "alpha"),
    "unknown dict key": ([{"content": CONTENT, "style": STYLE, "bogus": 1}], "bogus"),
    "bad mode": ([{"content": CONTENT, "style": STYLE, "mode": "blend"}], "mode"),
    # the webui passes only the script's own slots on (modules/api/api.py init_script_args), so the extension
    # sees the 6th item (1.0) as the pattern unless it checks the request itself
    "too many args": ([True, CONTENT, STYLE, *([1.0] * 20)], "K-LoRA"),
}


@pytest.mark.parametrize("case", list(BAD_ARGS))
def test_bad_args_give_a_clear_http_error(webui: Webui, baseline: Generation, case: str) -> None:
    args, needle = BAD_ARGS[case]
    r = webui.post("/sdapi/v1/txt2img", {**baseline.request, "alwayson_scripts": {"K-LoRA": {"args": args}}})
    status = r.status
    assert 400 <= status < 500, f"{case}: expected a 4xx error, got HTTP {r.status}: {r.brief()}"
    assert "K-LoRA" in r.text and needle in r.text, f"{case}: unclear message: {r.brief()}"
    assert "Traceback" not in r.text


def test_args_as_a_bare_dict(webui: Webui, panel: Generation) -> None:
    """``"args": {…}`` (not inside a list) is what users write first: it works like ``[{…}]`` (the webui
    alone would fail on it: ``modules/api/api.py`` ``init_script_args`` indexes ``args[0]``)."""
    body = {**panel.request, "alwayson_scripts": {"K-LoRA": {"args": {"content": CONTENT, "style": STYLE}}}}
    r = webui.post("/sdapi/v1/txt2img", body)
    assert r.status == 200, f"HTTP {r.status}: {r.brief()}"
    gen = Webui.generation(body, r.json())
    assert gen.klora == panel.klora
    assert_same(gen, panel, "bare dict args vs list args")


def test_positional_pattern_without_beta_takes_the_patterns_beta(webui: Webui) -> None:
    """``[True, C, S, 1, 1, "s*"]``: the webui fills the missing α/β with the panel's values (those of the
    panel's pattern, s); K-LoRA's API check pads them with None first, so s* gets its own β."""
    gen = webui.generate(klora=[True, CONTENT, STYLE, 1, 1, "s*"])
    named = webui.generate(klora=[{"content": CONTENT, "style": STYLE, "pattern": "s*"}])
    assert_klora_field(gen, pattern="s*", alpha="1.5", beta="1.275")
    assert gen.klora == named.klora
    assert_same(gen, named, "positional s* vs named s*")
    alpha_only = webui.generate(klora=[True, CONTENT, STYLE, 1, 1, "s*", 2])
    assert_klora_field(alpha_only, pattern="s*", alpha="2", beta="1.275")



# --------------------------------------------------------------------------------------------------------
# SDXL (two text encoders; te2 is open_clip's fused nn.MultiheadAttention)


@pytest.fixture(scope="module")
def sdxl(webui: Webui) -> Webui:
    """Skip unless the webui runs an SDXL model. The API does not state the architecture: ``KLORA_E2E_SDXL``
    (1/0) says it, else the loaded checkpoint's title must contain "xl" (/sdapi/v1/options)."""
    flag = os.environ.get("KLORA_E2E_SDXL")
    title = str(webui.get("/sdapi/v1/options").get("sd_model_checkpoint") or "")
    if not (flag == "1" if flag in ("0", "1") else "xl" in title.lower()):
        pytest.skip(f"not an SDXL model: {title!r} (set KLORA_E2E_SDXL=1 to force)")
    return webui


def test_sdxl_merge_of_content_alone_equals_the_builtin_tag(sdxl: Webui, baseline: Generation) -> None:
    """Direct merge with style strength 0 adds the content LoRA at every step in every layer, both text
    encoders included: the image the builtin ``<lora:CONTENT:1>`` makes (which merges weights instead).
    CONTENT's te2 attention must have q, k, v and out (the builtin skips a partial nn.MultiheadAttention)."""
    tag = sdxl.generate(prompt=f"{baseline.request['prompt']} <lora:{CONTENT}:1>")
    ours = sdxl.generate(klora=[{"content": CONTENT, "style": STYLE, "mode": "merge", "sw": 0, "te": "both"}])
    assert_klora_field(ours, mode="merge", sw="0")
    assert_differs(tag, baseline, "<lora> tag vs without")
    diff = mean_abs_diff(ours.image, tag.image)
    assert diff < 0.05, f"K-LoRA merge vs builtin tag: mean |Δ| = {diff:.3f} of 255"


def test_sdxl_each_text_encoder_policy_changes_the_image(sdxl: Webui, panel: Generation) -> None:
    gens = {te: sdxl.generate(klora=[{"content": CONTENT, "style": STYLE, "te": te}])
            for te in ("none", "content", "style")}
    for te in ("content", "style"):
        assert_differs(gens[te], gens["none"], f"te={te} vs te=none")
    assert_differs(panel, gens["content"], "te=both vs te=content")
