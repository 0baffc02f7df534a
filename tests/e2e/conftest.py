"""Fixtures of the end-to-end suite (skipped unless ``KLORA_WEBUI_URL`` is set; see webui_client.py)."""

from __future__ import annotations

import urllib.error

import pytest
from webui_client import CONTENT, STYLE, URL, Generation, Webui


@pytest.fixture(scope="session")
def webui() -> Webui:
    if not URL:
        pytest.skip("KLORA_WEBUI_URL is not set")
    client = Webui(URL)
    try:
        scripts = client.get("/sdapi/v1/scripts")
    except (urllib.error.URLError, OSError) as err:
        pytest.fail(f"no webui answers at {URL}: {err}")
    for tab in ("txt2img", "img2img"):
        assert "k-lora" in scripts.get(tab, []), f"the K-LoRA script is not loaded in {tab}: {scripts}"
    client.post("/sdapi/v1/refresh-loras", {})
    names = {lora["name"] for lora in client.get("/sdapi/v1/loras")}
    missing = {CONTENT, STYLE} - names
    assert not missing, f"LoRAs {sorted(missing)} are not in the webui's list {sorted(names)}"
    return client


@pytest.fixture(scope="session")
def baseline(webui: Webui) -> Generation:
    """The reference image: BASE without K-LoRA."""
    return webui.generate()


@pytest.fixture(scope="session")
def panel(webui: Webui) -> Generation:
    """K-LoRA through the positional args with the panel defaults (pattern s, γ auto)."""
    return webui.generate(klora=[True, CONTENT, STYLE])
