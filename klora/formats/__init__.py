"""Read LoRA files into canonical layers: one reader, several naming schemes.

``read_lora(path)`` reads a ``.safetensors`` file (never a pickle, :mod:`klora.formats.container`), picks the
naming scheme that claims it (:mod:`klora.formats.dit` for Z-Image, Qwen-Image and Wan,
:mod:`klora.formats.flux`, else :mod:`klora.formats.sd`), splits every tensor
name into (layer, role) by the kinds' suffixes (:mod:`klora.kinds`), refuses what it cannot read faithfully
(with the file, the tensor and the reason), checks every float for NaN/Inf, builds each layer through its kind
(alpha from the file's ``.alpha`` tensor, else from PEFT metadata, :mod:`klora.formats.peft`) and lets the
scheme place it under its canonical key(s). ``LoraFile.layers`` is in forward-pass order
(:func:`klora.keys.layer_order`), not the file's.

What ``LoraLayer.rank`` means (K = r_c·r_s uses it; ``scale`` = alpha/rank too, so it is always the dimension
the hosts divide alpha by): the ``down`` rows for LoRA/LoCon (also with a Tucker ``mid``), ``hada_w1_b``'s
rows for LoHa (the trained dim), the decomposed factor's dim for LoKr (None when both factors are full),
None for full layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from klora import keys, kinds
from klora.diskcache import FileIndex
from klora.formats import container
from klora.formats.dit import DitScheme
from klora.formats.flux import FluxScheme
from klora.formats.peft import PeftConfig
from klora.formats.scheme import Scheme, Split, split_tensor_name
from klora.formats.sd import SdScheme
from klora.keys import sd as sd_keys
from klora.layers import LoraFile, LoraFormatError, LoraLayer

__all__ = ["SCHEMES", "LoraFile", "LoraFormatError", "LoraLayer", "read_lora"]

SCHEMES: tuple[Scheme, ...] = (*(DitScheme(family) for family in keys.DIT_FAMILIES), FluxScheme(), SdScheme())
"""Tried in order; the first that claims a file reads it (the SD scheme claims every file). The DiT families'
schemes claim only by names no other family has, so they go first; a Qwen-Image file with attention layers
only is read by the Flux scheme, which gives its layers the same canonical keys."""

# Tensor names of kinds we refuse in every scheme: suffix → what it is.
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


def _unsupported(name: str, shape: list[int]) -> str | None:
    for suffix, what in _UNSUPPORTED:
        if name.endswith(suffix):
            return f"unsupported LoRA type {what}; {_SUPPORTED_TEXT}"
    if ".lora_magnitude_vector" in name:
        return f"unsupported LoRA type DoRA (PEFT lora_magnitude_vector); {_SUPPORTED_TEXT}"
    if name.endswith(".oft_blocks"):
        return f"unsupported LoRA type {'BOFT' if len(shape) == 4 else 'OFT'}; {_SUPPORTED_TEXT}"
    return None


def _split(scheme: Scheme, name: str) -> tuple[Split, str] | None:
    """(split, kind) of a tensor name; kind "" for ``.alpha``."""
    split = scheme.split(name)
    if split is not None:
        return split, "lora"
    found = split_tensor_name(name)
    if found is None:
        return None
    module, kind, role = found
    return Split(module, role), kind


@dataclass
class _Group:
    """The tensors of one layer in the file: role → tensor name."""

    kinds: set[str] = field(default_factory=set)
    roles: dict[str, str] = field(default_factory=dict)
    module: str = ""


def _scalar(path: str, name: str, t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise LoraFormatError(path, f"alpha must be a single number, found shape {tuple(t.shape)}", name)
    v = float(t.reshape(()).float())
    if v != v or v in (float("inf"), float("-inf")):
        raise LoraFormatError(path, f"alpha is {v}", name)
    return v


def read_lora(path: str | Path, index: FileIndex | None = None) -> LoraFile:
    """Read a ``.safetensors`` LoRA file into canonical layers, or raise :class:`LoraFormatError`.

    Tensors stay in the file's dtype (consumers compute in float32). The file is read once: its bytes are
    hashed (sha256, so that results can be cached by content), checked, and the tensors are views of them.
    With an ``index`` (:class:`klora.diskcache.FileIndex`), a file it lists unchanged since it was last read
    and found valid is not hashed or checked for NaN/Inf again, and a newly read one is recorded.
    """
    p, ps = Path(path), str(path)
    container.check_path(p)
    before = container.stat(p)
    known = index.get(p, before) if index is not None else None
    data = container.read_bytes(p)
    if known is not None and not container.settled(p, before):
        known = None  # written while we read it: hash and check what was read
    header, metadata, data_start = container.parse_header(ps, data)
    names = [k for k in header if not k.startswith(_IGNORED_PREFIXES)]
    shapes = {n: header[n]["shape"] for n in names}
    scheme = next(s for s in SCHEMES if s.claims(shapes))

    # 1. Classify every tensor name before loading any data.
    groups: dict[str, _Group] = {}
    unknown: list[str] = []
    for name in names:
        reason = scheme.refuse(name) or _unsupported(name, header[name]["shape"])
        if reason:
            raise LoraFormatError(ps, reason, name)
        found = _split(scheme, name)
        if found is None:
            unknown.append(name)
            continue
        split, kind = found
        g = groups.setdefault(split.file_key, _Group())
        if kind:
            g.kinds.add(kind)
        if split.role in g.roles:
            raise LoraFormatError(ps, f"two tensors for {split.role} of one layer", name)
        g.roles[split.role] = name
        g.module = g.module or split.module
    if not any(g.kinds for g in groups.values()):
        detail = f" (first tensor: {next(iter(header))})" if header else " (the file has no tensors)"
        raise LoraFormatError(ps, f"no LoRA layers found: not a LoRA file{detail}")
    if unknown:
        raise LoraFormatError(ps, f"unknown tensor, not part of a layer of a kind we read; {_SUPPORTED_TEXT}",
                              unknown[0])

    # 2. Check, load and assemble.
    if known is None:
        container.check_finite(ps, data, data_start, header)
    sha256 = known or container.sha256(data)
    peft = PeftConfig(metadata, ps)
    layers: dict[str, LoraLayer] = {}

    def load(name: str) -> torch.Tensor:  # the tensors are views of the bytes read and hashed above
        return container.tensor(ps, data, data_start, name, header[name])

    for file_key, g in groups.items():
        for layer in _layer(ps, scheme, peft, load, file_key, g):
            if layer.key in layers:
                raise LoraFormatError(ps, f"two entries for the same layer {layer.key} "
                                          f"(also {layers[layer.key].file_key})", layer.file_key)
            layers[layer.key] = layer
    ordered = {k: layers[k] for k in sorted(layers, key=keys.layer_order)}
    if index is not None and known is None and container.settled(p, before):
        index.put(p, before, sha256)
    return LoraFile(path=ps, name=p.stem, sha256=sha256, layers=ordered, metadata=metadata)


def _layer(ps: str, scheme: Scheme, peft: PeftConfig, load: Callable[[str], torch.Tensor], file_key: str,
           g: _Group) -> list[LoraLayer]:
    if not g.kinds:
        raise LoraFormatError(ps, "alpha without any LoRA factors", g.roles["alpha"])
    if len(g.kinds) > 1:
        raise LoraFormatError(ps, f"one layer mixes tensors of kinds {sorted(g.kinds)}", file_key)
    kind = kinds.KINDS[next(iter(g.kinds))]
    tensors: dict[str, torch.Tensor] = {}
    alpha: float | None = None
    for role, name in g.roles.items():
        tensor = load(name)
        if role == "alpha":
            alpha = _scalar(ps, name, tensor)
            continue
        if not tensor.is_floating_point():
            raise LoraFormatError(ps, f"unsupported tensor dtype {tensor.dtype}", name)
        if tensor.dtype not in container.TORCH_FLOAT.values():
            reason = container.nonfinite_reason(tensor)  # float8: not covered by the in-place check
            if reason:
                raise LoraFormatError(ps, reason, name)
        tensors[role] = tensor
    located = scheme.locate(file_key, g.module)
    if located is None:
        raise LoraFormatError(ps, f"names no module of a {scheme.name} model that K-LoRA knows", file_key)
    key = keys.canonical_key(located.component, located.module)
    layer = kind.build(ps, key, file_key, tensors, g.roles, alpha,
                       lambda out, flat_in: sd_keys.flattened_conv_shape(key, out, flat_in))
    if alpha is None and layer.rank and kind.name == "lora":
        peft_alpha = peft.alpha(located.peft_prefix, located.peft_module or located.module, layer.rank)
        if peft_alpha is not None:
            layer = LoraLayer(key, file_key, layer.kind, tensors, peft_alpha, layer.rank, layer.shape)
    return scheme.finish(layer, located, ps)
