"""What lllyasviel's Forge and Forge Neo share: the ``backend/`` architecture (Neo is a fork of it). Both
hosts (:mod:`.forge`, :mod:`.neo`) build on these public functions; neither imports the other.

* **Models.** ``p.sd_model`` is a ``ForgeDiffusionEngine``; the denoiser (UNet or DiT) is
  ``forge_objects.unet.model.diffusion_model`` (a ``UnetPatcher`` around a ``KModel``), the text encoders are
  the children of ``forge_objects.clip.cond_stage_model`` (``clip_l``, ``clip_g``, ``t5xxl``; on Neo also
  ``umt5xxl``, ``qwen3`` …).
* **Linears.** Forge's ``Linear`` is an ``nn.Module`` (Neo's plain one an ``nn.Linear``); the GGUF and the
  bitsandbytes NF4/FP4 ``Linear`` declare no ``in_features``/``out_features`` and store a packed weight
  (``backend/operations.py``, ``operations_gguf.py``, ``operations_bnb.py``). :func:`linear_shape` takes the
  logical shape from the declared features, else from the weight: a GGUF ``ParameterGGUF`` reports its real
  shape, an NF4 ``Params4bit`` keeps it in ``quant_state.shape``. The hooks never read the weight itself.
* **UNet and Flux.** SGM UNet names renumbered by the checkpoint's own ``num_res_blocks``
  (:func:`klora.keys.sd.sgm_renumbering`), Flux keys on output-row slices of the fused ``qkv``/``linear1``
  (:mod:`klora.keys.flux`); keys not placed are offered to the host's own key map
  (``backend/patcher/lora.py::model_lora_keys_unet``, always with a fresh dict).
* **Memory.** The hooks move the factors to the compute device in the compute dtype on first use; their size
  is announced with ``UnetPatcher.add_extra_preserved_memory_during_sampling`` on a clone of the UNet patcher
  (``backend/patcher/unet.py``; the host resets ``forge_objects`` before every pass, so nothing leaks into
  later generations), so model offloading keeps room for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from klora import apply
from klora.apply import Target
from klora.keys import flat
from klora.keys import flux as flux_keys
from klora.keys import sd as sd_keys
from klora.keys.dit import COMPONENT, DitFamily

if TYPE_CHECKING:
    from klora.webui.session import Setup

log = logging.getLogger("klora")


def diffusion_model(sd_model: Any) -> nn.Module:
    """The UNet / DiT module (``forge_objects.unet`` is a UnetPatcher around a KModel)."""
    return sd_model.forge_objects.unet.model.diffusion_model


def host_text_encoders(sd_model: Any) -> dict[str, nn.Module]:
    """The host's text encoders by their name in ``cond_stage_model`` (``clip_l``, ``t5xxl``, ``qwen3`` …)."""
    clip = getattr(sd_model.forge_objects, "clip", None)
    cond = getattr(clip, "cond_stage_model", None)
    if not isinstance(cond, nn.Module):
        return {}
    return {name: module for name, module in cond.named_children() if isinstance(module, nn.Module)}


def linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """``(out, in)`` of a Linear-like module: its declared features, else (a quantised ``Linear`` of the
    host's op classes) its weight's logical shape; None for anything else."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.out_features), int(module.in_features)
    if type(module).__name__ != "Linear":  # the op classes are all called Linear (backend/operations*.py)
        return None
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)  # bitsandbytes Params4bit: the stored shape is packed
    shape = getattr(state, "shape", None) if state is not None else getattr(weight, "shape", None)
    if shape is None or len(shape) != 2:
        return None
    return int(shape[0]), int(shape[1])


def hookable(module: nn.Module) -> bool:
    """A 2-D conv or a Linear-like module whose shape is known (:func:`linear_shape`)."""
    return isinstance(module, nn.Conv2d) or linear_shape(module) is not None


def target(module: nn.Module, rows: slice | None = None) -> Target:
    """The target of a hookable module, with the logical shape of a quantised Linear (see the module
    docstring)."""
    return Target(module, rows, shape=None if isinstance(module, nn.Conv2d) else linear_shape(module))


def unet_targets(unet: nn.Module, wanted: Iterable[str]) -> dict[str, Target]:
    """Canonical ``unet/`` keys → targets in an SGM-named UNet built from the checkpoint's config
    (``backend/nn/unet.py``, ``num_res_blocks`` per level): a non-standard layout is renumbered; blocks the
    renumbering cannot express are left to the host's key map."""
    wanted = [k for k in wanted if k.startswith("unet/")]
    if not wanted:
        return {}
    renumber = sd_keys.sgm_renumbering(unet)
    index: dict[str, nn.Module] = {}
    for name, module in unet.named_modules():
        if name and hookable(module):
            flat_name = flat(name)
            if renumber is not None and sd_keys.is_sgm_name(flat_name):
                flat_name = renumber(flat_name)
                if flat_name is None:
                    continue  # left to the host's key map
            index.setdefault(sd_keys.unet_key(flat_name), module)
    return {key: target(index[key]) for key in wanted if key in index}


def _flux_dims(model: nn.Module) -> tuple[int, int]:
    """(hidden, MLP width) of a BFL Flux model (the host's model class has ``hidden_size``)."""
    hidden = getattr(model, "hidden_size", None)
    if not isinstance(hidden, int):
        shape = linear_shape(model.get_submodule("double_blocks.0.img_attn.qkv"))
        assert shape is not None
        hidden = shape[1]
    try:
        shape = linear_shape(model.get_submodule("single_blocks.0.linear1"))
        mlp = shape[0] - 3 * hidden if shape is not None else 4 * hidden
    except AttributeError:
        mlp = 4 * hidden
    return hidden, mlp


def flux_targets(model: nn.Module, wanted: Iterable[str]) -> dict[str, Target]:
    """Canonical Flux keys → targets in a BFL-named Flux or Chroma model (rows of the fused modules)."""
    if not hasattr(model, "double_blocks"):  # Flux layers on a Flux model only
        return {}
    hidden, mlp = _flux_dims(model)
    out: dict[str, Target] = {}
    for key in wanted:
        t = flux_keys.bfl_target(key, hidden, mlp)
        if t is None:
            continue
        try:
            module = model.get_submodule(t.module)
        except AttributeError:
            continue
        if hookable(module):
            out[key] = target(module, t.rows)
    return out


def dit_targets(model: nn.Module, family: DitFamily, wanted: Iterable[str]) -> dict[str, Target]:
    """Canonical keys of a :class:`~klora.keys.dit.DitFamily` → targets in its native layout; a projection of
    a fused module gets its rows, computed from the module's own shape."""
    index = {flat(name): module for name, module in model.named_modules() if name and hookable(module)}
    out: dict[str, Target] = {}
    for key in wanted:
        component, _, path = key.partition("/")
        site = family.native(path) if component == COMPONENT else None
        module = index.get(site.module) if site is not None else None
        if module is None or site is None:
            continue
        if site.part is None:
            out[key] = target(module)
            continue
        shape = linear_shape(module)
        if shape is not None:
            try:
                out[key] = target(module, family.rows(site.part, *shape))
            except (IndexError, ValueError):
                continue  # a fused module whose rows do not split: reported as missing
    return out


def _te_name(component: str, flat_name: str) -> str | None:
    """The canonical path of a text-encoder module: CLIP's from ``text_model_``, T5's from ``encoder_block_``
    (below the host's wrapper modules), any other encoder's (``te_<name>``) its own flattened path."""
    if component in ("te1", "te2", "te3"):
        i = flat_name.find("encoder_block_" if component == "te3" else "text_model_")
        return flat_name[i:] if i >= 0 else None
    return flat_name


def text_encoder_targets(encoders: Mapping[str, nn.Module], wanted: Iterable[str]) -> dict[str, Target]:
    """Canonical text-encoder keys → targets, ``encoders`` giving the module of each component."""
    wanted = list(wanted)
    components = {k.partition("/")[0] for k in wanted}
    out: dict[str, Target] = {}
    for component, encoder in encoders.items():
        if component not in components:
            continue
        index: dict[str, nn.Module] = {}
        for name, module in encoder.named_modules():
            path = _te_name(component, flat(name)) if name and hookable(module) else None
            if path is not None:
                index.setdefault(f"{component}/{path}", module)
        out.update((key, target(index[key])) for key in wanted if key in index)
    return out


def key_map_targets(sd_model: Any, missing: list[str], prefixes: tuple[str, ...]) -> dict[str, Target]:
    """The host's own UNet key map (``model_lora_keys_unet``) for denoiser keys our resolution did not place,
    spelled ``<prefix><canonical path>`` for each of ``prefixes`` (``lora_unet_``: kohya;
    ``lora_transformer_``: OneTrainer; ``lycoris_``: SimpleTuner). Entries with a transform function
    (``swap_scale_shift``) or an offset on another dimension are skipped."""
    try:
        from backend.patcher.lora import model_lora_keys_unet  # the host's
    except Exception:
        return {}
    candidates = [k for k in missing if k.partition("/")[0] in ("unet", COMPONENT)]
    if not candidates:
        return {}
    kmodel = sd_model.forge_objects.unet.model
    try:
        key_map = model_lora_keys_unet(kmodel, {})  # a fresh dict: the host's default one is shared
    except Exception as err:  # a model the host's key map does not know
        log.debug("K-LoRA: the host's key map failed: %s", err)
        return {}
    out: dict[str, Target] = {}
    for key in candidates:
        name = key.partition("/")[2]
        entry = next((key_map[p + name] for p in prefixes if p + name in key_map), None)
        if entry is None:
            continue
        rows: slice | None = None
        if isinstance(entry, tuple):
            if len(entry) != 2 or entry[1] is None:
                continue
            param, (dim, start, length) = entry
            if dim != 0:
                continue
            rows = slice(int(start), int(start) + int(length))
        else:
            param = entry
        if not isinstance(param, str) or not param.endswith(".weight"):
            continue
        try:
            module = kmodel.get_submodule(param[: -len(".weight")])
        except AttributeError:
            continue
        if hookable(module):
            out[key] = target(module, rows)
    return out


DenoiserTargets = Callable[[nn.Module, list[str]], dict[str, Target]]


def build_targets(sd_model: Any, layer_keys: Iterable[str], denoiser: Iterable[DenoiserTargets],
                  encoders: Mapping[str, nn.Module], spellings: tuple[str, ...]
                  ) -> tuple[dict[str, Target], list[str]]:
    """Canonical key → :class:`~klora.apply.Target` in the host's modules, and the keys not found: the
    denoiser's by each of ``denoiser`` in turn, the text encoders' in ``encoders`` (canonical component →
    module), then what is left through the host's key map in ``spellings`` (:func:`key_map_targets`)."""
    wanted = list(dict.fromkeys(layer_keys))
    dm = diffusion_model(sd_model)
    targets: dict[str, Target] = {}
    for resolve in denoiser:
        targets.update(resolve(dm, wanted))
    targets.update(text_encoder_targets(encoders, wanted))
    missing = [k for k in wanted if k not in targets]
    if missing:
        targets.update(key_map_targets(sd_model, missing, spellings))
        missing = [k for k in wanted if k not in targets]
    return targets, missing


def announce_memory(p: Any, setup: Setup) -> None:
    """Tell the host's memory manager what the denoiser hooks will hold, on a clone of the UNet patcher (the
    pass samples with ``p.sd_model.forge_objects.unet``)."""
    patcher = p.sd_model.forge_objects.unet
    if not (hasattr(patcher, "add_extra_preserved_memory_during_sampling") and hasattr(patcher, "clone")):
        return
    dtype = getattr(getattr(patcher, "model", None), "computation_dtype", None)
    dtype = dtype if isinstance(dtype, torch.dtype) else torch.float16
    nbytes = apply.hook_bytes(setup.plan, setup.content, setup.style, setup.unet_keys, dtype)
    if nbytes <= 0:
        return
    unet = patcher.clone()
    unet.add_extra_preserved_memory_during_sampling(nbytes)
    p.sd_model.forge_objects.unet = unet
