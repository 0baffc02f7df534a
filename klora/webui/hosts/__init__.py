"""Which webui runs us, and its :class:`~klora.webui.hosts.base.Host`: AUTOMATIC1111 (:mod:`.a1111`), Forge
(the ``backend/`` architecture with Flux, :mod:`.forge`), Forge Neo (:mod:`.neo`), or a Forge fork we do not
support. Detected once, by feature, never by folder names or version strings alone.

Forge main (≥ 2.0) and Forge Neo ship the top-level packages ``modules_forge`` and ``backend`` with
``backend/patcher/lora.py``; Neo is told apart by its ComfyUI port ``modules_forge/packages/comfy/lora.py`` (a
namespace package; Forge main has ``packages_3rdparty`` instead) or by ``modules_forge/forge_version.py``
saying ``version = "neo"``. The older ldm_patched family (Forge 1.x, reForge, Forge Classic) ships
``ldm_patched`` and no ``backend``; AUTOMATIC1111 has neither. Only ``importlib.util.find_spec`` is used, so
detection imports nothing beyond the parent packages of what it looks for (which the host has imported
already).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from klora.webui.hosts.base import Host

HostName = Literal["a1111", "forge", "neo", "forge-ldm"]


@dataclass(frozen=True)
class HostInfo:
    """``name``: a1111 | forge | neo | forge-ldm; ``version``: the host's own version string when it has one
    (Neo's release, e.g. ``2.26``); ``supported``: whether K-LoRA has an adapter for it (forge-ldm has
    none)."""

    name: HostName
    version: str | None = None

    @property
    def supported(self) -> bool:
        return self.name in ("a1111", "forge", "neo")

    @property
    def is_forge(self) -> bool:
        return self.name in ("forge", "neo", "forge-ldm")

    @property
    def label(self) -> str:
        names = {"a1111": "AUTOMATIC1111 webui", "forge": "Forge", "neo": "Forge Neo",
                 "forge-ldm": "Forge (ldm_patched fork)"}
        return names[self.name] + (f" {self.version}" if self.version else "")


def _has(find_spec: Callable[[str], Any], name: str) -> bool:
    try:
        return find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):
        # a parent that is not a package, or a module with a broken __spec__
        return False


def _forge_version(attribute: str = "version") -> str | None:
    try:
        from modules_forge import forge_version  # the host's; only reached on Forge
    except Exception:
        return None
    version = getattr(forge_version, attribute, None)
    return str(version) if version else None


def _neo_release() -> str | None:
    return _forge_version("release")


def detect(find_spec: Callable[[str], Any] = importlib.util.find_spec,
           version: Callable[[], str | None] = _forge_version,
           release: Callable[[], str | None] = _neo_release) -> HostInfo:
    """Detect the host from the packages it ships (see the module docstring)."""
    if _has(find_spec, "modules_forge") or _has(find_spec, "ldm_patched"):
        if _has(find_spec, "backend") and _has(find_spec, "backend.patcher.lora"):
            forge_version = version()
            if forge_version == "neo" or _has(find_spec, "modules_forge.packages.comfy.lora"):
                return HostInfo("neo", release())
            return HostInfo("forge", forge_version)
        return HostInfo("forge-ldm", version())
    return HostInfo("a1111")


@lru_cache(maxsize=1)
def current() -> HostInfo:
    """The running host, detected on first use and then fixed for the process."""
    return detect()


def load(info: HostInfo | None = None) -> Host:
    """The host adapter of ``info`` (default: the running host).

    Raises ``RuntimeError`` with a message fit for the user on hosts without an adapter.
    """
    info = info or current()
    if info.name == "neo":
        from klora.webui.hosts.neo import NeoHost

        return NeoHost(info.version)
    if info.name == "forge":
        from klora.webui.hosts.forge import ForgeHost

        return ForgeHost(info.version)
    if info.name == "a1111":
        from klora.webui.hosts.a1111 import A1111Host

        return A1111Host(info.version)
    raise RuntimeError(
        f"K-LoRA supports AUTOMATIC1111's webui, Forge 2 and Forge Neo (the 'backend' architecture); "
        f"this is {info.label}, whose LoRA machinery (ldm_patched) it does not support yet."
    )
