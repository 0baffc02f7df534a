"""End-to-end checks against a running Forge (lllyasviel/stable-diffusion-webui-forge) or Forge Neo over its
HTTP API.

Skipped unless ``KLORA_WEBUI_URL`` names a running webui started with ``--api`` and that webui is Forge or
Forge Neo (its options carry ``forge_preset``). The server needs two LoRAs that fit its loaded model: named by
``KLORA_E2E_CONTENT`` and ``KLORA_E2E_STYLE``, or else the first two its ``/sdapi/v1/loras`` lists;
``KLORA_E2E_CONTENT_ALT``/``KLORA_E2E_STYLE_ALT`` name a second pair in another file spelling (e.g. Z-Image's
diffusers and Neo-native names), checked the same way. ``KLORA_E2E_CFG`` sets the CFG scale (default 5; the
distilled DiTs want 1), ``KLORA_E2E_PAYLOAD`` a JSON object of request fields added to every request (e.g.
``{"scheduler": "Simple"}`` for Flux), ``KLORA_E2E_FAMILY_NOTE`` the family-default note the infotext must
carry (e.g. ``Z-Image default pattern s*``). Generations are small (64×64, 4 steps, fixed seeds) so a CPU
server answers in seconds. Only the standard library and Pillow are used.

Run: ``KLORA_WEBUI_URL=http://127.0.0.1:7860 python -m pytest tests/e2e_forge -q``
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import urllib.error
import urllib.request
from typing import Any

import pytest

URL = os.environ.get("KLORA_WEBUI_URL", "").rstrip("/")
TIMEOUT = float(os.environ.get("KLORA_E2E_TIMEOUT", "600"))
CFG = float(os.environ.get("KLORA_E2E_CFG", "5"))
EXTRA = json.loads(os.environ.get("KLORA_E2E_PAYLOAD", "{}"))  # e.g. a Flux model's {"scheduler": "Simple"}
FAMILY_NOTE = os.environ.get("KLORA_E2E_FAMILY_NOTE", "")
SCRIPT = "K-LoRA"

pytestmark = pytest.mark.skipif(not URL, reason="KLORA_WEBUI_URL is not set (no running webui to test)")


def _call(method: str, path: str, payload: dict | None = None) -> tuple[int, Any]:
    data = None if payload is None else json.dumps(payload).encode()
    req = urllib.request.Request(
        URL + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as res:
            body = res.read()
            return res.status, json.loads(body) if body else None
    except urllib.error.HTTPError as err:
        body = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(body)
        except ValueError:
            return err.code, body


@pytest.fixture(scope="module")
def server() -> dict:
    status, options = _call("GET", "/sdapi/v1/options")
    assert status == 200, f"cannot read the webui's options: {status} {options}"
    if "forge_preset" not in options:
        pytest.skip("the webui at KLORA_WEBUI_URL is not Forge")
    status, scripts = _call("GET", "/sdapi/v1/scripts")
    assert status == 200
    names = [s.lower() for s in scripts.get("txt2img", [])]
    assert SCRIPT.lower() in names, f"the K-LoRA script is not loaded: {names}"
    content, style = os.environ.get("KLORA_E2E_CONTENT"), os.environ.get("KLORA_E2E_STYLE")
    if not (content and style):
        status, loras = _call("GET", "/sdapi/v1/loras")
        assert status == 200
        found = [item["name"] for item in loras]
        if len(found) < 2:
            pytest.skip("the server lists fewer than two LoRAs; set KLORA_E2E_CONTENT and KLORA_E2E_STYLE")
        content, style = found[0], found[1]
    status, first = _call("POST", "/sdapi/v1/txt2img", _payload())  # before any K-LoRA run of this module
    assert status == 200, f"txt2img failed: {status} {first}"
    pairs = [(content, style)]
    alt = os.environ.get("KLORA_E2E_CONTENT_ALT"), os.environ.get("KLORA_E2E_STYLE_ALT")
    if alt[0] and alt[1]:
        pairs.append((alt[0], alt[1]))
    return {
        "plain": first["images"][0],
        "options": options,
        "content": content,
        "style": style,
        "pairs": pairs,
        "flux": str(options.get("forge_preset", "")).lower() == "flux",
    }


def _payload(prompt: str = "a photo of a dog", klora: Any = None, **extra) -> dict:
    payload = {
        "prompt": prompt,
        "negative_prompt": "",
        "steps": 4,
        "width": 64,
        "height": 64,
        "seed": 1234,
        "cfg_scale": CFG,
        "sampler_name": "Euler",
        "batch_size": 1,
        "n_iter": 1,
    }
    payload.update(EXTRA)
    if klora is not None:
        payload["alwayson_scripts"] = {SCRIPT: {"args": [klora]}}
    payload.update(extra)
    return payload


def _txt2img(payload: dict) -> dict:
    status, body = _call("POST", "/sdapi/v1/txt2img", payload)
    assert status == 200, f"txt2img failed: {status} {body}"
    return body


def _info(body: dict) -> dict:
    info = body["info"]
    return json.loads(info) if isinstance(info, str) else info


def _klora_field(body: dict) -> str | None:
    info = _info(body)
    params = info.get("extra_generation_params") or {}
    if "K-LoRA" in params:
        return params["K-LoRA"]
    # a field of its own in the infotext, not the "K-LoRA: …" text quoted inside a "K-LoRA warning" field
    text = "\n".join(info.get("infotexts") or [])
    return "K-LoRA" if re.search(r"(?:^|\n|, )K-LoRA: ", text) else None


def _pixels(b64: str) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").tobytes()


def _pair(server: dict, **fields) -> dict:
    return {"enabled": True, "content": server["content"], "style": server["style"], **fields}


def _mean_abs_diff(a: bytes, b: bytes) -> float:
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def test_klora_changes_the_image_and_writes_the_infotext(server):
    plain = _txt2img(_payload())
    fused = _txt2img(_payload(klora=_pair(server)))
    assert _klora_field(plain) is None
    field = _klora_field(fused)
    assert field and f"content: {server['content']}" in field and f"style: {server['style']}" in field
    assert _pixels(plain["images"][0]) != _pixels(fused["images"][0])
    if server["flux"]:
        assert "pattern: s*" in field and "Flux default" in field
    if FAMILY_NOTE:
        assert FAMILY_NOTE in field, field
    # PNG Info reads the field back from the image
    image = "data:image/png;base64," + fused["images"][0]
    status, png = _call("POST", "/sdapi/v1/png-info", {"image": image})
    assert status == 200 and "K-LoRA:" in png["info"]


def test_content_alone_equals_forges_own_lora(server):
    # merge with style strength 0 applies the content LoRA alone, through our hooks on the layers we resolve;
    # Forge's builtin <lora:…:1> merges the same file through its own key map: same layers, same image
    # (up to rounding). A layer put on the wrong module (or left out) shows as a visible difference.
    plain = _txt2img(_payload())
    builtin = _txt2img(_payload(prompt=f"a photo of a dog <lora:{server['content']}:1>"))
    ours = _txt2img(_payload(klora=_pair(server, mode="merge", style_strength=0.0)))
    assert "mode: merge" in (_klora_field(ours) or "")
    a, b, c = (_pixels(x["images"][0]) for x in (plain, builtin, ours))
    by_lora, off = _mean_abs_diff(a, b), _mean_abs_diff(b, c)
    assert by_lora > 1.0, "the content LoRA does not change the image; pick LoRAs that do"
    assert off < 0.05 * by_lora, (off, by_lora)


@pytest.mark.parametrize("which", [0, 1], ids=["pair", "alt-spelling pair"])
def test_merge_equals_the_hosts_two_lora_tags_and_klora_differs(server, which):
    """mode=merge adds both deltas at every step: the image two ``<lora>`` tags make, through the host's own
    loader (every layer on the same module and rows); K-LoRA proper picks one per layer and step and so makes
    another image. For each file spelling of the server's pairs."""
    if which >= len(server["pairs"]):
        pytest.skip("no second pair (KLORA_E2E_CONTENT_ALT / KLORA_E2E_STYLE_ALT)")
    content, style = server["pairs"][which]
    args = {"enabled": True, "content": content, "style": style}
    plain = _pixels(_txt2img(_payload())["images"][0])
    tags = _txt2img(_payload(prompt=f"a photo of a dog <lora:{content}:1> <lora:{style}:1>"))
    merged = _txt2img(_payload(klora={**args, "mode": "merge"}))
    fused = _txt2img(_payload(klora=args))
    assert "mode: merge" in (_klora_field(merged) or "") and "mode: klora" in (_klora_field(fused) or "")
    for body in (merged, fused):
        assert "K-LoRA warning" not in (_info(body).get("extra_generation_params") or {}), _info(body)
    b, m, f = (_pixels(x["images"][0]) for x in (tags, merged, fused))
    by_tags = _mean_abs_diff(plain, b)
    assert by_tags > 1.0, "the two LoRAs do not change the image; pick LoRAs that do"
    assert _mean_abs_diff(b, m) < 0.05 * by_tags, (_mean_abs_diff(b, m), by_tags)
    assert _mean_abs_diff(m, f) > 0.05 * by_tags and _mean_abs_diff(plain, f) > 0.05 * by_tags


def test_the_tag_works_without_the_panel(server):
    tag = f"<klora:{server['content']}:{server['style']}:mode=merge>"
    body = _txt2img(_payload(prompt=f"a photo of a dog {tag}"))
    field = _klora_field(body)
    assert field and "mode: merge" in field and "source: tag" in field


def _hires_upscaler() -> str:
    """A latent upscaler when the host has one (Forge), else "None" (Neo lists no latent upscale modes)."""
    status, modes = _call("GET", "/sdapi/v1/latent-upscale-modes")
    names = [m.get("name") for m in modes] if status == 200 and isinstance(modes, list) else []
    return "Latent" if "Latent" in names else (names[0] if names else "None")


def test_hires_fix(server):
    # Forge's API needs hr_additional_modules, or the hires pass fails before sampling
    body = _txt2img(
        _payload(
            klora=_pair(server),
            enable_hr=True,
            hr_scale=1.5,
            hr_upscaler=_hires_upscaler(),
            denoising_strength=0.5,
            hr_second_pass_steps=2,
            hr_additional_modules=["Use same choices"],
        )
    )
    assert _klora_field(body)


def test_img2img(server):
    init = _txt2img(_payload())["images"][0]
    status, body = _call(
        "POST", "/sdapi/v1/img2img", _payload(klora=_pair(server), init_images=[init], denoising_strength=0.6)
    )
    assert status == 200, body
    assert _klora_field(body)


def test_unknown_lora_name_in_the_request_is_refused(server):
    # API arguments naming a LoRA the webui does not list are refused (README: HTTP 422, KLoraArgsError)
    missing = "no-such-lora-klora-e2e"
    status, body = _call("POST", "/sdapi/v1/txt2img", _payload(klora=_pair(server, content=missing)))
    assert status == 422, (status, body)
    assert body["error"] == "KLoraArgsError" and missing in body["detail"] and "K-LoRA" in body["detail"]


def test_unknown_lora_name_in_the_tag_makes_the_plain_image_with_a_warning(server):
    plain = _txt2img(_payload())
    missing = "no-such-lora-klora-e2e"
    body = _txt2img(_payload(prompt=f"a photo of a dog <klora:{missing}:{server['style']}>"))
    assert _klora_field(body) is None
    warning = (_info(body).get("extra_generation_params") or {}).get("K-LoRA warning")
    assert warning and missing in warning, _info(body).get("extra_generation_params")
    assert _pixels(plain["images"][0]) == _pixels(body["images"][0])


def test_bad_arguments_are_an_http_error_with_a_message(server):
    status, body = _call("POST", "/sdapi/v1/txt2img", _payload(klora=_pair(server, pattern="zigzag")))
    assert 400 <= status < 500, (status, body)
    assert "K-LoRA" in json.dumps(body)


def test_nothing_is_left_behind(server):
    # after every run above (finished or refused), the plain image is the one made before them: no hook of
    # ours left on Forge's modules, no weight changed
    assert _pixels(_txt2img(_payload())["images"][0]) == _pixels(server["plain"])
