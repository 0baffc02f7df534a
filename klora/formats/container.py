"""The safetensors container, checked by hand for clear messages: the bytes, the header, NaN/Inf, the hash.

The whole file is read once: it is hashed, its header validated and its weights checked from memory, then
tensors are taken from it with ``safetensors``. Pickled checkpoints are recognised by their first bytes and
never opened (unpickling can run code).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import time
from pathlib import Path

import torch

from klora.layers import LoraFormatError

PICKLE_EXTENSIONS = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"})
_MAX_HEADER = 100 * 1024 * 1024
TORCH_FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_TORCH_DTYPE = {
    **TORCH_FLOAT, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_SIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}


def check_path(p: Path) -> None:
    """Refuse a missing path, a folder, and pickle extensions before reading anything."""
    if not p.exists():
        raise LoraFormatError(str(p), "file not found")
    if not p.is_file():
        raise LoraFormatError(str(p), "not a file")
    if p.suffix.lower() in PICKLE_EXTENSIONS:
        raise LoraFormatError(str(p), f"{p.suffix} files are pickled checkpoints; they are not opened "
                                      "because unpickling can run code — use the .safetensors version of "
                                      "this LoRA")


def stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as e:
        raise LoraFormatError(str(path), f"cannot read the file: {e.strerror or e}") from None


#: A file modified less than this long ago may still be being written within one tick of its mtime, so its
#: (size, mtime) cannot yet vouch for its bytes (git's "racy" rule).
SETTLE_NS = 2 * 10**9


def settled(path: Path, before: os.stat_result) -> bool:
    """Whether ``path`` still has the size and mtime of ``before`` (it was not written while being read), and
    that mtime is :data:`SETTLE_NS` old: then (size, mtime) identify the bytes just read."""
    try:
        now = path.stat()
    except OSError:
        return False
    same = (now.st_size, now.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    return same and time.time_ns() - before.st_mtime_ns >= SETTLE_NS


def read_bytes(path: Path) -> bytearray:
    """The whole file, read once (:class:`LoraFormatError` if it cannot be read)."""
    try:
        size = path.stat().st_size
        data = bytearray(size)
        with path.open("rb") as f:
            got = f.readinto(data)
    except OSError as e:
        raise LoraFormatError(str(path), f"cannot read the file: {e.strerror or e}") from None
    if got != size:
        raise LoraFormatError(str(path), f"cannot read the file: read {got} of {size} bytes")
    return data


def sha256(data: bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_header(p: str, data: bytearray) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, offset of the data section) of a safetensors file, validated."""
    size = len(data)
    head = bytes(data[:8])
    if head[:4] == b"PK\x03\x04":
        raise LoraFormatError(p, "this is a zip/pickle checkpoint (torch.save), not safetensors; "
                                 "it is not opened because unpickling can run code — "
                                 "convert it to .safetensors")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and data[8:9] != b"{":
        # a pickle's protocol opcode; a safetensors header length of 640–1408 bytes starts alike, but then
        # its JSON header follows at byte 8
        raise LoraFormatError(p, "this is a pickle file, not safetensors; it is not opened because "
                                 "unpickling can run code — convert it to .safetensors")
    if len(head) < 8:
        raise LoraFormatError(p, f"not a safetensors file: only {size} bytes")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
        raise LoraFormatError(p, f"corrupt or truncated safetensors file: header length {n} exceeds the "
                                 f"file size {size}")
    if n > _MAX_HEADER:
        raise LoraFormatError(p, f"corrupt safetensors file: header length {n} is implausible")
    try:
        header = json.loads(bytes(data[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraFormatError(p, f"corrupt safetensors file: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise LoraFormatError(p, "corrupt safetensors file: the header is not a JSON object")
    meta_raw = header.pop("__metadata__", None) or {}
    metadata = {str(k): str(v) for k, v in meta_raw.items()} if isinstance(meta_raw, dict) else {}
    data_size = size - 8 - n
    for key, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = math.prod(int(d) for d in shape)
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise LoraFormatError(p, "corrupt safetensors file: malformed tensor entry", key) from None
        if end > data_size or start > end or start < 0:
            raise LoraFormatError(p, f"corrupt or truncated safetensors file: the tensor's data ends at byte "
                                     f"{end} of the data section, which has only {data_size} bytes", key)
        itemsize = _DTYPE_SIZE.get(dtype)
        if itemsize is not None and end - start != numel * itemsize:
            raise LoraFormatError(p, f"corrupt safetensors file: {end - start} data bytes for a {dtype} "
                                     f"tensor of shape {tuple(shape)}", key)
    return header, metadata, 8 + n


def tensor(p: str, data: bytearray, data_start: int, name: str, entry: dict) -> torch.Tensor:
    """The tensor ``name`` of a checked header, read from the file's bytes already in memory (no second read
    of the file): a view of ``data`` where its offset suits the dtype, else a copy."""
    dtype = _TORCH_DTYPE.get(entry["dtype"])
    if dtype is None:
        raise LoraFormatError(p, f"unsupported tensor dtype {entry['dtype']}", name)
    start, end = (int(x) for x in entry["data_offsets"])
    shape = tuple(int(d) for d in entry["shape"])
    size = torch.empty((), dtype=dtype).element_size()
    if end == start:
        return torch.empty(shape, dtype=dtype)
    flat = torch.frombuffer(data, dtype=dtype, count=(end - start) // size, offset=data_start + start)
    if (data_start + start) % size:  # misaligned for its dtype (not written by the safetensors library)
        flat = flat.clone()
    return flat.reshape(shape)


def nonfinite_reason(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be used (how many NaN and Inf it holds), or None when every value is finite."""
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    n_nan = int(torch.isnan(t).sum())
    return (f"the weights contain {n_nan} NaN and {int(bad.sum()) - n_nan} Inf values "
            "(a broken training run or a bad conversion)")


#: Entries summed per op by :func:`check_finite`: a half-precision slice and its float32 copy stay in a CPU's
#: L2 cache, and the copy never grows with the file.
_FINITE_CHUNK = 1 << 18


def _run_is_finite(view: torch.Tensor) -> bool:
    """Whether the float32 (float64 for float64) sum of ``view`` is finite, summed slice by slice."""
    acc = torch.float64 if view.dtype == torch.float64 else torch.float32
    if view.dtype == acc:
        return bool(torch.isfinite(view.sum()))
    # Python floats: a 0-dim result of a casting sum can keep its slice's float32 copy alive.
    chunks = range(0, view.numel(), _FINITE_CHUNK)
    total = sum(float(view[i:i + _FINITE_CHUNK].sum(dtype=acc)) for i in chunks)
    return math.isfinite(total)


def check_finite(p: str, data: bytearray, data_start: int, header: dict[str, dict]) -> None:
    """Refuse NaN/Inf anywhere in the file's float tensors, naming the first tensor that has them.

    A LoRA file holds hundreds of small tensors; one reduction each costs more in per-op overhead (and in
    thread start-up on a busy CPU) than the arithmetic. safetensors stores tensors of one dtype
    back to back, so each contiguous same-dtype run of the data section is summed once, in place; only a
    run whose sum is not finite is examined tensor by tensor (a sum that overflowed on finite values
    passes there). float8 tensors are checked one by one when loaded (:func:`nonfinite_reason`)."""
    entries = sorted((e["data_offsets"][0], e["data_offsets"][1], e["dtype"], k) for k, e in header.items())
    runs: list[list] = []  # [dtype, start, end, [(key, start, end)]]
    for start, end, dtype, key in entries:
        if end == start:
            continue
        if runs and runs[-1][0] == dtype and runs[-1][2] == start:
            runs[-1][2] = end
            runs[-1][3].append((key, start, end))
        else:
            runs.append([dtype, start, end, [(key, start, end)]])
    for dtype, start, end, members in runs:
        td = TORCH_FLOAT.get(dtype)
        if td is None:
            continue
        size = _DTYPE_SIZE[dtype]
        view = torch.frombuffer(data, dtype=td, count=(end - start) // size, offset=data_start + start)
        if _run_is_finite(view):
            continue
        for key, a, b in members:
            t = torch.frombuffer(data, dtype=td, count=(b - a) // size, offset=data_start + a)
            reason = nonfinite_reason(t)
            if reason:
                raise LoraFormatError(p, reason, key)
