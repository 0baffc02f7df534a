"""Read LoRA files into canonical layers.

A canonical layer key names the patched module independently of the file's naming scheme:
``"<component>/<module path in diffusers/HF naming with '.' replaced by '_'>"``, for example
``unet/down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`` or
``te1/text_model_encoder_layers_0_self_attn_q_proj``. Components: ``unet`` (the denoiser), ``te1`` (SD1
text encoder / SDXL CLIP-L), ``te2`` (SDXL OpenCLIP bigG).

Files read (``.safetensors`` only, never unpickled):

* kohya-ss LoRA/LoCon: ``lora_unet_…`` (diffusers or SGM names), ``lora_te_``/``lora_te1_``/``lora_te2_``,
  ``.lora_down.weight``/``.lora_up.weight``/optional ``.lora_mid.weight``/``.alpha``;
* old diffusers: ``<module>.lora.down.weight``/``.lora.up.weight`` (prefix ``unet.unet.``, ``unet.`` or
  none; ``text_encoder.…lora_linear_layer``) and the attention-processor form
  ``….processor.to_q_lora.down.weight``;
* PEFT: ``lora_A``/``lora_B`` under ``unet.``/``text_encoder.``/``text_encoder_2.``/``transformer.``;
  alpha from the ``lora_adapter_metadata`` JSON (``lora_alpha``, ``alpha_pattern``, ``use_rslora``),
  else alpha = rank;
* LyCORIS LoHa (``hada_*``, Tucker ``hada_t1``/``hada_t2``), LoKr (``lokr_*``), full (``diff``/``diff_b``).

What ``LoraLayer.rank`` means (K = r_c·r_s uses it; ``scale`` = alpha/rank uses it too, so it is always
the dimension the hosts divide alpha by):

===========  ====================================  ==========================================
kind         rank                                  note
===========  ====================================  ==========================================
lora/LoCon   ``down.shape[0]``                     also with a Tucker ``mid``
LoHa         ``hada_w1_b.shape[0]`` (= r)          the Hadamard product can have rank up to r²;
                                                   r is the trained "dim", as for LoRA
LoKr         ``lokr_w1_b.shape[0]``, else          the decomposed factor's dim; ``None`` when w1
             ``lokr_w2_b.shape[0]``                and w2 are both stored full (scale 1, as A1111,
                                                   Forge and LyCORIS training)
full         ``None``                              no rank and no scale (delta = diff)
===========  ====================================  ==========================================

``LoraLayer.shape`` is the target weight's shape. LoHa/LoKr convolutions without a Tucker core store
the kernel flattened into the input dimension; the kernel is then taken from the layer name (3×3 for
the SD UNet's ``conv1``/``conv2``/``conv_in``/``conv_out``/down- and upsampler ``conv``; 1×1 for
``conv_shortcut``), otherwise the shape stays ``(out, in·kh·kw)`` (e.g. SD1.5's 1×1 ``proj_in``): consumers
reshape to the module's weight shape (same numel).

``LoraFile.layers`` is in forward-pass order (:func:`klora.keys.layer_order`), not the file's order.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open

from . import keys as _keys

LayerKind = Literal["lora", "loha", "lokr", "full"]


class LoraFormatError(ValueError):
    """A LoRA file we refuse to read, with the file, the offending key (if any) and the reason."""

    def __init__(self, path: str, reason: str, key: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.key = key
        where = f"{self.path}: {key}: " if key else f"{self.path}: "
        super().__init__(where + reason)


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One patched module of a LoRA file.

    ``tensors`` uses kind-specific names (fp32 or the file's dtype, on the CPU):
      lora: ``down``, ``up``, optional ``mid`` (LoCon Tucker/CP for convs)
      loha: ``w1a``, ``w1b``, ``w2a``, ``w2b``, optional ``t1``, ``t2``
      lokr: ``w1`` or ``w1a``+``w1b``; ``w2`` or ``w2a``+``w2b``; optional ``t2``
      full: ``diff``, optional ``diff_b``
    ``rank`` is what K = r_c·r_s uses (see README, "What rank means"); ``None`` where the kind has none.
    ``shape`` is the shape of the module weight the delta adds to.
    """

    key: str
    file_key: str
    kind: LayerKind
    tensors: dict[str, torch.Tensor]
    alpha: float | None
    rank: int | None
    shape: tuple[int, ...]

    @property
    def scale(self) -> float:
        """The factor the host multiplies the raw product by: alpha/rank, or 1 without alpha or rank."""
        if self.alpha is None or not self.rank or self.alpha == 0:
            return 1.0
        return self.alpha / self.rank


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A parsed LoRA file: canonical key → layer (in forward-pass order), plus what identifies the file."""

    path: str
    name: str
    sha256: str
    layers: dict[str, LoraLayer]
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

_PICKLE_EXTENSIONS = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
_MAX_HEADER = 100 * 1024 * 1024
_TORCH_FLOAT = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_DTYPE_SIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}

# Exact tensor-name suffixes we read: suffix → (family, role).
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_down.weight", "lora", "down"),
    (".lora_up.weight", "lora", "up"),
    (".lora_mid.weight", "lora", "mid"),
    (".lora_linear_layer.down.weight", "lora", "down"),
    (".lora_linear_layer.up.weight", "lora", "up"),
    (".lora.down.weight", "lora", "down"),
    (".lora.up.weight", "lora", "up"),
    (".lora_A.weight", "lora", "down"),
    (".lora_B.weight", "lora", "up"),
    (".hada_w1_a", "loha", "w1a"),
    (".hada_w1_b", "loha", "w1b"),
    (".hada_w2_a", "loha", "w2a"),
    (".hada_w2_b", "loha", "w2b"),
    (".hada_t1", "loha", "t1"),
    (".hada_t2", "loha", "t2"),
    (".lokr_w1", "lokr", "w1"),
    (".lokr_w1_a", "lokr", "w1a"),
    (".lokr_w1_b", "lokr", "w1b"),
    (".lokr_w2", "lokr", "w2"),
    (".lokr_w2_a", "lokr", "w2a"),
    (".lokr_w2_b", "lokr", "w2b"),
    (".lokr_t2", "lokr", "t2"),
    (".diff", "full", "diff"),
    (".diff_b", "full", "diff_b"),
    (".alpha", "", "alpha"),
)
# diffusers attention-processor LoRA: `<attn>.processor.to_q_lora.down.weight`; text encoders
# `self_attn.to_q_lora.down.weight`.
_PROCESSOR_RE = re.compile(
    r"^(?P<attn>.+?)(?:\.processor)?\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
# PEFT with a named adapter: `….lora_A.default.weight`.
_PEFT_NAMED_RE = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])\.[A-Za-z0-9_]+\.weight$")

# Tensor names of kinds we refuse: suffix → what it is.
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (".dora_scale", "DoRA (dora_scale)"),
    (".on_input", "IA3"),
    (".ia3_l", "IA3 (PEFT)"),
    (".oft_diag", "OFT (diag-OFT)"),
    (".rescale", "OFT (rescale)"),
    (".oft_r", "OFT (PEFT)"),
    (".oft_s", "OFT (PEFT)"),
    (".boft_R", "BOFT (PEFT)"),
    (".boft_s", "BOFT (PEFT)"),
    (".a1.weight", "GLoRA"),
    (".a2.weight", "GLoRA"),
    (".b1.weight", "GLoRA"),
    (".b2.weight", "GLoRA"),
    (".bm.weight", "GLoRA"),
    (".w_norm", "LyCORIS norm-layer delta (w_norm)"),
    (".b_norm", "LyCORIS norm-layer delta (b_norm)"),
    (".lora_B.bias", "LoRA with a bias (PEFT lora_bias)"),
    (".lora_up.bias", "LoRA with a bias"),
)
_SUPPORTED_TEXT = "K-LoRA reads LoRA/LoCon, LoHa, LoKr and full (diff) layers"
_IGNORED_PREFIXES = ("bundle_emb.",)  # textual-inversion embeddings bundled by kohya: not layer deltas

# 3×3 convs of SD/SDXL UNets (canonical names), for LoHa/LoKr files that flatten the kernel.
_CONV3_RE = re.compile(r"^unet/(?:.*_(?:conv1|conv2)|.*samplers_0_conv|conv_in|conv_out)$")


def _read_bytes(path: Path) -> bytearray:
    """The whole file, read once: it is hashed, its header validated and its weights checked from memory."""
    size = path.stat().st_size
    data = bytearray(size)
    with path.open("rb") as f:
        got = f.readinto(data)
    if got != size:
        raise OSError(f"read {got} of {size} bytes")
    return data


def _parse_header(p: str, data: bytearray) -> tuple[dict[str, dict], dict[str, str], int]:
    """Validate the safetensors container ourselves (for clear messages).

    Returns (tensor entries, metadata, offset of the data section)."""
    size = len(data)
    head = bytes(data[:8])
    if head[:4] == b"PK\x03\x04":
        raise LoraFormatError(p, "this is a zip/pickle checkpoint (torch.save), not safetensors; "
                                 "it is not opened because unpickling can run code — "
                                 "convert it to .safetensors")
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
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


def _nonfinite_reason(t: torch.Tensor) -> str | None:
    t = t.to(torch.float64 if t.dtype == torch.float64 else torch.float32)
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    n_nan = int(torch.isnan(t).sum())
    return (f"the weights contain {n_nan} NaN and {int(bad.sum()) - n_nan} Inf values "
            "(a broken training run or a bad conversion)")


def _check_finite(p: str, data: bytearray, data_start: int, header: dict[str, dict]) -> None:
    """Refuse NaN/Inf anywhere in the file's float tensors, naming the first tensor that has them.

    A LoRA file holds hundreds of small tensors; one reduction each costs more in per-op overhead (and in
    thread start-up on a busy CPU) than the arithmetic. safetensors stores tensors of one dtype
    back to back, so each contiguous same-dtype run of the data section is summed once, in place; only a
    run whose sum is not finite is examined tensor by tensor (a sum that overflowed on finite values
    passes there)."""
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
        td = _TORCH_FLOAT.get(dtype)
        if td is None:
            continue  # float8 is checked per tensor when loaded; integer tensors are refused there
        size = _DTYPE_SIZE[dtype]
        view = torch.frombuffer(data, dtype=td, count=(end - start) // size, offset=data_start + start)
        total = view.sum(dtype=torch.float64 if td == torch.float64 else torch.float32)
        if bool(torch.isfinite(total)):
            continue
        for key, a, b in members:
            t = torch.frombuffer(data, dtype=td, count=(b - a) // size, offset=data_start + a)
            reason = _nonfinite_reason(t)
            if reason:
                raise LoraFormatError(p, reason, key)


def _split_key(key: str) -> tuple[str, str, str, str] | None:
    """Tensor name → (file_key, family, role, module_path_override or '')."""
    m = _PROCESSOR_RE.match(key)
    if m:
        file_key = key[: -len(f".{m['role']}.weight")]
        return file_key, "lora", m["role"], f"{m['attn']}.{m['proj']}"
    for suffix, family, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], family, role, ""
    m = _PEFT_NAMED_RE.match(key)
    if m:
        return key[: m.start("ab") - len(".lora_")], "lora", "down" if m["ab"] == "A" else "up", ""
    return None


_DOTTED_PREFIXES: tuple[tuple[str, str, str], ...] = (
    # (file prefix, component, PEFT metadata prefix)
    ("unet.unet.", "unet", "unet"),
    ("unet.", "unet", "unet"),
    ("text_encoder_2.", "te2", "text_encoder_2"),
    ("text_encoder.", "te1", "text_encoder"),
    ("transformer.", "unet", "transformer"),
    ("model.diffusion_model.", "unet", ""),
    ("diffusion_model.", "unet", ""),
)
_KOHYA_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te1"),
    ("lycoris_", "unet"),
)
_TE_PROCESSOR_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _locate(file_key: str, module_override: str) -> tuple[str, str, str]:
    """file key → (component, module path below the component, PEFT metadata prefix).

    The path is dotted for diffusers/PEFT keys (as PEFT's ``alpha_pattern`` matches it) and flattened for
    kohya keys; :func:`klora.keys.canonical_key` accepts both."""
    for prefix, comp in _KOHYA_PREFIXES:
        if file_key.startswith(prefix):
            return comp, file_key[len(prefix):], ""
    path = module_override or file_key
    if path.startswith("base_model.model."):
        path = path[len("base_model.model."):]
    comp, meta_prefix = "", ""
    for prefix, c, mp in _DOTTED_PREFIXES:
        if path.startswith(prefix):
            comp, meta_prefix, path = c, mp, path[len(prefix):]
            break
    if not comp:
        comp = "te1" if path.startswith("text_model.") else "unet"
    if module_override:
        head, _, proj = path.rpartition(".")
        if comp == "unet":
            path = f"{head}.to_out.0" if proj == "to_out" else path
        else:
            path = f"{head}.{_TE_PROCESSOR_PROJ[proj]}"
    return comp, path, meta_prefix


class _PeftConfig:
    """Alpha from diffusers' ``lora_adapter_metadata`` JSON (PEFT LoraConfig.to_dict, optionally prefixed)."""

    def __init__(self, metadata: dict[str, str], path: str) -> None:
        self.path = path
        self.data: dict = {}
        raw = metadata.get("lora_adapter_metadata")
        if raw:
            try:
                data = json.loads(raw)
            except json.JSONDecodeError:
                raise LoraFormatError(path, "the lora_adapter_metadata entry is not valid JSON") from None
            if isinstance(data, dict):
                self.data = data

    def _get(self, prefix: str, name: str):
        if prefix and f"{prefix}.{name}" in self.data:
            return self.data[f"{prefix}.{name}"]
        return self.data.get(name)

    def alpha(self, prefix: str, module: str, rank: int) -> float | None:
        """PEFT's alpha for ``module`` (dotted path below the prefix), folded so alpha/rank = PEFT's scale."""
        if not self.data:
            return None
        alpha = self._get(prefix, "lora_alpha")
        pattern = self._get(prefix, "alpha_pattern") or {}
        if isinstance(pattern, dict):
            for pat, value in pattern.items():
                # PEFT matches a pattern against the end of the module name, at a '.' boundary.
                try:
                    hit = re.match(rf"(.*\.)?(?:{pat})$", module)
                except re.error as e:
                    raise LoraFormatError(self.path, f"lora_adapter_metadata: alpha_pattern {pat!r} is not "
                                                     f"a valid pattern ({e})") from None
                if hit:
                    alpha = value
                    break
        if alpha is None:
            return None
        try:
            alpha = float(alpha)
        except (TypeError, ValueError):
            alpha = math.nan
        if not math.isfinite(alpha):
            raise LoraFormatError(self.path, f"lora_adapter_metadata: the LoRA alpha of {module} is not a "
                                             f"finite number")
        if self._get(prefix, "use_rslora"):
            alpha *= math.sqrt(rank)  # PEFT rsLoRA: scale = lora_alpha / sqrt(r)
        return alpha


def _float_scalar(path: str, key: str, t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise LoraFormatError(path, f"alpha must be a single number, found shape {tuple(t.shape)}", key)
    v = float(t.reshape(()).float())
    if not math.isfinite(v):
        raise LoraFormatError(path, f"alpha is {v}", key)
    return v


def _name_kernel(key: str, out: int, flat_in: int) -> tuple[int, ...]:
    """Target shape of a conv whose kernel the file flattened into the input dimension."""
    if _CONV3_RE.match(key) and flat_in % 9 == 0:
        return (out, flat_in // 9, 3, 3)
    if key.startswith("unet/") and key.endswith("_conv_shortcut"):
        return (out, flat_in, 1, 1)
    return (out, flat_in)


def _build_layer(path: str, ckey: str, file_key: str, family: str, t: dict[str, torch.Tensor],
                 names: dict[str, str], alpha: float | None) -> LoraLayer:
    def need(*roles: str) -> None:
        missing = [r for r in roles if r not in t]
        if missing:
            raise LoraFormatError(path, f"incomplete {family} layer: missing {', '.join(missing)}", file_key)

    def bad(reason: str, role: str | None = None) -> LoraFormatError:
        return LoraFormatError(path, reason, names.get(role, file_key) if role else file_key)

    if family == "lora":
        need("down", "up")
        down, up, mid = t["down"], t["up"], t.get("mid")
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise bad(f"unsupported LoRA factor shapes down {tuple(down.shape)}, up {tuple(up.shape)}")
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise bad(f"mismatched ranks: down has {rank} rows, up has {up.shape[1]} columns")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise bad(f"unsupported LoRA up factor with a {tuple(up.shape[2:])} kernel", "up")
        if mid is not None:
            if (mid.dim() != 4 or mid.shape[0] != rank or mid.shape[1] != rank
                    or tuple(down.shape[2:]) != (1, 1)):
                raise bad(f"LoCon Tucker factors do not fit: down {tuple(down.shape)}, "
                          f"mid {tuple(mid.shape)}", "mid")
            shape = (up.shape[0], down.shape[1], *mid.shape[2:])
        else:
            shape = (up.shape[0], *down.shape[1:])
        return LoraLayer(ckey, file_key, "lora", t, alpha, int(rank), tuple(int(d) for d in shape))

    if family == "loha":
        need("w1a", "w1b", "w2a", "w2b")
        if ("t1" in t) != ("t2" in t):
            raise bad("LoHa Tucker layer needs both hada_t1 and hada_t2")
        w1a, w1b, w2a, w2b = t["w1a"], t["w1b"], t["w2a"], t["w2b"]
        rank = w1b.shape[0]
        if "t1" in t:
            t1, t2 = t["t1"], t["t2"]
            # Tucker layout: w*_a (r, out), w*_b (r, in), t (r, r, kh, kw).
            ok = (w1a.dim() == w1b.dim() == w2a.dim() == w2b.dim() == 2 and t1.dim() == t2.dim() >= 3
                  and w1a.shape[0] == t1.shape[0] and rank == t1.shape[1]
                  and w2a.shape[0] == t2.shape[0] and w2b.shape[0] == t2.shape[1]
                  and w1a.shape[1] == w2a.shape[1] and w1b.shape[1] == w2b.shape[1]
                  and t1.shape[2:] == t2.shape[2:])
            if not ok:
                raise bad("mismatched LoHa Tucker factor shapes")
            shape = (w1a.shape[1], w1b.shape[1], *t1.shape[2:])
        else:
            if w1a.dim() != 2 or w2a.dim() != 2:
                raise bad("unsupported LoHa factor shapes")
            if w1a.shape[1] != rank or w2a.shape[1] != w2b.shape[0]:
                raise bad(f"mismatched ranks: hada_w1_a {tuple(w1a.shape)}, hada_w1_b {tuple(w1b.shape)}, "
                          f"hada_w2_a {tuple(w2a.shape)}, hada_w2_b {tuple(w2b.shape)}")
            in1, in2 = math.prod(w1b.shape[1:]), math.prod(w2b.shape[1:])
            if w1a.shape[0] != w2a.shape[0] or in1 != in2:
                raise bad("the two LoHa products have different shapes")
            shape = (w1a.shape[0], *w1b.shape[1:]) if w1b.dim() > 2 else _name_kernel(ckey, w1a.shape[0], in1)
        return LoraLayer(ckey, file_key, "loha", t, alpha, int(rank), tuple(int(d) for d in shape))

    if family == "lokr":
        if "w1" not in t:
            need("w1a", "w1b")
        if "w2" not in t:
            need("w2a", "w2b")
        if "w1" in t:
            w1 = t["w1"]
            if w1.dim() != 2:
                raise bad(f"unsupported lokr_w1 shape {tuple(w1.shape)}", "w1")
            a, c = w1.shape
        else:
            w1a, w1b = t["w1a"], t["w1b"]
            if w1a.dim() != 2 or w1b.dim() != 2 or w1a.shape[1] != w1b.shape[0]:
                raise bad(f"mismatched ranks: lokr_w1_a {tuple(w1a.shape)}, lokr_w1_b {tuple(w1b.shape)}")
            a, c = w1a.shape[0], w1b.shape[1]
        kernel: tuple[int, ...] | None = None
        if "w2" in t:
            w2 = t["w2"]
            b, d = w2.shape[0], w2.shape[1]
            kernel = tuple(w2.shape[2:])
        elif "t2" in t:
            t2, w2a, w2b = t["t2"], t["w2a"], t["w2b"]
            # Tucker layout: w2_a (r, b), w2_b (r, d), t2 (r, r, kh, kw).
            if (t2.dim() < 3 or w2a.dim() != 2 or w2b.dim() != 2 or t2.shape[0] != w2a.shape[0]
                    or t2.shape[1] != w2b.shape[0]):
                raise bad("mismatched LoKr Tucker factor shapes")
            b, d = w2a.shape[1], w2b.shape[1]
            kernel = tuple(t2.shape[2:])
        else:
            w2a, w2b = t["w2a"], t["w2b"]
            if w2a.dim() != 2 or w2a.shape[1] != w2b.shape[0]:
                raise bad(f"mismatched ranks: lokr_w2_a {tuple(w2a.shape)}, lokr_w2_b {tuple(w2b.shape)}")
            b = w2a.shape[0]
            if w2b.dim() > 2:
                d, kernel = w2b.shape[1], tuple(w2b.shape[2:])
            else:
                d = w2b.shape[1]
        shape = (a * b, c * d, *kernel) if kernel is not None else _name_kernel(ckey, a * b, c * d)
        if "w1b" in t:
            rank: int | None = int(t["w1b"].shape[0])
        elif "w2b" in t:
            rank = int(t["w2b"].shape[0])
        else:
            rank = None
        return LoraLayer(ckey, file_key, "lokr", t, alpha, rank, tuple(int(x) for x in shape))

    # full
    need("diff")
    diff = t["diff"]
    if "diff_b" in t and (t["diff_b"].dim() != 1 or t["diff_b"].shape[0] != diff.shape[0]):
        raise bad(f"diff_b shape {tuple(t['diff_b'].shape)} does not fit diff {tuple(diff.shape)}", "diff_b")
    if diff.dim() not in (2, 4):
        raise bad(f"unsupported diff shape {tuple(diff.shape)}", "diff")
    return LoraLayer(ckey, file_key, "full", t, None, None, tuple(int(d) for d in diff.shape))


def read_lora(path: str | Path) -> LoraFile:
    """Read a ``.safetensors`` LoRA file into canonical layers, or raise :class:`LoraFormatError`.

    Tensors stay in the file's dtype (``delta`` computes in float32). The file is hashed (sha256 of its
    bytes) so that results can be cached by content.
    """
    p = Path(path)
    ps = str(path)
    if not p.exists():
        raise LoraFormatError(ps, "file not found")
    if not p.is_file():
        raise LoraFormatError(ps, "not a file")
    if p.suffix.lower() in _PICKLE_EXTENSIONS:
        raise LoraFormatError(ps, f"{p.suffix} files are pickled checkpoints; they are not opened because "
                                  "unpickling can run code — use the .safetensors version of this LoRA")
    try:
        data = _read_bytes(p)
    except OSError as e:
        raise LoraFormatError(ps, f"cannot read the file: {e.strerror or e}") from None
    header, metadata, data_start = _parse_header(ps, data)
    from . import flux  # flux builds on this module's types, so it is imported here, not at the top

    shapes = {k: v["shape"] for k, v in header.items() if not k.startswith(_IGNORED_PREFIXES)}
    if flux.looks_like_flux(shapes):
        return _read_flux(ps, p, data, data_start, header, metadata)

    # 1. Classify every tensor name before loading any data.
    groups: dict[str, dict] = {}
    unknown: list[str] = []
    for key in header:
        if key.startswith(_IGNORED_PREFIXES):
            continue
        for suffix, what in _UNSUPPORTED:
            if key.endswith(suffix):
                raise LoraFormatError(ps, f"unsupported LoRA type {what}; {_SUPPORTED_TEXT}", key)
        if ".lora_magnitude_vector" in key:
            raise LoraFormatError(ps, f"unsupported LoRA type DoRA (PEFT lora_magnitude_vector); "
                                      f"{_SUPPORTED_TEXT}", key)
        if key.endswith(".oft_blocks"):
            what = "BOFT" if len(header[key]["shape"]) == 4 else "OFT"
            raise LoraFormatError(ps, f"unsupported LoRA type {what}; {_SUPPORTED_TEXT}", key)
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        file_key, family, role, override = split
        g = groups.setdefault(file_key, {"families": set(), "roles": {}, "override": ""})
        if family:
            g["families"].add(family)
        if role in g["roles"]:
            raise LoraFormatError(ps, f"two tensors for {role} of one layer", key)
        g["roles"][role] = key
        g["override"] = g["override"] or override
    if not any(g["families"] for g in groups.values()):
        detail = f" (first tensor: {next(iter(header))})" if header else " (the file has no tensors)"
        raise LoraFormatError(ps, f"no LoRA layers found: not a LoRA file{detail}")
    if unknown:
        raise LoraFormatError(ps, f"unknown tensor, not part of a layer of a kind we read; {_SUPPORTED_TEXT}",
                              unknown[0])

    # 2. Check, load and assemble.
    _check_finite(ps, data, data_start, header)
    sha256 = hashlib.sha256(data).hexdigest()
    del data
    layers: dict[str, LoraLayer] = {}
    peft = _PeftConfig(metadata, ps)
    try:
        handle = safe_open(ps, framework="pt", device="cpu")
    except Exception as e:  # the safetensors library's own error type varies across versions
        raise LoraFormatError(ps, f"corrupt safetensors file: {e}") from None
    with handle as f:
        for file_key, g in groups.items():
            if not g["families"]:
                raise LoraFormatError(ps, "alpha without any LoRA factors", g["roles"]["alpha"])
            if len(g["families"]) > 1:
                raise LoraFormatError(ps, f"one layer mixes tensors of kinds {sorted(g['families'])}",
                                      file_key)
            family = next(iter(g["families"]))
            tensors: dict[str, torch.Tensor] = {}
            alpha: float | None = None
            for role, key in g["roles"].items():
                try:
                    tensor = f.get_tensor(key)
                except Exception as e:
                    raise LoraFormatError(ps, f"cannot read the tensor: {e}", key) from None
                if role == "alpha":
                    alpha = _float_scalar(ps, key, tensor)
                    continue
                if not tensor.is_floating_point():
                    raise LoraFormatError(ps, f"unsupported tensor dtype {tensor.dtype}", key)
                if tensor.dtype not in _TORCH_FLOAT.values():
                    reason = _nonfinite_reason(tensor)  # float8: not covered by the in-place check
                    if reason:
                        raise LoraFormatError(ps, reason, key)
                tensors[role] = tensor
            comp, module, meta_prefix = _locate(file_key, g["override"])
            ckey = _keys.canonical_key(comp, module)
            layer = _build_layer(ps, ckey, file_key, family, tensors, g["roles"], alpha)
            if alpha is None and family == "lora" and layer.rank:
                peft_alpha = peft.alpha(meta_prefix, module, layer.rank)
                if peft_alpha is not None:
                    layer = LoraLayer(ckey, file_key, "lora", tensors, peft_alpha, layer.rank, layer.shape)
            if ckey in layers:
                raise LoraFormatError(ps, f"two entries for the same layer {ckey} "
                                          f"(also {layers[ckey].file_key})", file_key)
            layers[ckey] = layer
    ordered = {k: layers[k] for k in sorted(layers, key=_keys.layer_order)}
    return LoraFile(path=ps, name=p.stem, sha256=sha256, layers=ordered, metadata=metadata)


def _read_flux(ps: str, p: Path, data: bytearray, data_start: int, header: dict[str, dict],
               metadata: dict[str, str]) -> LoraFile:
    """A Flux LoRA (BFL, kohya, diffusers/PEFT or XLabs spelling): its keys are read by :mod:`klora.flux`."""
    from . import flux

    _check_finite(ps, data, data_start, header)
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        with safe_open(ps, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in header if not k.startswith(_IGNORED_PREFIXES)}
    except Exception as e:  # the safetensors library's own error type varies across versions
        raise LoraFormatError(ps, f"corrupt safetensors file: {e}") from None
    layers = flux.read_flux_layers(tensors, metadata, ps)
    if not layers:
        raise LoraFormatError(ps, "no LoRA layers found in this Flux file")
    return LoraFile(path=ps, name=p.stem, sha256=sha256, layers=layers, metadata=metadata)
