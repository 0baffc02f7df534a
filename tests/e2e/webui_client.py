"""HTTP client and image helpers for the end-to-end suite.

The suite drives a running AUTOMATIC1111 webui (``--api``) with K-LoRA installed.

The suite runs only when ``KLORA_WEBUI_URL`` names the webui (e.g. ``http://127.0.0.1:7861``). The webui
must list two LoRAs made for its loaded checkpoint, named by ``KLORA_E2E_CONTENT`` and ``KLORA_E2E_STYLE``
(defaults ``klora_content`` and ``klora_style``), which share layers. HTTP uses only the standard library;
images are decoded with Pillow (a runtime dependency of the project).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageChops, ImageStat

URL = os.environ.get("KLORA_WEBUI_URL", "").rstrip("/")
CONTENT = os.environ.get("KLORA_E2E_CONTENT", "klora_content")
STYLE = os.environ.get("KLORA_E2E_STYLE", "klora_style")
# Optional: the same two LoRAs saved in the diffusers/PEFT layout (lora_A/lora_B); tests using them skip
# when the webui does not list them.
CONTENT_PEFT = os.environ.get("KLORA_E2E_CONTENT_PEFT", "klora_content_peft")
STYLE_PEFT = os.environ.get("KLORA_E2E_STYLE_PEFT", "klora_style_peft")
TIMEOUT = float(os.environ.get("KLORA_E2E_TIMEOUT", "600"))

# Small and fast on a CPU; a deterministic sampler so that equal settings give equal pixels.
BASE: dict[str, Any] = {
    "prompt": "a photo of a dog",
    "negative_prompt": "",
    "steps": 4,
    "width": 64,
    "height": 64,
    "seed": 1234,
    "sampler_name": "Euler",
    "cfg_scale": 5,
    "batch_size": 1,
    "n_iter": 1,
}

# modules/infotext_utils.py ``re_param_code``: how the webui splits the last infotext line into fields.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


@dataclass
class Response:
    status: int
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    def brief(self, limit: int = 800) -> str:
        """The body for an assertion message: a generation's infotext and extra params, not its images."""
        try:
            data = json.loads(self.text)
            info = json.loads(data["info"])
            return f"infotext={info['infotexts'][0]!r} extra={info.get('extra_generation_params')!r}"
        except (ValueError, KeyError, TypeError, IndexError):
            return self.text[:limit]


@dataclass
class Generation:
    """One txt2img/img2img answer: decoded images, the ``info`` JSON and the first image's infotext."""

    request: dict[str, Any]
    images: list[Image.Image]
    b64: list[str]
    info: dict[str, Any]
    infotext: str
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    @property
    def klora(self) -> str | None:
        """The ``K-LoRA`` infotext field (unquoted), or None."""
        return self.fields.get("K-LoRA")

    @property
    def webui_version(self) -> tuple[int, ...]:
        """The webui's version from the infotext's ``Version`` field (``v1.10.1`` → (1, 10, 1)); () if absent
        or not a release number (a fork's own scheme)."""
        m = re.match(r"v?(\d+(?:\.\d+)*)", self.fields.get("Version", ""))
        return tuple(int(x) for x in m.group(1).split(".")) if m else ()

    def messages(self) -> list[str]:
        """Texts the API shows besides the prompt: extra generation params and any ``comments``."""
        out = [str(v) for v in (self.info.get("extra_generation_params") or {}).values()]
        comments = self.info.get("comments")
        if comments:
            out.extend(comments if isinstance(comments, list) else [str(comments)])
        return out


def infotext_fields(infotext: str) -> dict[str, str]:
    """The ``key: value`` fields of an infotext's last line, unquoted as the webui does."""
    last = infotext.strip().split("\n")[-1]
    out: dict[str, str] = {}
    for key, value in _RE_PARAM.findall(last):
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        out[key.strip()] = value
    return out


def decode(b64: str) -> Image.Image:
    if "," in b64[:64]:
        b64 = b64.split(",", 1)[1]
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def encode(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference over all channels (0 = identical); inf when the sizes differ."""
    if a.size != b.size:
        return float("inf")
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


class Webui:
    def __init__(self, url: str) -> None:
        self.url = url

    def request(self, method: str, path: str, body: Any = None) -> Response:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as r:
                return Response(r.status, r.read().decode())
        except urllib.error.HTTPError as err:
            return Response(err.code, err.read().decode(errors="replace"))

    def get(self, path: str) -> Any:
        r = self.request("GET", path)
        assert r.status == 200, f"GET {path}: HTTP {r.status}: {r.text[:500]}"
        return r.json()

    def post(self, path: str, body: Any) -> Response:
        return self.request("POST", path, body)

    def generate(self, kind: str = "txt2img", klora: Any = None, **overrides: Any) -> Generation:
        """POST a generation; ``klora`` is the K-LoRA script's ``args`` value (list, or None for none)."""
        body = {**BASE, **overrides}
        if klora is not None:
            body.setdefault("alwayson_scripts", {})["K-LoRA"] = {"args": klora}
        r = self.post(f"/sdapi/v1/{kind}", body)
        assert r.status == 200, f"{kind}: HTTP {r.status}: {r.brief()}"
        return self.generation(body, r.json())

    @staticmethod
    def generation(body: dict[str, Any], data: dict[str, Any]) -> Generation:
        info = json.loads(data["info"])
        infotext = info["infotexts"][0]
        return Generation(body, [decode(b) for b in data["images"]], data["images"], info, infotext,
                          infotext_fields(infotext))
