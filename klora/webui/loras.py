"""LoRA names → files, through the builtin Lora extension's list (``networks``: A1111's
extensions-builtin/Lora, Forge's and Neo's sd_forge_lora, with the same names), and the files read once.

``KLoraInputError`` is input K-LoRA cannot use (an unknown name, a missing Lora extension, a pair for another
model); the generation then goes on without K-LoRA and says why.
"""

from __future__ import annotations

import os
from typing import Any

from klora import scores
from klora.cache import LRU
from klora.formats import read_lora
from klora.layers import LoraFile

FILE_CACHE_SIZE = 4


class KLoraInputError(Exception):
    """Input K-LoRA cannot use; ``str(err)`` is the message shown to the user."""


def _networks() -> Any:
    """The builtin Lora extension's ``networks`` module (in ``sys.modules`` once the webui loaded it)."""
    try:
        import networks  # type: ignore[import-not-found]
    except ImportError:
        raise KLoraInputError("K-LoRA: the built-in Lora extension is disabled or missing; K-LoRA finds "
                              "LoRA files through its list (Extensions tab → enable 'Lora')") from None
    return networks


def _lookup(nets: Any, name: str) -> Any:
    # extensions-builtin/Lora/networks.py load_networks: names that clash as aliases resolve by file name
    if name.lower() in nets.forbidden_network_aliases:
        return nets.available_networks.get(name)
    return nets.available_network_aliases.get(name)


def lora_names() -> list[str]:
    """The LoRA names the Lora tab lists (file names without extension), sorted case-insensitively."""
    try:
        nets = _networks()
    except KLoraInputError:
        return []
    if not nets.available_networks:
        nets.list_available_networks()
    return sorted(nets.available_networks, key=str.lower)


def refresh_lora_names() -> None:
    """Rescan the LoRA folders (the refresh button)."""
    _networks().list_available_networks()


def resolve_lora(name: str) -> str:
    """The file of the LoRA the webui knows as ``name`` (file name or alias); rescans once if unknown."""
    nets = _networks()
    entry = _lookup(nets, name)
    if entry is None:
        nets.list_available_networks()
        entry = _lookup(nets, name)
    if entry is None:
        raise KLoraInputError(f"K-LoRA: no LoRA named {name!r} in the LoRA folders (names are file names "
                              f"without extension, as on the Lora tab).")
    return str(entry.filename)


def file_of(name: str) -> str | None:
    """The file of a listed LoRA name, or None (no rescan: for the names of a prompt's tags)."""
    try:
        entry = _lookup(_networks(), name)
    except KLoraInputError:
        return None
    return None if entry is None else str(entry.filename)


def lora_exists(name: str) -> bool:
    """Whether the webui lists a LoRA called ``name`` (file name or alias; rescans once if not). True when
    the builtin Lora extension is missing: then the generation itself says why K-LoRA cannot run."""
    try:
        nets = _networks()
    except KLoraInputError:
        return True
    if _lookup(nets, name) is not None:
        return True
    nets.list_available_networks()
    return _lookup(nets, name) is not None


_files: LRU[LoraFile] = LRU(FILE_CACHE_SIZE)


def read_lora_cached(path: str) -> LoraFile:
    """:func:`klora.formats.read_lora`, cached by (path, mtime, size) so a file is read and hashed once (once
    across restarts too, through the disk cache's index of known files)."""
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return read_lora(path)  # raises the format error with the reason
    hit = _files.get(key)
    if hit is None:
        hit = read_lora(path, scores.known_files())
        _files.put(key, hit)
    return hit


def load_pair(content: str, style: str) -> tuple[LoraFile, LoraFile]:
    """Both files of a pair, named as the webui lists them."""
    return read_lora_cached(resolve_lora(content)), read_lora_cached(resolve_lora(style))


def short_hash(lora: LoraFile) -> str | None:
    """First 10 hex digits of the file's sha256 (the "AutoV2" form model sites show)."""
    return lora.sha256[:10] if lora.sha256 else None


def resolve_pasted_name(name: str, shorthash: str | None) -> str | None:
    """For pasted infotext: None if a LoRA of that name exists, else the local name of a file read here whose
    sha256 starts with ``shorthash``."""
    try:
        nets = _networks()
    except KLoraInputError:
        return None
    if _lookup(nets, name) is not None or not shorthash:
        return None
    for lora in _files.values():
        if lora.sha256 and lora.sha256.startswith(shorthash.lower()):
            for entry in nets.available_networks.values():
                if os.path.realpath(str(entry.filename)) == os.path.realpath(lora.path):
                    return str(entry.name)
    return None
