"""Small on-disk stores in one cache folder: per-file layer statistics, and the sha256 of files already read.

:class:`StatsCache`: {layer key → (l1, top, numel)} per LoRA file, one ``.safetensors`` file per (LoRA file
sha256, engine version). Properties:

* safe: safetensors only (never pickle); every entry is validated on read (format, version, the file's
  sha256, shapes, dtypes, a blake2b checksum of the payload), and anything that fails (corrupt, truncated,
  stale version, unreadable) is a miss, to be rewritten by the next :meth:`StatsCache.put`;
* atomic: a temporary file in the same folder, then ``os.replace``; readers see the old or the new file,
  never half of one. Concurrent writers of one entry: the last one wins (a lost merge only costs a
  recomputation later);
* extensible: :meth:`StatsCache.put` merges with what is stored, keeping per layer the longer Top list;
* bounded: after each write the least recently used entries (by mtime; a hit touches its file) are deleted
  until the folder's entries fit ``max_bytes``;
* quiet: I/O problems never raise from :meth:`~StatsCache.get` or :meth:`~StatsCache.put` (a miss, or
  ``False``), so a read-only or full disk only disables caching.

``top`` tensors are float32, 1-D, descending (as :func:`klora.topk.abs_stats` returns them).

:class:`FileIndex`: (real path, size, mtime) → sha256 of the LoRA files read and checked before, so that a
restart or a second command does not hash them (and check their weights) again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = ["DEFAULT_MAX_BYTES", "FileIndex", "LayerStats", "StatsCache", "default_cache_dir"]

#: Default bound of a cache folder's entries.
DEFAULT_MAX_BYTES = 256 * 2**20
_FORMAT = "klora-layer-stats/1"
_INDEX_FORMAT = "klora-file-index/1"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SUFFIX = ".safetensors"
_TMP_PREFIX = ".tmp-"
_STALE_TMP_SECONDS = 3600.0


def is_sha256(value: object) -> bool:
    """Whether ``value`` is a sha256 hex digest as the cache keys entries (64 lowercase hex digits)."""
    return isinstance(value, str) and bool(_SHA256.match(value))


class LayerStats(NamedTuple):
    """Statistics of one layer: ``l1`` = Σ|U|, ``top`` = the largest |U| (float32, descending), and
    ``numel`` = the number of entries of U (``top`` holds all of them when its length equals numel)."""

    l1: float
    top: torch.Tensor
    numel: int


def default_cache_dir() -> Path:
    """Where a command-line user's cache goes: ``$KLORA_CACHE_DIR`` if set; else ``%LOCALAPPDATA%\\klora``
    on Windows, ``~/Library/Caches/klora`` on macOS, ``$XDG_CACHE_HOME/klora`` (absolute paths only, as
    the XDG spec says) or ``~/.cache/klora`` elsewhere."""
    override = os.environ.get("KLORA_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA")
        return (Path(base) if base else Path.home() / "AppData" / "Local") / "klora"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "klora"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "klora"
    return Path.home() / ".cache" / "klora"


class StatsCache:
    """Per-file tables of :class:`LayerStats` in ``folder``, for one engine ``version`` string.

    ``version`` names everything that changes the numbers (the engine, its options); entries written
    under another version are never returned. ``max_bytes`` bounds the folder's entries (all versions).
    """

    def __init__(self, folder: str | os.PathLike[str], version: str,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = Path(folder)
        self.version = str(version)
        self.max_bytes = int(max_bytes)
        self._tag = hashlib.sha256(self.version.encode("utf-8")).hexdigest()[:16]

    def path(self, sha256: str) -> Path:
        """The entry's file for a LoRA file's sha256 (64 lowercase hex digits)."""
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.folder / f"{sha256}.{self._tag}{_SUFFIX}"

    # ---------------------------------------------------------------------------------------------- read

    def get(self, sha256: str) -> dict[str, LayerStats]:
        """The stored table of a file (a hit refreshes its mtime), or ``{}``."""
        path = self.path(sha256)
        table = self._read(path, sha256)
        if table:
            with contextlib.suppress(OSError):
                os.utime(path)
        return table

    def _read(self, path: Path, sha256: str) -> dict[str, LayerStats]:
        try:
            size = path.stat().st_size
            if size > max(self.max_bytes, 1 << 20):
                return {}
            data = path.read_bytes()
        except OSError:
            return {}
        try:
            return _decode(data, sha256, self.version)
        except Exception:  # corrupt, truncated or foreign: a miss (safetensors' error types vary by version)
            return {}

    # --------------------------------------------------------------------------------------------- write

    def put(self, sha256: str, table: Mapping[str, LayerStats | tuple[float, torch.Tensor, int]]) -> bool:
        """Store ``table`` for the file, merged with what is stored (per layer the longer Top list wins;
        a layer whose ``numel`` changed is replaced). Returns whether the entry was written."""
        path = self.path(sha256)
        merged = self._read(path, sha256)
        changed = not path.exists() or not merged
        for key, value in table.items():
            stats = _checked(str(key), value)
            old = merged.get(str(key))
            if old is None or old.numel != stats.numel or old.top.numel() < stats.top.numel():
                merged[str(key)] = stats
                changed = True
        if not changed:
            return True
        try:
            _write_atomic(path, _encode(merged, sha256, self.version))
        except OSError:
            return False
        self.evict(keep=path)
        return True

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used entries until the folder's entries fit ``max_bytes`` (``keep`` is
        deleted last), and temporary files older than an hour (left by killed writers)."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        now = time.time()
        entries = []
        for name in names:
            if not name.endswith(_SUFFIX):
                continue
            p = self.folder / name
            try:
                st = p.stat()
            except OSError:
                continue
            if name.startswith(_TMP_PREFIX):
                if now - st.st_mtime > _STALE_TMP_SECONDS:
                    _unlink(p)
                continue
            if _SHA256.match(name[:64]):
                entries.append((p == keep, st.st_mtime, st.st_size, p))
        total = sum(e[2] for e in entries)
        for _, _, size, p in sorted(entries, key=lambda e: (e[0], e[1])):  # oldest first, keep last
            if total <= self.max_bytes:
                break
            if _unlink(p):
                total -= size

    def clear(self) -> None:
        """Delete every entry of this folder (all versions), and its :class:`FileIndex`."""
        try:
            names = os.listdir(self.folder)
        except OSError:
            return
        for name in names:
            if name.endswith(_SUFFIX) and (_SHA256.match(name[:64]) or name.startswith(_TMP_PREFIX)):
                _unlink(self.folder / name)
        _unlink(self.folder / FileIndex.NAME)


class FileIndex:
    """The sha256 of LoRA files already read and found valid, by (real path, size, mtime in ns), in one small
    JSON file of ``folder``.

    A file whose size and mtime are those recorded is taken to hold the bytes that were hashed and checked
    then (as the webuis' own hash caches assume), so reading it again skips both. The newest
    ``max_entries`` files are kept. Like :class:`StatsCache` it is quiet: a missing, unreadable or corrupt
    index is empty, and a failed write only costs a hash later.
    """

    NAME = "files.json"

    def __init__(self, folder: str | os.PathLike[str], max_entries: int = 1024) -> None:
        self.path = Path(folder) / self.NAME
        self.max_entries = int(max_entries)

    @staticmethod
    def _key(path: str | os.PathLike[str]) -> str:
        return os.path.realpath(path)

    def _entries(self) -> dict[str, list]:
        try:
            doc = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return {}
        files = doc.get("files") if isinstance(doc, dict) and doc.get("format") == _INDEX_FORMAT else None
        return files if isinstance(files, dict) else {}

    def get(self, path: str | os.PathLike[str], st: os.stat_result) -> str | None:
        """The recorded sha256 of ``path`` if its stat ``st`` shows the recorded size and mtime, else None."""
        entry = self._entries().get(self._key(path))
        if (isinstance(entry, list) and len(entry) == 3 and entry[:2] == [st.st_size, st.st_mtime_ns]
                and is_sha256(entry[2])):
            return entry[2]
        return None

    def put(self, path: str | os.PathLike[str], st: os.stat_result, sha256: str) -> bool:
        """Record that ``path``, as ``st`` describes it, holds bytes with this sha256 and passed the checks.
        Returns whether the index was written."""
        if not is_sha256(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        files = self._entries()
        files.pop(self._key(path), None)  # re-inserted last: the newest entries are kept
        files[self._key(path)] = [st.st_size, st.st_mtime_ns, sha256]
        kept = dict(list(files.items())[-self.max_entries:])
        try:
            _write_atomic(self.path, json.dumps({"format": _INDEX_FORMAT, "files": kept}).encode("utf-8"))
        except OSError:
            return False
        return True


# ----------------------------------------------------------------------------------------------- format


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file of the same folder and ``os.replace``: readers see
    the old or the new file, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _unlink(p: Path) -> bool:
    try:
        p.unlink()
        return True
    except OSError:
        return False


def _checked(key: str, value: LayerStats | tuple[float, torch.Tensor, int]) -> LayerStats:
    l1, top, numel = value
    if not isinstance(top, torch.Tensor) or top.dim() != 1:
        raise ValueError(f"{key}: top must be a 1-D tensor")
    top = top.detach().to(device="cpu", dtype=torch.float32).contiguous()
    numel = int(numel)
    if numel < top.numel():
        raise ValueError(f"{key}: numel {numel} is smaller than the {top.numel()} top values")
    return LayerStats(float(l1), top, numel)


def _checksum(body: bytes | memoryview, meta: Mapping[str, str]) -> str:
    """blake2b of the data section and of every other metadata field."""
    h = hashlib.blake2b(body, digest_size=16)
    h.update(json.dumps({k: v for k, v in meta.items() if k != "checksum"}, sort_keys=True).encode("utf-8"))
    return h.hexdigest()


def _body(data: bytes) -> memoryview:
    """The data section of a safetensors file (after the 8-byte length and the JSON header)."""
    return memoryview(data)[8 + int.from_bytes(data[:8], "little"):]


def _encode(table: Mapping[str, LayerStats], sha256: str, version: str) -> bytes:
    from safetensors.torch import save

    keys = list(table)
    # the data section does not depend on the metadata: checksum it (with the metadata), then write it
    tensors = {
        "l1": torch.tensor([table[k].l1 for k in keys], dtype=torch.float64),
        "numel": torch.tensor([table[k].numel for k in keys], dtype=torch.int64),
        "length": torch.tensor([table[k].top.numel() for k in keys], dtype=torch.int64),
        "top": torch.cat([table[k].top for k in keys]) if keys else torch.zeros(0),
    }
    meta = {"format": _FORMAT, "version": version, "sha256": sha256, "keys": json.dumps(keys)}
    meta["checksum"] = _checksum(_body(save(tensors, metadata=meta)), meta)
    return save(tensors, metadata=meta)


def _decode(data: bytes, sha256: str, version: str) -> dict[str, LayerStats]:
    """The table in ``data``; raises on anything unexpected (the caller treats that as a miss)."""
    from safetensors.torch import load

    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    if meta.get("format") != _FORMAT or meta.get("version") != version or meta.get("sha256") != sha256:
        raise ValueError("foreign or stale entry")
    if meta.get("checksum") != _checksum(_body(data), meta):
        raise ValueError("checksum mismatch")
    tensors = load(data)
    l1, numel, length, top = (tensors[n] for n in ("l1", "numel", "length", "top"))
    keys = json.loads(meta["keys"])
    n = len(keys)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys) and len(set(keys)) == n):
        raise ValueError("bad keys")
    dtypes = (l1.dtype, numel.dtype, length.dtype, top.dtype)
    if dtypes != (torch.float64, torch.int64, torch.int64, torch.float32):
        raise ValueError("bad dtypes")
    if l1.shape != (n,) or numel.shape != (n,) or length.shape != (n,) or top.dim() != 1:
        raise ValueError("bad shapes")
    if bool((length < 0).any()) or bool((length > numel).any()) or int(length.sum()) != top.numel():
        raise ValueError("bad lengths")
    out: dict[str, LayerStats] = {}
    parts = torch.split(top, length.tolist())
    for key, a, c, part in zip(keys, l1.tolist(), numel.tolist(), parts, strict=True):
        out[key] = LayerStats(a, part, c)
    return out
