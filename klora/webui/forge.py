"""The Forge adapter (lllyasviel/stable-diffusion-webui-forge, the ``backend/`` architecture with Flux).

Forge is built on A1111 1.10.1: the script API, ``on_cfg_denoiser`` (its ``CFGDenoiser`` counts ``step``
and ``total_steps`` the same way), ``setup_img2img_steps``, the extra-network registry, the conditioning
caches and the builtin Lora extension's ``networks`` name lists are the same. So the generation lifecycle is
:mod:`klora.webui.a1111`'s — one run per processing object, hooks attached only inside wrappers around
``p.setup_conds`` and ``p.sample`` and removed in their ``finally``, the tag, the infotext, the refiner note,
the settings and the panel — and this module replaces what differs on Forge:

* **Modules.** ``p.sd_model`` is a ``ForgeDiffusionEngine``; the UNet or Flux transformer is
  ``forge_objects.unet.model.diffusion_model`` (SGM names for SD1.5/SDXL, BFL names for Flux), the text
  encoders are ``forge_objects.clip.cond_stage_model.{clip_l, clip_g, t5xxl}`` (HF names; SDXL's CLIP-G is
  an HF model here, so its q/k/v are plain Linears). Forge's ``Linear`` is not a ``torch.nn.Linear``
  (``backend/operations.py``), so modules are matched by ``in_features``/``out_features``, and shapes are
  checked from those (an NF4 weight's stored shape is packed). Flux keys land on output-row slices of the
  fused ``qkv``/``linear1`` (:mod:`klora.flux`). diffusers/PEFT SDXL files, which Forge's own key map misses
  (``unet.…to_q`` without ``.processor``), need no rewrite: :mod:`klora.formats` reads them into the same
  canonical keys every other spelling gets. Keys our resolution does not place are offered to Forge's key map
  (``backend/patcher/lora.py::model_lora_keys_unet``, always with a fresh dict) before they are reported.
* **Memory.** The hooks move the factors to the compute device in the compute dtype on first use
  (:mod:`klora.apply`); their size is announced to Forge's memory manager with
  ``UnetPatcher.add_extra_preserved_memory_during_sampling`` on a clone of the UNet patcher set in
  ``process_before_every_sampling`` (``backend/patcher/unet.py``; Forge resets ``forge_objects`` before every
  pass, so nothing leaks into later generations), so model offloading keeps room for them.
* **Flux** uses the official code's pattern ``s*`` unless the user picked a pattern (a tag's ``pattern=``) or
  α/β; the infotext says so.

The script calls the same entry points as on A1111 (:func:`before_process`, :func:`process`,
:func:`after_extra_networks_activate`, :func:`process_batch`, :func:`process_before_every_sampling`,
:func:`postprocess_batch`, :func:`postprocess`, :func:`on_cfg_denoiser`, :func:`on_script_unloaded`,
:func:`on_before_ui`, :func:`on_ui_settings`, :func:`on_app_started`, :func:`build_ui`);
:func:`klora.webui.host.adapter` picks the module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, Literal

import torch
from torch import nn

from klora import fusion, keys
from klora.apply import Target
from klora.keys import flux
from klora.keys import sd as sd_keys
from klora.layers import LoraFile
from klora.webui import a1111, common
from klora.webui.a1111 import (  # noqa: F401  (the shared entry points, re-exported for the script)
    ExtraNetworkKLora,
    KLoraInputError,
    before_process,
    lora_names,
    on_app_started,
    on_before_ui,
    on_cfg_denoiser,
    on_script_unloaded,
    on_ui_settings,
    panel_defaults,
    postprocess,
    postprocess_batch,
    refresh_lora_names,
    resolve_pasted_name,
    run_of,
)

log = logging.getLogger("klora")

ModelKind = Literal["sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "flux", "chroma", "unknown"]
SUPPORTED_KINDS: tuple[str, ...] = ("sd1", "sd2", "sdxl", "flux", "chroma")
FLUX_KINDS: tuple[str, ...] = ("flux", "chroma")
FLUX_DEFAULT_PATTERN = "s*"
FLUX_DEFAULT_NOTE = "Flux default pattern s*"

# text encoders of Forge's CLIP patcher (backend/diffusion_engine/*.py build them with these names)
_TEXT_ENCODERS: dict[str, str] = {"te1": "clip_l", "te2": "clip_g", "te3": "t5xxl"}


# ----------------------------------------------------------------------------------------------------
# The model


def model_kind(sd_model: Any) -> ModelKind:
    """What Forge loaded: by engine class (backend/diffusion_engine/*.py) and its ``is_sd*`` flags."""
    name = type(sd_model).__name__
    if name == "Flux":
        return "flux"
    if name == "Chroma":
        return "chroma"
    if name == "StableDiffusionXLRefiner":
        return "sdxl-refiner"
    for flag, kind in (("is_sdxl", "sdxl"), ("is_sd1", "sd1"), ("is_sd2", "sd2"), ("is_sd3", "sd3")):
        if getattr(sd_model, flag, False):
            return kind  # type: ignore[return-value]
    return "unknown"


def diffusion_model(sd_model: Any) -> nn.Module:
    """The UNet / Flux transformer module (``forge_objects.unet`` is a UnetPatcher around a KModel)."""
    return sd_model.forge_objects.unet.model.diffusion_model


def text_encoders(sd_model: Any) -> dict[str, nn.Module]:
    """Canonical component → text-encoder module (``te1`` CLIP-L, ``te2`` CLIP-G, ``te3`` T5-XXL)."""
    clip = getattr(sd_model.forge_objects, "clip", None)
    cond = getattr(clip, "cond_stage_model", None)
    out: dict[str, nn.Module] = {}
    for component, name in _TEXT_ENCODERS.items():
        module = getattr(cond, name, None) if cond is not None else None
        if isinstance(module, nn.Module):
            out[component] = module
    return out


def _hookable(module: nn.Module) -> bool:
    """Linear-like (Forge's own ``Linear`` included, which subclasses ``nn.Module``) or a 2-D conv."""
    if isinstance(module, nn.Conv2d):
        return True
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def _te_name(component: str, flat_name: str) -> str | None:
    i = flat_name.find("encoder_block_" if component == "te3" else "text_model_")
    return flat_name[i:] if i >= 0 else None


def _flux_dims(model: nn.Module) -> tuple[int, int]:
    """(hidden, MLP width) of a BFL Flux model (Forge's model class has ``hidden_size``)."""
    hidden = getattr(model, "hidden_size", None)
    if not isinstance(hidden, int):
        hidden = int(model.get_submodule("double_blocks.0.img_attn.qkv").in_features)
    try:
        linear1 = model.get_submodule("single_blocks.0.linear1")
        mlp = int(linear1.out_features) - 3 * hidden
    except AttributeError:
        mlp = 4 * hidden
    return hidden, mlp


def build_targets(sd_model: Any, layer_keys: Iterable[str]) -> tuple[dict[str, Target], list[str]]:
    """Canonical key → :class:`~klora.apply.Target` in Forge's modules, and the keys not found."""
    wanted = list(dict.fromkeys(layer_keys))
    targets: dict[str, Target] = {}
    dm = diffusion_model(sd_model)
    components = {k.partition("/")[0] for k in wanted}
    if "unet" in components:
        # Forge builds the UNet from the checkpoint's config (backend/nn/unet.py, ``num_res_blocks`` per
        # level): renumber a non-standard layout; blocks the renumbering cannot express go to Forge's key map.
        renumber = sd_keys.sgm_renumbering(dm)
        index: dict[str, nn.Module] = {}
        for name, module in dm.named_modules():
            if name and _hookable(module):
                flat_name = keys.flat(name)
                if renumber is not None and sd_keys.is_sgm_name(flat_name):
                    flat_name = renumber(flat_name)
                    if flat_name is None:
                        continue  # left to Forge's key map
                index.setdefault(sd_keys.unet_key(flat_name), module)
        for key in wanted:
            if key in index:
                targets[key] = Target(index[key])
    if flux.COMPONENT in components and hasattr(dm, "double_blocks"):  # Flux layers on a Flux model only
        hidden, mlp = _flux_dims(dm)
        for key in wanted:
            t = flux.bfl_target(key, hidden, mlp)
            if t is None:
                continue
            try:
                module = dm.get_submodule(t.module)
            except AttributeError:
                continue
            if _hookable(module):
                targets[key] = Target(module, t.rows)
    encoders = text_encoders(sd_model)
    for component, encoder in encoders.items():
        if component not in components:
            continue
        te_index: dict[str, nn.Module] = {}
        for name, module in encoder.named_modules():
            te = _te_name(component, keys.flat(name)) if name and _hookable(module) else None
            if te is not None:
                te_index.setdefault(f"{component}/{te}", module)
        for key in wanted:
            if key in te_index:
                targets[key] = Target(te_index[key])
    missing = [k for k in wanted if k not in targets]
    if missing:
        targets.update(_forge_key_map_targets(sd_model, missing))
        missing = [k for k in wanted if k not in targets]
    return targets, missing


def _forge_key_map_targets(sd_model: Any, missing: list[str]) -> dict[str, Target]:
    """Forge's own UNet key map for keys our resolution did not place (kohya spelling of the canonical
    name: ``lora_unet_<name>``, and OneTrainer's ``lora_transformer_<name>`` for Flux). Entries with a
    transform function (Forge's ``swap_scale_shift``) or an offset on another dimension are skipped."""
    try:
        from backend.patcher.lora import model_lora_keys_unet  # the host's
    except Exception:
        return {}
    candidates = [k for k in missing if k.partition("/")[0] in ("unet", flux.COMPONENT)]
    if not candidates:
        return {}
    kmodel = sd_model.forge_objects.unet.model
    try:
        key_map = model_lora_keys_unet(kmodel, {})  # a fresh dict: Forge's default one is shared
    except Exception as err:  # a model Forge's key map does not know
        log.debug("K-LoRA: Forge's key map failed: %s", err)
        return {}
    out: dict[str, Target] = {}
    for key in candidates:
        component, _, name = key.partition("/")
        spellings = [f"lora_unet_{name}"]
        if component == flux.COMPONENT:
            spellings.append(f"lora_transformer_{name}")
        entry = next((key_map[s] for s in spellings if s in key_map), None)
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
        if _hookable(module):
            out[key] = Target(module, rows)
    return out


def with_model_defaults(args: common.KLoraArgs, kind: str,
                        chosen: Iterable[str] = ()) -> tuple[common.KLoraArgs, str | None]:
    """Flux (and Chroma) use the official code's pattern ``s*`` unless the user picked something else.
    Returns the args to use and a note for the infotext (None when nothing changed).

    "Picked": ``pattern``/``alpha``/``beta`` among ``chosen`` (fields a tag or an XYZ cell set) or
    ``args.given``, a pattern other than the default ``s``, or α/β other than ``s``'s defaults (the panel
    always sends numbers, so its defaults cannot be told from a choice).
    """
    if kind not in FLUX_KINDS or args.pattern != "s":
        return args, None
    if {"pattern", "alpha", "beta"} & (set(args.given) | set(chosen)):
        return args, None
    if (args.resolved_alpha, args.resolved_beta) != common.PATTERN_DEFAULTS["s"]:
        return args, None
    return replace(args, pattern=FLUX_DEFAULT_PATTERN, alpha=None, beta=None), FLUX_DEFAULT_NOTE


# ----------------------------------------------------------------------------------------------------
# Coverage: which planned layers fit the model


def target_shape(target: Target) -> tuple[int, ...] | None:
    """(rows, in) of a Linear-like target (its ``rows`` slice counted), (out, in, kh, kw) of a conv (1×1
    squeezed to 2-D); from the module's declared sizes, not the stored weight (packed for NF4/GGUF)."""
    m = target.module
    if isinstance(m, nn.Conv2d):
        out, inp, kernel = int(m.out_channels), int(m.in_channels), tuple(int(k) for k in m.kernel_size)
    elif hasattr(m, "in_features") and hasattr(m, "out_features"):
        out, inp, kernel = int(m.out_features), int(m.in_features), ()
    else:
        return None
    if target.rows is not None:
        start, stop, _ = target.rows.indices(out)
        out = stop - start
    shape = (out, inp, *kernel)
    return shape[:2] if kernel == (1, 1) else shape


def cover(plan: fusion.Plan, content: LoraFile, style: LoraFile,
          targets: dict[str, Target]) -> a1111.Coverage:
    """Which planned layers can be applied (a module found and every delta's shape fits it): a1111's check
    with Forge's shapes (``in_features``/``out_features``, since an NF4 weight's stored shape is packed)."""
    return a1111.cover(plan, content, style, targets, lambda t, key: target_shape(t[key]))


def factor_nbytes(setup: a1111._Setup, dtype: torch.dtype) -> int:
    """Device bytes the UNet/transformer hooks hold in ``dtype``: low-rank factors (or dense deltas for kinds
    without), once more for layers that apply both deltas (their factors are stacked)."""
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for key in setup.unet_keys:
        per_layer = 0
        for file in (setup.content, setup.style):
            layer = file.layers.get(key)
            if layer is None:
                continue
            if layer.kind == "lora":
                per_layer += sum(t.numel() for t in layer.tensors.values())
            else:
                n = 1
                for d in layer.shape:
                    n *= int(d)
                per_layer += n
        lp = setup.plan.layers.get(key)
        if lp is not None and lp.constant == "both":
            per_layer *= 2
        total += per_layer
    return total * size


# ----------------------------------------------------------------------------------------------------
# The run: a1111's, with Forge's modules and defaults


class _ForgeRun(a1111._Run):
    """:class:`klora.webui.a1111._Run` with Forge's model targets, coverage and Flux default."""

    _chosen: frozenset[str] = frozenset()

    def activate(self, tag_params: list[Any] | None) -> None:
        # the fields the user set in the tag or an XYZ cell (the merged args no longer tell)
        chosen = set(common.xyz_overrides(self.p))
        try:
            tag = common.parse_tag(tag_params or None)
        except common.KLoraArgsError:
            tag = None  # reported by the activation itself
        if tag is not None:
            chosen |= set(tag.given)
        self._chosen = frozenset(chosen)
        super().activate(tag_params)

    def _prepare(self, args: common.KLoraArgs, from_tag: bool, seed: int, model: Any) -> a1111._Setup:
        kind = model_kind(model)
        if kind not in SUPPORTED_KINDS:
            raise KLoraInputError(f"K-LoRA does not support this model on Forge yet ({type(model).__name__})")
        args, note = with_model_defaults(args, kind, self._chosen)
        content, style = a1111.load_pair(args)
        plan = fusion.make_plan(content, style, args.to_fusion_options(seed))
        targets, _missing = build_targets(model, plan.layers)
        cov = cover(plan, content, style, targets)
        te_keys, unet_keys = self.check_coverage(args, plan, cov, f"the loaded {kind} model")
        mapped = a1111.ModelTargets(modules={k: targets[k] for k in cov.mapped})
        setup = a1111._Setup(args, from_tag, content, style, plan, model, mapped, te_keys, unet_keys)
        setup.forge_note = note  # type: ignore[attr-defined]
        return setup

    def write_infotext(self) -> None:
        setup = self.setup or self.batch_setup
        note = getattr(setup, "forge_note", None)
        if note and note not in self.notes:
            self.notes.insert(0, note)
        super().write_infotext()


# ----------------------------------------------------------------------------------------------------
# Entry points that differ from a1111's


def process(p: Any, script_args: Iterable[Any]) -> None:
    """Start of a generation: a fresh Forge run on ``p``."""
    p.__dict__[a1111.RUN_ATTR] = _ForgeRun(p, script_args)
    p.__dict__[a1111.TAG_ATTR] = None


def after_extra_networks_activate(p: Any, script_args: Iterable[Any], extra_network_data: Any = None) -> None:
    if run_of(p) is None:
        process(p, script_args)
    a1111.after_extra_networks_activate(p, script_args, extra_network_data)


def process_batch(p: Any, script_args: Iterable[Any]) -> None:
    if run_of(p) is None:
        process(p, script_args)
    a1111.process_batch(p, script_args)


def process_before_every_sampling(p: Any) -> None:
    """Start of a sampling pass: a1111's bookkeeping, then the factors' size told to Forge's memory manager
    on a clone of the UNet patcher (the pass samples with ``p.sd_model.forge_objects.unet``)."""
    a1111.process_before_every_sampling(p)
    run = run_of(p)
    setup = run.setup if run is not None else None
    if setup is None or run.refiner_off or p.sd_model is not setup.model:
        return
    patcher = p.sd_model.forge_objects.unet
    if not hasattr(patcher, "add_extra_preserved_memory_during_sampling") or not hasattr(patcher, "clone"):
        return
    dtype = getattr(getattr(patcher, "model", None), "computation_dtype", None)
    nbytes = factor_nbytes(setup, dtype if isinstance(dtype, torch.dtype) else torch.float16)
    if nbytes <= 0:
        return
    unet = patcher.clone()
    unet.add_extra_preserved_memory_during_sampling(nbytes)
    p.sd_model.forge_objects.unet = unet


def analyze(args: common.KLoraArgs, steps: int) -> tuple[Any, str]:
    """The Analyze button: a1111's, with the loaded model's Flux default and Forge's coverage."""
    from modules import shared  # the host's

    model = shared.sd_model
    note = None
    if model is not None:
        args, note = with_model_defaults(args, model_kind(model))
    image, text = a1111.analyze(args, steps)
    if image is None or model is None:
        return image, text
    try:
        content, style = a1111.load_pair(args)
        plan = fusion.make_plan(content, style, args.to_fusion_options(0))
        targets, _ = build_targets(model, plan.layers)
        cov = cover(plan, content, style, targets)
        lines = [f"Loaded model (Forge, {model_kind(model)}): {len(cov.mapped)} of {len(plan.layers)} layers "
                 "found" + (f" ({cov.describe()})" if cov.describe() else "") + "."]
    except Exception as err:  # the analysis is useful without it
        log.debug("K-LoRA: coverage check failed: %s", err)
        lines = []
    if note:
        lines.append(f"({note})")
    return image, text + ("\n\n" + "\n".join(lines) if lines else "")


def build_ui(script: Any, is_img2img: bool) -> list[Any]:
    return common.build_ui(script, is_img2img, lora_names, refresh_lora_names, analyze,
                           defaults=panel_defaults(), resolve_name=resolve_pasted_name)
