"""Flux LoRA keys: every spelling in the wild → canonical layers, and canonical layers → BFL modules.

Canonical Flux keys use the component ``transformer`` and diffusers module names with '.' → '_'
(``transformer/transformer_blocks_0_attn_to_q``, ``transformer/single_transformer_blocks_3_proj_mlp``).
Text-encoder layers of Flux files use ``te1`` (CLIP-L, HF names) and ``te3`` (T5-XXL, HF names).

Files written for BFL-native hosts (kohya/sd-scripts, ai-toolkit BFL exports, XLabs) patch the *fused*
BFL modules: ``double_blocks.N.img_attn.qkv`` holds q, k, v of the image stream in its output rows
[0:H], [H:2H], [2H:3H]; ``txt_attn.qkv`` the same for the text stream (diffusers ``add_{q,k,v}_proj``);
``single_blocks.N.linear1`` holds q, k, v and then the MLP input projection (``proj_mlp``) in
3H + 4H rows. Such a layer is read under a canonical key of the fused module
(``transformer/double_blocks_0_img_attn_qkv``) and then split into the diffusers row slices: the up
matrix's rows are divided, the down matrix is shared, and alpha and rank are kept, so each slice's delta
is exactly the matching rows of the fused delta. By default :func:`read_flux_layers` returns split
layers, so every Flux file of every spelling lands on the same diffusers granularity, and a content and a
style LoRA are always compared per q, k, v, proj_mlp (as the official K-LoRA code, which works on
diffusers modules).

One module has a different *row order* in the two namings: diffusers ``norm_out.linear`` is
(scale, shift) where BFL ``final_layer.adaLN_modulation.1`` is (shift, scale). Its canonical key is the
BFL one, ``transformer/final_layer_adaLN_modulation_1``; diffusers files are converted by swapping the
halves of the up rows.

This module is pure: torch only, no webui.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from klora.formats import LoraFormatError, LoraLayer

COMPONENT = "transformer"
FLUX_HIDDEN = 3072
FLUX_MLP_HIDDEN = 12288

# ----------------------------------------------------------------------------------------------------
# Module names

# diffusers sub-module of transformer_blocks.N (underscored) → (BFL sub-module of double_blocks.N, part)
# part: index of the H-row slice of a fused qkv (0, 1, 2), or None for the whole module.
_DOUBLE: dict[str, tuple[str, int | None]] = {
    "attn_to_q": ("img_attn.qkv", 0),
    "attn_to_k": ("img_attn.qkv", 1),
    "attn_to_v": ("img_attn.qkv", 2),
    "attn_add_q_proj": ("txt_attn.qkv", 0),
    "attn_add_k_proj": ("txt_attn.qkv", 1),
    "attn_add_v_proj": ("txt_attn.qkv", 2),
    "attn_to_out_0": ("img_attn.proj", None),
    "attn_to_add_out": ("txt_attn.proj", None),
    "ff_net_0_proj": ("img_mlp.0", None),
    "ff_net_2": ("img_mlp.2", None),
    "ff_context_net_0_proj": ("txt_mlp.0", None),
    "ff_context_net_2": ("txt_mlp.2", None),
    "norm1_linear": ("img_mod.lin", None),
    "norm1_context_linear": ("txt_mod.lin", None),
}
# diffusers sub-module of single_transformer_blocks.N → (BFL sub-module of single_blocks.N, part);
# part 3 = the MLP rows of linear1 (after the 3H qkv rows).
_SINGLE: dict[str, tuple[str, int | None]] = {
    "attn_to_q": ("linear1", 0),
    "attn_to_k": ("linear1", 1),
    "attn_to_v": ("linear1", 2),
    "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None),
    "norm_linear": ("modulation.lin", None),
}
# top-level diffusers module (underscored) → BFL module
_TOP: dict[str, str] = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "proj_out": "final_layer.linear",
    "time_text_embed_timestep_embedder_linear_1": "time_in.in_layer",
    "time_text_embed_timestep_embedder_linear_2": "time_in.out_layer",
    "time_text_embed_text_embedder_linear_1": "vector_in.in_layer",
    "time_text_embed_text_embedder_linear_2": "vector_in.out_layer",
    "time_text_embed_guidance_embedder_linear_1": "guidance_in.in_layer",
    "time_text_embed_guidance_embedder_linear_2": "guidance_in.out_layer",
}
_FINAL_MOD = "final_layer_adaLN_modulation_1"  # canonical key (BFL row order), see the module docstring
_NORM_OUT = "norm_out_linear"  # its diffusers spelling (scale, shift)

# fused BFL modules (underscored sub-module) → the diffusers children in row order
_FUSED_DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn_qkv": ("attn_to_q", "attn_to_k", "attn_to_v"),
    "txt_attn_qkv": ("attn_add_q_proj", "attn_add_k_proj", "attn_add_v_proj"),
}
_FUSED_SINGLE: dict[str, tuple[str, ...]] = {"linear1": ("attn_to_q", "attn_to_k", "attn_to_v", "proj_mlp")}

_BFL_DOUBLE_TO_DIFFUSERS = {bfl.replace(".", "_"): d for d, (bfl, part) in _DOUBLE.items() if part is None}
_BFL_SINGLE_TO_DIFFUSERS = {bfl.replace(".", "_"): d for d, (bfl, part) in _SINGLE.items() if part is None}
_BFL_TOP_TO_DIFFUSERS = {bfl.replace(".", "_"): d for d, bfl in _TOP.items()}

_RE_DIFF_DOUBLE = re.compile(r"^transformer_blocks_(\d+)_(.+)$")
_RE_DIFF_SINGLE = re.compile(r"^single_transformer_blocks_(\d+)_(.+)$")
_RE_BFL_DOUBLE = re.compile(r"^double_blocks_(\d+)_(.+)$")
_RE_BFL_SINGLE = re.compile(r"^single_blocks_(\d+)_(.+)$")
_RE_XLABS = re.compile(
    r"^(double_blocks|single_blocks)\.(\d+)\.processor\."
    r"(qkv_lora1|qkv_lora2|proj_lora1|proj_lora2|qkv_lora|proj_lora)$"
)


@dataclass(frozen=True)
class BflSlice:
    """Where a canonical Flux layer lands in a BFL-named Flux model (Forge's, ComfyUI's).

    ``module``: dotted path below the diffusion model, e.g. ``double_blocks.3.img_attn.qkv``;
    ``rows``: the output-row slice of a fused module, or None for the whole module.
    """

    module: str
    rows: slice | None = None


def _part_rows(part: int, hidden: int, mlp_hidden: int) -> slice:
    if part < 3:
        return slice(part * hidden, (part + 1) * hidden)
    return slice(3 * hidden, 3 * hidden + mlp_hidden)


def bfl_target(key: str, hidden: int = FLUX_HIDDEN, mlp_hidden: int = FLUX_MLP_HIDDEN) -> BflSlice | None:
    """The BFL module (and output rows) of a canonical Flux key; None when it is not a Flux module.

    Fused canonical keys (``double_blocks_N_img_attn_qkv``, ``single_blocks_N_linear1``) map to the
    whole fused module.
    """
    component, _, name = key.partition("/")
    if component != COMPONENT:
        return None
    if m := _RE_DIFF_DOUBLE.match(name):
        entry = _DOUBLE.get(m.group(2))
        if entry is None:
            return None
        sub, part = entry
        return BflSlice(
            f"double_blocks.{m.group(1)}.{sub}",
            None if part is None else _part_rows(part, hidden, mlp_hidden),
        )
    if m := _RE_DIFF_SINGLE.match(name):
        entry = _SINGLE.get(m.group(2))
        if entry is None:
            return None
        sub, part = entry
        return BflSlice(
            f"single_blocks.{m.group(1)}.{sub}",
            None if part is None else _part_rows(part, hidden, mlp_hidden),
        )
    if m := _RE_BFL_DOUBLE.match(name):
        if m.group(2) in _FUSED_DOUBLE:
            return BflSlice(f"double_blocks.{m.group(1)}.{m.group(2).replace('_attn_', '_attn.')}")
        return None
    if m := _RE_BFL_SINGLE.match(name):
        if m.group(2) in _FUSED_SINGLE:
            return BflSlice(f"single_blocks.{m.group(1)}.{m.group(2)}")
        return None
    if name in _TOP:
        return BflSlice(_TOP[name])
    if name == _FINAL_MOD:
        return BflSlice("final_layer.adaLN_modulation.1")
    return None


def diffusers_module_name(key: str) -> str | None:
    """The dotted module path in diffusers' ``FluxTransformer2DModel`` of a canonical key.

    None for keys with no single diffusers module: fused BFL keys (split them first) and the final
    modulation (diffusers' ``norm_out.linear`` has the two halves of its rows swapped).
    """
    component, _, name = key.partition("/")
    if component != COMPONENT:
        return None
    if m := _RE_DIFF_DOUBLE.match(name):
        sub = m.group(2)
        return f"transformer_blocks.{m.group(1)}.{_DIFFUSERS_DOTTED[sub]}" if sub in _DOUBLE else None
    if m := _RE_DIFF_SINGLE.match(name):
        sub = m.group(2)
        return f"single_transformer_blocks.{m.group(1)}.{_DIFFUSERS_DOTTED[sub]}" if sub in _SINGLE else None
    if name in _TOP:
        return _DIFFUSERS_DOTTED[name]
    return None


_DIFFUSERS_DOTTED = {
    "attn_to_q": "attn.to_q",
    "attn_to_k": "attn.to_k",
    "attn_to_v": "attn.to_v",
    "attn_add_q_proj": "attn.add_q_proj",
    "attn_add_k_proj": "attn.add_k_proj",
    "attn_add_v_proj": "attn.add_v_proj",
    "attn_to_out_0": "attn.to_out.0",
    "attn_to_add_out": "attn.to_add_out",
    "ff_net_0_proj": "ff.net.0.proj",
    "ff_net_2": "ff.net.2",
    "ff_context_net_0_proj": "ff_context.net.0.proj",
    "ff_context_net_2": "ff_context.net.2",
    "norm1_linear": "norm1.linear",
    "norm1_context_linear": "norm1_context.linear",
    "proj_mlp": "proj_mlp",
    "proj_out": "proj_out",
    "norm_linear": "norm.linear",
    "x_embedder": "x_embedder",
    "context_embedder": "context_embedder",
    "time_text_embed_timestep_embedder_linear_1": "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed_timestep_embedder_linear_2": "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed_text_embedder_linear_1": "time_text_embed.text_embedder.linear_1",
    "time_text_embed_text_embedder_linear_2": "time_text_embed.text_embedder.linear_2",
    "time_text_embed_guidance_embedder_linear_1": "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed_guidance_embedder_linear_2": "time_text_embed.guidance_embedder.linear_2",
}


def is_fused_key(key: str) -> bool:
    """True for canonical keys of fused BFL modules (split them with :func:`split_fused_layer`)."""
    component, _, name = key.partition("/")
    if component != COMPONENT:
        return False
    if m := _RE_BFL_DOUBLE.match(name):
        return m.group(2) in _FUSED_DOUBLE
    if m := _RE_BFL_SINGLE.match(name):
        return m.group(2) in _FUSED_SINGLE
    return False


# ----------------------------------------------------------------------------------------------------
# Reading

# (suffix, role); order matters: longer spellings first.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".down.weight", "down"),  # XLabs (checked: only with ".processor.")
    (".up.weight", "up"),
    (".alpha", "alpha"),
)
# markers of kinds and variants we refuse (regex searched in the file key), with the reason shown
_REFUSED: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), reason)
    for pattern, reason in (
        (r"\.dora_scale$|\.lora_magnitude_vector", "DoRA layers are not supported"),
        (r"\.hada_", "LyCORIS LoHa is not supported for Flux"),
        (r"\.lokr_", "LyCORIS LoKr is not supported for Flux"),
        (r"\.oft_|\.boft_", "OFT is not supported"),
        (r"\.diff(_b)?$", "full-weight (diff) layers are not supported for Flux"),
        (r"\.lora_mid\.weight$", "Tucker (lora_mid) layers are not supported for Flux"),
        (r"\.lora_[AB]\.bias$", "bias LoRAs (BFL control LoRAs such as Canny/Depth) are not supported"),
        (r"\.set_weight$|_norm\.scale$", "weight replacement (BFL control LoRAs) is not supported"),
    )
)
_IGNORED_PREFIXES = ("bundle_emb.",)  # textual-inversion embeddings bundled by kohya: not layer deltas
_RE_FLUX_BLOCK = re.compile(r"(^|[._])(double_blocks|single_blocks|single_transformer_blocks)[._]\d")


def _split_suffix(file_key: str) -> tuple[str, str] | None:
    for suffix, role in _SUFFIXES:
        if file_key.endswith(suffix):
            module = file_key[: -len(suffix)]
            if suffix in (".down.weight", ".up.weight") and ".processor." not in module:
                return None
            return module, role
    return None


@dataclass(frozen=True)
class _Resolved:
    component: str
    name: str  # canonical name below the component
    how: str  # "plain" | "fused" | "qkv3" (XLabs single-block qkv: the first 3H rows of linear1) | "swap"


def _strip(s: str, *prefixes: str) -> str | None:
    for p in prefixes:
        if s.startswith(p):
            return s[len(p) :]
    return None


def _resolve_transformer(name: str) -> _Resolved | None:
    """``name``: underscored module path below the transformer, diffusers or BFL naming."""
    if m := _RE_DIFF_DOUBLE.match(name):
        return _Resolved(COMPONENT, name, "plain") if m.group(2) in _DOUBLE else None
    if m := _RE_DIFF_SINGLE.match(name):
        return _Resolved(COMPONENT, name, "plain") if m.group(2) in _SINGLE else None
    if m := _RE_BFL_DOUBLE.match(name):
        i, sub = m.groups()
        if sub in _FUSED_DOUBLE:
            return _Resolved(COMPONENT, name, "fused")
        if sub in _BFL_DOUBLE_TO_DIFFUSERS:
            return _Resolved(COMPONENT, f"transformer_blocks_{i}_{_BFL_DOUBLE_TO_DIFFUSERS[sub]}", "plain")
        return None
    if m := _RE_BFL_SINGLE.match(name):
        i, sub = m.groups()
        if sub in _FUSED_SINGLE:
            return _Resolved(COMPONENT, name, "fused")
        if sub in _BFL_SINGLE_TO_DIFFUSERS:
            return _Resolved(
                COMPONENT, f"single_transformer_blocks_{i}_{_BFL_SINGLE_TO_DIFFUSERS[sub]}", "plain"
            )
        return None
    if name in _TOP:
        return _Resolved(COMPONENT, name, "plain")
    if name in _BFL_TOP_TO_DIFFUSERS:
        return _Resolved(COMPONENT, _BFL_TOP_TO_DIFFUSERS[name], "plain")
    if name == _FINAL_MOD:
        return _Resolved(COMPONENT, _FINAL_MOD, "plain")
    if name == _NORM_OUT:
        return _Resolved(COMPONENT, _FINAL_MOD, "swap")
    return None


def _resolve(module: str) -> _Resolved | None:
    """A file's module spelling → canonical; None when it is not a Flux (or Flux text-encoder) module."""
    if m := _RE_XLABS.match(_strip(module, "diffusion_model.") or module):
        kind, i, proc = m.groups()
        if kind == "double_blocks":
            stream = "img" if proc.endswith("1") else "txt"
            if proc.startswith("qkv"):
                return _Resolved(COMPONENT, f"double_blocks_{i}_{stream}_attn_qkv", "fused")
            sub = "attn_to_out_0" if stream == "img" else "attn_to_add_out"
            return _Resolved(COMPONENT, f"transformer_blocks_{i}_{sub}", "plain")
        if proc == "qkv_lora":
            return _Resolved(COMPONENT, f"single_blocks_{i}_linear1", "qkv3")
        if proc == "proj_lora":
            return _Resolved(COMPONENT, f"single_transformer_blocks_{i}_proj_out", "plain")
        return None
    # text encoders
    if (rest := _strip(module, "text_encoder.")) is not None:
        return _Resolved("te1", rest.replace(".", "_"), "plain")
    if (rest := _strip(module, "text_encoder_2.")) is not None:
        return _Resolved("te3", rest.replace(".", "_"), "plain")
    if (rest := _strip(module, "lora_te1_")) is not None:
        return _Resolved("te1", rest, "plain")
    if (rest := _strip(module, "lora_te3_")) is not None:
        return _Resolved("te3", rest, "plain")
    if (rest := _strip(module, "lora_te2_")) is not None:
        # Forge maps lora_te2_ to T5 for Flux (OneTrainer writes T5 there); CLIP-L is te1.
        return _Resolved("te3", rest, "plain") if rest.startswith("encoder_") else None
    # the transformer
    rest = _strip(module, "lora_unet_", "lora_transformer_", "lycoris_")
    if rest is None:
        rest = _strip(
            module, "base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer."
        )
        rest = (rest if rest is not None else module).replace(".", "_")
    return _resolve_transformer(rest)


def _is_flux_evidence(module: str, r: _Resolved | None, down_shape: tuple[int, ...] | None) -> bool:
    """Block-level evidence that a file is for Flux (and not SD3/AuraFlow, which share diffusers names)."""
    if _RE_FLUX_BLOCK.search(module):
        return True
    if r is None or r.component != COMPONENT or not r.name.startswith("transformer_blocks_"):
        return False
    q = r.name.endswith(("_attn_to_q", "_attn_to_k", "_attn_to_v"))
    return q and down_shape is not None and len(down_shape) == 2 and down_shape[1] == FLUX_HIDDEN


def looks_like_flux(shapes: Mapping[str, Sequence[int]]) -> bool:
    """Whether a state dict, given as tensor name → shape (a safetensors header), is a Flux LoRA.

    Cheap: names and shapes only, so a reader can decide before loading any tensor data whether to hand
    the file to :func:`read_flux_layers`.
    """
    downs: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        if _RE_FLUX_BLOCK.search(key):
            return True
        parsed = _split_suffix(key)
        if parsed is not None and parsed[1] == "down":
            downs[parsed[0]] = tuple(int(d) for d in shape)
    return any(_is_flux_evidence(m, _resolve(m), shape) for m, shape in downs.items())


def _peft_config(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' ``lora_adapter_metadata`` JSON (PEFT LoraConfig fields prefixed per component)."""
    raw = metadata.get("lora_adapter_metadata") if metadata else None
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except (TypeError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    out: dict[str, dict] = {}
    for k, v in data.items():
        prefix, _, field = str(k).partition(".")
        if field:
            out.setdefault(prefix, {})[field] = v
    return out


def _pattern_value(patterns: object, module: str) -> object | None:
    """PEFT's ``alpha_pattern``/``rank_pattern``: a key matches a module path ending in it (regex)."""
    if not isinstance(patterns, dict):
        return None
    for pat, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pat})$", module):
                return value
        except re.error:
            continue
    return None


def _peft_alpha(config: dict, dotted_module: str, rank: int) -> float | None:
    """alpha such that alpha/rank is PEFT's scaling (lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA)."""
    if not config:
        return None
    alpha = _pattern_value(config.get("alpha_pattern"), dotted_module)
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return None
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        return None
    if config.get("use_rslora"):
        return alpha * math.sqrt(rank)
    return alpha


def _peft_prefix(module: str) -> tuple[str, str] | None:
    """(metadata prefix, module path below it) for dotted diffusers-style modules."""
    for prefix in ("transformer", "text_encoder", "text_encoder_2"):
        if module.startswith(prefix + "."):
            return prefix, module[len(prefix) + 1 :]
    return None


def read_flux_layers(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    path: str,
    *,
    split: bool = True,
) -> dict[str, LoraLayer] | None:
    """Read a Flux LoRA state dict into canonical layers (kind ``lora``); None when it is not Flux.

    Accepts diffusers/PEFT (``transformer.`` + diffusers names, ``lora_A``/``lora_B``, alpha from the
    ``lora_adapter_metadata`` header or ``.alpha`` tensors, else rank), kohya/sd-scripts
    (``lora_unet_double_blocks_0_img_attn_qkv``), BFL-native
    (``[diffusion_model.]double_blocks.0.img_attn.qkv``),
    OneTrainer (``lora_transformer_``), SimpleTuner LyCORIS-LoRA (``lycoris_``) and XLabs
    (``double_blocks.0.processor.qkv_lora1``; no alpha, scale 1). With ``split`` (the default) fused
    layers are split into the diffusers q/k/v/proj_mlp row slices (see the module docstring).
    Raises :class:`LoraFormatError` for Flux files we cannot read faithfully (DoRA, LoHa, control LoRAs…).
    """
    metadata = metadata or {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    refused: list[tuple[str, str]] = []
    for file_key, tensor in tensors.items():
        if file_key.startswith(_IGNORED_PREFIXES):
            continue
        reason = next((why for marker, why in _REFUSED if marker.search(file_key)), None)
        if reason is not None:
            refused.append((file_key, reason))
            continue
        parsed = _split_suffix(file_key)
        if parsed is None:
            unknown.append(file_key)
            continue
        module, role = parsed
        groups.setdefault(module, {})[role] = tensor

    resolved: dict[str, _Resolved | None] = {m: _resolve(m) for m in groups}
    flux = any(
        _is_flux_evidence(m, r, tuple(groups[m]["down"].shape) if "down" in groups[m] else None)
        for m, r in resolved.items()
    ) or any(_RE_FLUX_BLOCK.search(k) for k, _ in refused)
    if not flux:
        return None
    if refused:
        key, reason = refused[0]
        raise LoraFormatError(path, reason, key)
    if unknown:
        raise LoraFormatError(path, "not a LoRA weight of a Flux LoRA (unknown key)", unknown[0])

    peft = _peft_config(metadata)
    layers: dict[str, LoraLayer] = {}
    for module, parts in groups.items():
        r = resolved[module]
        if r is None:
            raise LoraFormatError(
                path, "names no module of the Flux transformer or its text encoders", module
            )
        if "down" not in parts or "up" not in parts:
            missing = "up" if "down" in parts else "down"
            raise LoraFormatError(path, f"LoRA layer without its {missing} matrix", module)
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraFormatError(
                path, f"down {tuple(down.shape)} and up {tuple(up.shape)} do not form a linear LoRA", module
            )
        for role, t in parts.items():
            if not torch.is_floating_point(t) or not bool(torch.isfinite(t).all()):
                raise LoraFormatError(path, f"{role} holds NaN/Inf or non-float values", module)
        rank = int(down.shape[0])
        if "alpha" in parts:
            alpha: float | None = float(parts["alpha"].float().reshape(-1)[0])
        else:
            pre = _peft_prefix(module)
            alpha = _peft_alpha(peft.get(pre[0], {}), pre[1], rank) if pre else None
        key = f"{r.component}/{r.name}"
        if r.how == "swap":
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        if r.how == "qkv3":
            hidden = int(down.shape[1])
            if up.shape[0] != 3 * hidden:
                raise LoraFormatError(
                    path, f"XLabs qkv LoRA with {up.shape[0]} rows, expected {3 * hidden}", module
                )
        if key in layers:
            raise LoraFormatError(path, f"two spellings of the same module ({layers[key].file_key})", module)
        layer = LoraLayer(
            key=key,
            file_key=module,
            kind="lora",
            tensors={"down": down, "up": up},
            alpha=alpha,
            rank=rank,
            shape=(int(up.shape[0]), int(down.shape[1])),
        )
        if r.how == "qkv3":
            for child in _children(layer, path, qkv_only=True):
                _put(layers, child, path)
        elif r.how == "fused" and split:
            for child in _children(layer, path):
                _put(layers, child, path)
        else:
            _put(layers, layer, path)
    return layers


def _put(layers: dict[str, LoraLayer], layer: LoraLayer, path: str) -> None:
    if layer.key in layers:
        raise LoraFormatError(
            path,
            f"the file patches this module twice ({layers[layer.key].file_key} and {layer.file_key})",
            layer.key,
        )
    layers[layer.key] = layer


def _children(layer: LoraLayer, path: str, qkv_only: bool = False) -> list[LoraLayer]:
    component, _, name = layer.key.partition("/")
    hidden = layer.shape[1]
    rows = layer.shape[0]
    if m := _RE_BFL_DOUBLE.match(name):
        block, prefix = m.group(1), "transformer_blocks"
        names = _FUSED_DOUBLE[m.group(2)]
        if rows != 3 * hidden:
            raise LoraFormatError(
                path, f"fused qkv LoRA with {rows} rows, expected {3 * hidden}", layer.file_key
            )
        sizes = [hidden] * 3
    else:
        m = _RE_BFL_SINGLE.match(name)
        assert m is not None
        block, prefix = m.group(1), "single_transformer_blocks"
        names = _FUSED_SINGLE[m.group(2)]
        if qkv_only:
            names, sizes = names[:3], [hidden] * 3
        else:
            if rows <= 3 * hidden:
                raise LoraFormatError(
                    path, f"linear1 LoRA with {rows} rows, expected more than {3 * hidden}", layer.file_key
                )
            sizes = [hidden] * 3 + [rows - 3 * hidden]
    out = []
    start = 0
    for child, size in zip(names, sizes, strict=True):
        rows_slice = slice(start, start + size)
        start += size
        out.append(
            LoraLayer(
                key=f"{component}/{prefix}_{block}_{child}",
                file_key=f"{layer.file_key}[{rows_slice.start}:{rows_slice.stop}]",
                kind="lora",
                tensors={"down": layer.tensors["down"], "up": layer.tensors["up"][rows_slice]},
                alpha=layer.alpha,
                rank=layer.rank,
                shape=(size, hidden),
            )
        )
    return out


def split_fused_layer(layer: LoraLayer, path: str = "") -> list[LoraLayer]:
    """Split a fused-module LoRA layer into its diffusers row slices (down shared, up rows divided).

    Alpha and rank are those of the fused layer, so each child's delta equals the matching rows of
    the fused delta, and the host's scale (alpha / down rows) is unchanged.
    """
    if not is_fused_key(layer.key):
        raise ValueError(f"{layer.key} is not a fused Flux module")
    if layer.kind != "lora":
        raise LoraFormatError(path or layer.key, f"cannot split a {layer.kind} layer by rows", layer.file_key)
    return _children(layer, path or layer.key)


def split_fused(layers: Mapping[str, LoraLayer], path: str = "") -> dict[str, LoraLayer]:
    """All layers with every fused Flux layer replaced by its diffusers row slices (order kept)."""
    out: dict[str, LoraLayer] = {}
    for key, layer in layers.items():
        for item in split_fused_layer(layer, path) if is_fused_key(key) else [layer]:
            _put(out, item, path or key)
    return out


def is_flux_key_set(keys: Iterable[str]) -> bool:
    """Cheap test on canonical keys: does this set of layers belong to a Flux transformer?"""
    return any(bfl_target(k) is not None for k in keys)
