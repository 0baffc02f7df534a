"""AUTOMATIC1111 glue: LoRA names → files, canonical keys → ``sd_model`` modules, the step clock, lifecycle.

How a generation runs with K-LoRA (A1111 1.6 – 1.10, ``modules/processing.py`` ``process_images_inner``):

* ``process``: a :class:`_Run` is stored on ``p`` with the panel's arguments.
* ``<klora:…>`` tags: :class:`ExtraNetworkKLora` only records its parameters on ``p``; every
  ``after_extra_networks_activate`` (per batch, the hires pass, the lowvram hires-cond path) resolves
  panel < tag < XYZ cell, reads both files through the webui's LoRA list and :mod:`klora.formats`, makes the
  plan (scores cached by :mod:`klora.fusion`), maps canonical keys to the model's modules and writes the
  infotext. Bad input becomes a comment under the images and a log line; that image is made without K-LoRA.
* Hooks exist only inside frames we own: the activation wraps ``p.setup_conds`` and ``p.sample`` on the
  instance; the wrapper attaches the hooks on entry (text-encoder layers for ``setup_conds``, all layers for
  ``sample``, which also covers the hires pass and its conditioning) and removes them in ``finally``, so they
  are gone when sampling ends, is interrupted, or raises — ``postprocess`` does not run after an exception,
  and nothing else has to. The wrappers remove themselves after ``p.sample``, before any later copy of
  ``p`` (ADetailer, XYZ) could inherit them. Fallbacks for a wrapper that another extension replaced:
  ``process_before_every_sampling`` attaches, ``postprocess_batch``/``postprocess`` detach, and the next
  generation, any other sampling's ``on_cfg_denoiser`` and ``on_script_unloaded`` remove what is left.
* ``on_cfg_denoiser`` sets τ from ``denoiser.step / denoiser.total_steps`` (A1111's own notion of sampling
  progress, also used by prompt editing; never ``state.sampling_step``, which lags one step), continued from
  where an img2img or hires pass starts in its full schedule. A model switch mid-pass (the SDXL refiner)
  detaches for the rest of the pass and says so in the infotext.

Text encoders: SD1.5's HF CLIP at ``cond_stage_model.wrapped.transformer``, SDXL's CLIP-L at
``conditioner.embedders[0].wrapped.transformer`` are hooked like the UNet. SDXL's OpenCLIP bigG
(``embedders[1].wrapped.model``) keeps q, k, v fused in ``nn.MultiheadAttention.in_proj_weight`` and uses
``out_proj.weight`` without calling ``out_proj``, so no Linear hook can reach them: :class:`_MhaHook`, a
forward hook on the attention module, recomputes its output with ``W + ΔW`` built out of place from the
weights as they are at that moment (the builtin Lora has already patched its own deltas in). Exact, writes
no weight, and only costs a second attention per text-encoder layer when a prompt is encoded.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from modules import extra_networks, processing, sd_samplers_common, shared
from torch import nn

from klora import apply, fusion, scores
from klora.apply import Hooks, StepClock, Target, attach
from klora.delta import dense_delta, low_rank
from klora.formats import LoraFile, LoraFormatError, LoraLayer, read_lora
from klora.keys import is_text_encoder
from klora.keys.sd import module_targets
from klora.webui import common

try:  # the timestep samplers (DDIM, DDIM CFG++, PLMS, UniPC), since 1.6; a host may lack them
    from modules.sd_samplers_timesteps import CFGDenoiserTimesteps
except Exception:  # pragma: no cover - depends on the host
    CFGDenoiserTimesteps = None

log = logging.getLogger("klora")

RUN_ATTR = "_klora"
TAG_ATTR = "_klora_tag"
FILE_CACHE_SIZE = 4


class KLoraInputError(Exception):
    """Input K-LoRA cannot use; ``str(err)`` is the message shown to the user."""


# ------------------------------------------------------------------------------------------------------
# LoRA names → files, through the builtin Lora extension's list


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


_file_cache: OrderedDict[tuple[str, int, int], LoraFile] = OrderedDict()
_file_lock = threading.Lock()


def read_lora_cached(path: str) -> LoraFile:
    """:func:`klora.formats.read_lora`, cached by (path, mtime, size) so a file is read and hashed once."""
    try:
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return read_lora(path)  # raises the format error with the reason
    with _file_lock:
        hit = _file_cache.get(key)
        if hit is not None:
            _file_cache.move_to_end(key)
            return hit
    lora = read_lora(path)
    with _file_lock:
        _file_cache[key] = lora
        while len(_file_cache) > FILE_CACHE_SIZE:
            _file_cache.popitem(last=False)
    return lora


def load_pair(args: common.KLoraArgs) -> tuple[LoraFile, LoraFile]:
    """Both files of a pair, named as the webui lists them."""
    return read_lora_cached(resolve_lora(args.content)), read_lora_cached(resolve_lora(args.style))


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
    with _file_lock:
        files = list(_file_cache.values())
    for lora in files:
        if lora.sha256 and lora.sha256.startswith(shorthash.lower()):
            for entry in nets.available_networks.values():
                if os.path.realpath(str(entry.filename)) == os.path.realpath(lora.path):
                    return str(entry.name)
    return None


# ------------------------------------------------------------------------------------------------------
# canonical keys → the sd_model's modules


_RESBLOCK_ATTN = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.attn$")
_MHA_PARTS = ("q", "k", "v", "out")


@dataclass
class ModelTargets:
    """Where each canonical key lives in one model: hookable Linear/Conv2d modules, and the fused OpenCLIP
    attention modules (key → (module, part in q/k/v/out))."""

    modules: dict[str, Target] = field(default_factory=dict)
    mha: dict[str, tuple[nn.MultiheadAttention, str]] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.modules or key in self.mha


def _inner(embedder: Any) -> Any:
    """The original embedder behind modules/sd_hijack_clip.py's wrapper (its ``.wrapped``)."""
    return getattr(embedder, "wrapped", embedder)


def _text_encoder_targets(embedder: Any, component: str, out: ModelTargets) -> None:
    inner = _inner(embedder)
    hf = getattr(inner, "transformer", None)
    if isinstance(hf, nn.Module) and any(n.startswith("text_model.") for n, _ in hf.named_modules()):
        # ldm/sgm FrozenCLIPEmbedder: the transformers CLIPTextModel
        for key, module in module_targets(hf, component, "diffusers").items():
            out.modules[key] = Target(module)
        return
    oc = getattr(inner, "model", None)
    if isinstance(oc, nn.Module) and hasattr(oc, "transformer"):
        # sgm FrozenOpenCLIPEmbedder2 / ldm FrozenOpenCLIPEmbedder: an open_clip model
        for key, module in module_targets(oc, component, "sgm").items():
            out.modules[key] = Target(module)
        for name, module in oc.named_modules():
            m = _RESBLOCK_ATTN.search(name)
            if m and isinstance(module, nn.MultiheadAttention):
                for part in _MHA_PARTS:
                    out.mha[f"{component}/text_model_encoder_layers_{m.group(1)}_self_attn_{part}_proj"] = (
                        module, part)


def model_targets(sd_model: Any) -> ModelTargets:
    """Canonical key → module of an A1111 SD1.x/SD2.x/SDXL model (UNet and text encoders)."""
    out = ModelTargets()
    unet = sd_model.model.diffusion_model
    for key, module in module_targets(unet, "unet", "sgm").items():
        out.modules[key] = Target(module)
    conditioner = getattr(sd_model, "conditioner", None)
    if conditioner is not None and hasattr(conditioner, "embedders"):
        text = [e for e in conditioner.embedders
                if hasattr(_inner(e), "transformer") or hasattr(_inner(e), "model")]
        for i, embedder in enumerate(text[:2]):
            _text_encoder_targets(embedder, f"te{i + 1}", out)
    elif getattr(sd_model, "cond_stage_model", None) is not None:
        _text_encoder_targets(sd_model.cond_stage_model, "te1", out)
    return out


def _squeeze(shape: Iterable[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in shape)
    return shape[:2] if len(shape) == 4 and shape[2:] == (1, 1) else shape


def _site_shape(targets: ModelTargets, key: str) -> tuple[int, ...] | None:
    if key in targets.modules:
        weight = getattr(targets.modules[key].module, "weight", None)
        return None if weight is None else _squeeze(weight.shape)
    module, _ = targets.mha[key]
    return (module.embed_dim, module.embed_dim)


@dataclass
class Coverage:
    """How a plan's layers map onto a model."""

    mapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # no module of that name
    mismatched: list[str] = field(default_factory=list)  # a module, but the delta does not fit its weight
    shared_mapped: int = 0
    shared_total: int = 0

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} with no module in this model")
        if self.mismatched:
            parts.append(f"{len(self.mismatched)} whose shape does not fit")
        return ", ".join(parts)


def cover(plan: fusion.Plan, content: LoraFile, style: LoraFile, targets: Any,
          site_shape: Callable[[Any, str], tuple[int, ...] | None] | None = None) -> Coverage:
    """Which planned layers can be applied to the model (name found and every delta's shape fits).

    ``targets`` is anything that answers ``key in targets``; ``site_shape(targets, key)`` gives the weight
    shape a delta must fit there (default: this module's :class:`ModelTargets` lookup; Forge passes its own).
    """
    site_shape = site_shape or _site_shape
    cov = Coverage()
    for key, lp in plan.layers.items():
        shared_layer = lp.source == "shared"
        cov.shared_total += shared_layer
        if key not in targets:
            cov.missing.append(key)
            continue
        site = site_shape(targets, key)
        layers = [f.layers[key] for f in (content, style) if key in f.layers]
        if site is None or any(_squeeze(layer.shape) != site for layer in layers):
            cov.mismatched.append(key)
            continue
        cov.mapped.append(key)
        cov.shared_mapped += shared_layer
    return cov


# ------------------------------------------------------------------------------------------------------
# the fused OpenCLIP attention (SDXL te2): recompute with W + ΔW, out of place


class _MhaHook:
    """Forward hook of one ``nn.MultiheadAttention``: its output recomputed with the chosen deltas added to
    ``in_proj_weight`` (q, k, v rows) and ``out_proj.weight``. Returns None (output untouched) when the plan
    chooses nothing for this module at the clock's τ."""

    def __init__(self, module: nn.MultiheadAttention, keys: dict[str, str], plan: fusion.Plan,
                 content: LoraFile, style: LoraFile, clock: StepClock) -> None:
        self.keys = keys  # part → canonical key
        self.plan = plan
        self.clock = clock
        self.factors: dict[tuple[str, str], tuple[torch.Tensor, ...]] = {}
        opts = plan.options
        for part, key in keys.items():
            for side, file, strength in (("content", content, opts.content_strength),
                                         ("style", style, opts.style_strength)):
                layer = file.layers.get(key)
                if layer is not None:
                    self.factors[(part, side)] = self._prepare(layer, strength, module.embed_dim)

    @staticmethod
    def _prepare(layer: LoraLayer, strength: float, dim: int) -> tuple[torch.Tensor, ...]:
        lr = low_rank(layer, strength)
        if lr is not None and lr.mid is None:
            return (lr.up.float().reshape(dim, -1), lr.down.float().reshape(-1, dim))
        return (dense_delta(layer, strength).float().reshape(dim, dim),)

    def _delta(self, part: str, device: torch.device) -> torch.Tensor | None:
        key = self.keys.get(part)
        if key is None:
            return None
        choice = self.plan.choose(key, self.clock.tau)
        sides = {"both": ("content", "style"), "content": ("content",), "style": ("style",)}.get(choice, ())
        total = None
        for side in sides:
            f = self.factors.get((part, side))
            if f is None:
                continue
            d = f[0].to(device) @ f[1].to(device) if len(f) == 2 else f[0].to(device)
            total = d if total is None else total + d
        return total

    def __call__(self, module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> Any:
        w_in, w_out = module.in_proj_weight, module.out_proj.weight
        deltas = {part: self._delta(part, w_in.device) for part in _MHA_PARTS}
        if all(d is None for d in deltas.values()):
            return None
        dim = module.embed_dim
        d_in = w_in.new_zeros(w_in.shape, dtype=torch.float32)
        for i, part in enumerate(("q", "k", "v")):
            if deltas[part] is not None:
                d_in[i * dim:(i + 1) * dim] = deltas[part]
        new_in = (w_in.float() + d_in).to(w_in.dtype)
        new_out = w_out if deltas["out"] is None else (w_out.float() + deltas["out"]).to(w_out.dtype)
        return _mha_forward(module, args, kwargs, new_in, new_out)


def _mha_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                   attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                   is_causal: bool = False) -> dict[str, Any]:
    """The call's arguments by name, with torch's defaults. Spelled out rather than read from
    ``nn.MultiheadAttention.forward``: the builtin Lora extension replaces that method with a
    ``(self, *args, **kwargs)`` wrapper before this module is imported
    (extensions-builtin/Lora/lora_patches.py, ``LoraPatches.__init__``)."""
    return dict(locals())


def _mha_forward(m: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any],
                 in_proj_weight: torch.Tensor, out_proj_weight: torch.Tensor) -> tuple[Any, Any]:
    """``nn.MultiheadAttention.forward`` (the general path) with the given projection weights."""
    a = _mha_arguments(*args, **kwargs)
    query, key, value = a["query"], a["key"], a["value"]
    batched = query.dim() == 3
    if m.batch_first and batched:
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    out, weights = F.multi_head_attention_forward(
        query, key, value, m.embed_dim, m.num_heads, in_proj_weight, m.in_proj_bias, m.bias_k, m.bias_v,
        m.add_zero_attn, m.dropout, out_proj_weight, m.out_proj.bias, training=m.training,
        key_padding_mask=a["key_padding_mask"], need_weights=a["need_weights"], attn_mask=a["attn_mask"],
        average_attn_weights=a["average_attn_weights"], is_causal=a["is_causal"])
    if m.batch_first and batched:
        out = out.transpose(1, 0)
    return out, weights


# ------------------------------------------------------------------------------------------------------
# one attachment: apply's hooks on Linear/Conv2d plus the MHA hooks


class _Attachment:
    def __init__(self, hooks: Hooks | None, handles: list[Any]) -> None:
        self.hooks = hooks
        self.handles = handles

    def remove(self) -> None:
        handles, self.handles = self.handles, []
        for h in handles:
            h.remove()
        if self.hooks is not None:
            self.hooks.remove()


def _attach_part(plan: fusion.Plan, content: LoraFile, style: LoraFile, targets: ModelTargets,
                 keys: list[str], clock: StepClock) -> _Attachment:
    modules = {k: targets.modules[k] for k in keys if k in targets.modules}
    hooks = attach(plan, content, style, modules, clock) if modules else None  # other keys: Hooks.missing
    handles: list[Any] = []
    try:
        by_module: dict[int, tuple[nn.MultiheadAttention, dict[str, str]]] = {}
        for k in keys:
            if k in targets.mha:
                module, part = targets.mha[k]
                by_module.setdefault(id(module), (module, {}))[1][part] = k
        for module, parts in by_module.values():
            hook = _MhaHook(module, parts, plan, content, style, clock)
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    except BaseException:
        _Attachment(hooks, handles).remove()
        raise
    return _Attachment(hooks, handles)


# ------------------------------------------------------------------------------------------------------
# the state of one generation


@dataclass
class _Setup:
    """What one activation resolved: the arguments and, when K-LoRA applies, everything to attach."""

    args: common.KLoraArgs
    from_tag: bool
    content: LoraFile
    style: LoraFile
    plan: fusion.Plan
    model: Any
    targets: ModelTargets
    te_keys: list[str]
    unet_keys: list[str]
    checkpoint: Any = None  # the model's sd_checkpoint_info when the setup was made
    warnings: list[str] = field(default_factory=list)  # what preparing it warned (said again per batch)


_attached: set[_Run] = set()  # runs with hooks on some module (strong refs: the hooks must stay findable)
_registry_lock = threading.RLock()
_window_run: _Run | None = None  # the run whose wrapper frame is innermost (for hosts without denoiser)


class _Run:
    """K-LoRA's state for one processing object ``p`` (stored as ``p._klora``)."""

    def __init__(self, p: Any, script_args: Iterable[Any]) -> None:
        self.p_ref = weakref.ref(p)
        self.panel: common.KLoraArgs | None = None
        self.panel_error: str | None = None
        try:
            self.panel = common.from_script_args(list(script_args))
        except common.KLoraArgsError as err:
            self.panel_error = str(err)
        model = shared.sd_model
        self.base_checkpoint = getattr(model, "sd_checkpoint_info", None)
        self.setup: _Setup | None = None  # for the current pass; None = K-LoRA off
        self.batch_setup: _Setup | None = None  # what the current batch applied (infotext of its images)
        self.last_setup: _Setup | None = None  # the last one that applied (for the map)
        self.clock = StepClock()
        self.parts: dict[str, _Attachment] = {}  # "te" / "unet" → attached hooks
        self.windows: list[str] = []  # wrapper frames on the stack: "te" (setup_conds) or "all" (sample)
        self.fallback = False  # attached by process_before_every_sampling because a wrapper was bypassed
        self.notes: list[str] = []
        self.refiner_off = False
        self._batch: int | None = None
        self._key: tuple | None = None
        self._warned: set[str] = set()
        self._emitted: list[str] = []
        self._private_conds = False
        self._fallback_calls = 0
        self._fallback_last = -1
        self._applied = False

    @property
    def p(self) -> Any:
        return self.p_ref()

    # -- attachment ------------------------------------------------------------------------------

    def model_switched(self) -> bool:
        """Whether the loaded model is not the one the setup was made for: another object, or the same object
        with another checkpoint loaded into it (modules/sd_models.py ``reload_model_weights`` loads a
        checkpoint of the same architecture in place, e.g. a same-family refiner)."""
        setup, model = self.setup, shared.sd_model
        return (setup is None or model is not setup.model
                or getattr(model, "sd_checkpoint_info", None) != setup.checkpoint)

    def wanted_parts(self) -> set[str]:
        if self.setup is None or self.refiner_off or self.model_switched():
            return set()
        wanted: set[str] = {"te", "unet"} if self.fallback else set()
        for w in self.windows:
            wanted |= {"te"} if w == "te" else {"te", "unet"}
        return wanted

    def sync(self) -> None:
        """Attach the parts the open windows want; remove the rest."""
        wanted = self.wanted_parts()
        for part in [p for p in self.parts if p not in wanted]:
            self.parts.pop(part).remove()
        setup = self.setup
        try:
            for part in sorted(wanted - set(self.parts)):
                assert setup is not None
                keys = setup.te_keys if part == "te" else setup.unet_keys
                if not keys:
                    continue
                try:
                    self.parts[part] = _attach_part(setup.plan, setup.content, setup.style, setup.targets,
                                                    keys, self.clock)
                except Exception as err:  # inside the host's sampling: never fail the generation for it
                    if not isinstance(err, LoraFormatError | ValueError):
                        log.exception("K-LoRA: attaching the hooks failed")
                    self.fail(f"K-LoRA: cannot apply {setup.args.content} × {setup.args.style}: {err}")
                    return
                self._applied = self._applied or part == "unet"
        finally:  # a part attached before an error must stay findable by sweep()
            with _registry_lock:
                if self.parts:
                    _attached.add(self)
                else:
                    _attached.discard(self)

    def detach(self) -> None:
        self.fallback = False
        parts, self.parts = self.parts, {}
        for part in parts.values():
            part.remove()
        with _registry_lock:
            _attached.discard(self)

    # -- messages and infotext -------------------------------------------------------------------

    def warn(self, message: str) -> None:
        """Say it once: a comment under the images (modules/processing.py ``p.comment``), the
        ``K-LoRA warning`` infotext field (the API's answer carries ``extra_generation_params`` but not the
        comments) and a console line."""
        self._emitted.append(message)
        if message in self._warned:
            return
        self._warned.add(message)
        log.warning(message)
        p = self.p
        if p is None:
            return
        if hasattr(p, "comment"):
            p.comment(message)
        params = getattr(p, "extra_generation_params", None)
        if isinstance(params, dict):
            previous = params.get(common.WARNING_KEY)
            params[common.WARNING_KEY] = f"{previous} {message}" if previous else message

    def off(self, note: str | None = None) -> None:
        """K-LoRA off for this pass. If an earlier pass of the batch applied it, its images keep the field
        with ``note`` saying where it was not applied; otherwise the field goes."""
        self.setup = None
        self._key = None
        self.detach()
        if note and self.batch_setup is not None:
            self.note(note)
        else:
            self.write_infotext()

    def fail(self, message: str) -> None:
        """Bad input: say so, and make the image (or this pass) without K-LoRA."""
        in_hires = self._applied and getattr(self.p, "is_hr_pass", False)
        if not in_hires:
            self.batch_setup = None  # nothing of this batch was made with K-LoRA: the field must go
        message = message.rstrip()
        if not message.endswith((".", "!", "?")):
            message += "."
        self.warn(message + (" The hires pass was made without K-LoRA." if in_hires
                             else " The image was made without K-LoRA."))
        self.off("not applied in the hires pass" if in_hires else None)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)
        self.write_infotext()

    def write_infotext(self) -> None:
        p = self.p
        if p is None:
            return
        params = p.extra_generation_params
        setup = self.setup or self.batch_setup
        if setup is None:
            params.pop(common.INFOTEXT_KEY, None)
            params.pop(common.INFOTEXT_HASHES_KEY, None)
            return
        params[common.INFOTEXT_KEY] = common.format_infotext(setup.args, setup.plan.gamma,
                                                             "; ".join(self.notes) or None,
                                                             from_tag=setup.from_tag)
        hashes = common.format_hashes(short_hash(setup.content), short_hash(setup.style))
        if hashes:
            params[common.INFOTEXT_HASHES_KEY] = hashes
        else:
            params.pop(common.INFOTEXT_HASHES_KEY, None)

    # -- activation ------------------------------------------------------------------------------

    def activate(self, tag_params: list[Any] | None) -> None:
        """Resolve the arguments of this activation and prepare (not attach) what K-LoRA applies."""
        p = self.p
        if not getattr(p, "is_hr_pass", False) and getattr(p, "iteration", 0) != self._batch:
            self._batch = getattr(p, "iteration", 0)  # a new batch: its images get their own infotext
            self.batch_setup = None
            self.notes = []
            self._applied = False  # whether a pass of this batch ran with the denoiser hooks on
            self._warned.clear()  # an earlier batch's warnings are not about this batch's images
            self._emitted = []
            params = getattr(p, "extra_generation_params", None)
            if isinstance(params, dict):
                params.pop(common.WARNING_KEY, None)
        self.refiner_off = False  # the model is switched back to the base at the start of each pass
        try:
            tag = common.parse_tag(tag_params or None)
            if self.panel is None:
                if tag is None and not common.xyz_overrides(p):
                    raise common.KLoraArgsError(self.panel_error or "K-LoRA: bad arguments")
                panel = common.KLoraArgs()
            else:
                panel = self.panel
            args = common.effective_args(panel, tag, p)
            if not args.enabled:
                self.off("not applied in the hires pass")
                return
            args.require_pair()
        except common.KLoraArgsError as err:
            self.fail(str(err) if str(err).startswith("K-LoRA") else f"K-LoRA: {err}")
            return
        model = shared.sd_model
        info = getattr(model, "sd_checkpoint_info", None)
        if self.base_checkpoint is not None and info is not None and info != self.base_checkpoint:
            # a hires checkpoint, or the refiner kept loaded: the LoRAs were chosen for the base model
            self.off(f"not applied on {getattr(info, 'short_title', None) or 'another checkpoint'}")
            return
        seed = int(p.seeds[0]) if args.mode == "random" and getattr(p, "seeds", None) else 0
        key = (args, tag is not None, seed, id(model))
        if key == self._key and self.setup is not None:
            for message in self.setup.warnings:
                self.warn(message)
            self.batch_setup = self.setup
            self.write_infotext()
            self.sync()
            return
        mark = len(self._emitted)
        try:
            setup = self._prepare(args, tag is not None, seed, model)
        except KLoraInputError as err:
            self.fail(str(err))
            return
        except LoraFormatError as err:
            self.fail(f"K-LoRA: cannot read LoRA file {err}.")
            return
        except ValueError as err:  # e.g. the two files disagree on a layer's shape (another base model)
            self.fail(f"K-LoRA: {args.content} × {args.style}: {err}")
            return
        except Exception as err:  # unforeseen model or our own bug: a warning with the image, not just a log
            log.exception("K-LoRA: preparing %s × %s failed", args.content, args.style)
            self.fail(f"K-LoRA: cannot apply {args.content} × {args.style} to this model "
                      f"({type(err).__name__}: {err})")
            return
        setup.checkpoint = getattr(model, "sd_checkpoint_info", None)
        setup.warnings = self._emitted[mark:]
        self.detach()  # hooks of another plan must not stay
        self.setup = self.batch_setup = self.last_setup = setup
        self._key = key
        if setup.te_keys and not self._private_conds:
            _private_cond_caches(p)
            self._private_conds = True
        self.write_infotext()
        self.sync()

    def _prepare(self, args: common.KLoraArgs, from_tag: bool, seed: int, model: Any) -> _Setup:
        content, style = load_pair(args)
        plan = fusion.make_plan(content, style, args.to_fusion_options(seed))
        targets = model_targets(model)
        cov = cover(plan, content, style, targets)
        te_keys, unet_keys = self.check_coverage(args, plan, cov, "the loaded model")
        return _Setup(args, from_tag, content, style, plan, model, targets, te_keys, unet_keys)

    def check_coverage(self, args: common.KLoraArgs, plan: fusion.Plan, cov: Coverage,
                       model_label: str) -> tuple[list[str], list[str]]:
        """Refuse a pair that shares no layer the model has, warn about skipped layers; return the mapped
        (text-encoder keys that apply anything, denoiser keys)."""
        if cov.shared_total == 0:
            raise KLoraInputError(f"K-LoRA: {args.content} and {args.style} have no layer in common, so "
                                  "there is nothing to choose between; are they for the same base model?")
        if cov.shared_mapped == 0:
            raise KLoraInputError(
                f"K-LoRA: none of the {cov.shared_total} layers both {args.content} and {args.style} patch "
                f"exists in {model_label} ({cov.describe() or 'no shared layers'}); are the LoRAs made "
                f"for another base model?")
        if cov.missing or cov.mismatched:
            self.warn(f"K-LoRA: {len(cov.missing) + len(cov.mismatched)} of {len(plan.layers)} layers of "
                      f"{args.content} × {args.style} were skipped ({cov.describe()}).")
        te_keys: list[str] = []
        unet_keys: list[str] = []
        for key in cov.mapped:
            if is_text_encoder(key):
                if plan.choose(key, 0.0) != "none":
                    te_keys.append(key)
            else:
                unet_keys.append(key)
        return te_keys, unet_keys

    # -- sampling progress -----------------------------------------------------------------------

    def set_progress(self, denoiser: Any) -> None:
        """τ = (skipped + step) / (skipped + total) in denoiser calls (second-order samplers count two per
        step: ``total_steps`` = 2 × steps, as A1111's prompt editing counts); τ = (skipped + step) / full for
        the timestep samplers, whose ``total_steps`` (``t_enc + 1``) is not the count of calls left."""
        step, total = int(denoiser.step), int(denoiser.total_steps or 0)
        if total <= 0:
            return
        skipped, full = pass_schedule(self.p, denoiser)
        if _uses_timesteps(denoiser):
            if full > 0:
                self.clock.set_step(step, full - skipped, skipped)
            return
        per_step = max(1, total // max(1, int(getattr(denoiser, "steps", None) or total)))
        self.clock.set_step(step, total, skipped * per_step)

    def set_progress_fallback(self, params: Any) -> None:
        """Before 1.8 the callback has no denoiser: count the calls of the pass ourselves."""
        if params.sampling_step < self._fallback_last:
            self._fallback_calls = 0
        self._fallback_last = params.sampling_step
        total = int(params.total_sampling_steps or 0)
        if total > 0:
            skipped, full = pass_schedule(self.p)
            if _uses_timesteps(_pass_denoiser(self.p)):
                if full > 0:
                    self.clock.set_step(self._fallback_calls, full - skipped, skipped)
            else:
                self.clock.set_step(min(self._fallback_calls, total), total, skipped)
        self._fallback_calls += 1


def _uses_timesteps(denoiser: Any) -> bool:
    return CFGDenoiserTimesteps is not None and isinstance(denoiser, CFGDenoiserTimesteps)


def _pass_denoiser(p: Any) -> Any:
    """The CFG denoiser of ``p``'s sampler (``p.sampler`` is set before each pass's sampling starts)."""
    return getattr(getattr(p, "sampler", None), "model_wrap_cfg", None)


def _timesteps_length(denoiser: Any, steps: int) -> int:
    """Length of the timestep array of a ``steps``-step schedule: modules/sd_samplers_timesteps.py
    ``CompVisSampler.get_timesteps`` (``range(0, 1000, 1000 // steps)``, one step more when the penultimate
    sigma is discarded); equal to ``steps`` when ``steps`` divides 1000, longer otherwise (30 → 31)."""
    config = getattr(getattr(denoiser, "sampler", None), "config", None)
    options = getattr(config, "options", None) or {}
    discard = bool(options.get("discard_next_to_last_sigma", False))
    discard = discard or bool(getattr(shared.opts, "always_discard_next_to_last_sigma", False))
    n = max(1, steps + (1 if discard else 0))
    return len(range(0, 1000, max(1, 1000 // n)))


def pass_schedule(p: Any, denoiser: Any = None) -> tuple[int, int]:
    """(schedule steps skipped before this pass starts, steps of the full schedule) for ``p``'s current pass,
    for the sampler of ``denoiser`` (default: ``p.sampler``'s).

    modules/sd_samplers_common.py ``setup_img2img_steps``: an img2img pass (and the hires pass, which passes
    its step count explicitly and so takes the fix-steps branch) splits a ``steps``-step schedule at
    ``t_enc``. k-diffusion samplers (modules/sd_samplers_kdiffusion.py ``sample_img2img``) run its last
    ``t_enc + 1`` sigmas: ``steps - t_enc - 1`` skipped. The timestep samplers
    (modules/sd_samplers_timesteps.py ``CompVisSampler.sample_img2img``) run ``timesteps[:t_enc]``, whose
    ``t_enc - 1`` DDIM steps use the timestep indices ``t_enc - 1`` … 1; txt2img over the ``L`` timesteps
    of the same schedule uses index ``L - 1 - j`` at call ``j``, so img2img call ``i`` is txt2img call
    ``L - t_enc + i``: ``L - t_enc`` skipped, ``L = steps`` unless ``steps`` does not divide 1000.
    DDIM CFG++ calls as DDIM. PLMS over n timesteps calls twice on its first step (indices n - 1, n - 2), then
    once (call k at index n - k): the same shift holds for every call but the first. UniPC
    (``uni_pc.sample(steps=len(timesteps), t_start=timesteps[-1] / 1000 + 1 / 1000)``) re-spaces its own
    continuous times: ``t_enc`` calls over ``[≈ (t_enc - 1) / steps, 0]``, so its first call's τ is about
    ``1 / steps`` before where its noise sits, and the gap closes towards the end of the pass.
    """
    if getattr(p, "is_hr_pass", False):
        hr_steps = getattr(p, "hr_second_pass_steps", 0) or p.steps
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, hr_steps)
    elif isinstance(p, processing.StableDiffusionProcessingImg2Img):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p)
    else:
        return 0, int(p.steps)
    steps, t_enc = int(steps), int(t_enc)
    if denoiser is None:
        denoiser = _pass_denoiser(p)
    if _uses_timesteps(denoiser):
        return max(0, _timesteps_length(denoiser, steps) - t_enc), steps
    return max(0, steps - t_enc - 1), steps


def _private_cond_caches(p: Any) -> None:
    """Give ``p`` its own conditioning caches: conditionings made with K-LoRA's text-encoder deltas must not
    land in the webui's shared cache, whose key (modules/processing.py ``cached_params``) knows nothing of the
    panel — a later generation with the same prompt would reuse them."""
    for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        if hasattr(p, name):
            setattr(p, name, [None, None])


# ------------------------------------------------------------------------------------------------------
# the wrappers around p.setup_conds and p.sample


_WRAPPED = ("setup_conds", "sample")


def _wrap(p: Any, run: _Run) -> None:
    for name in _WRAPPED:
        current = p.__dict__.get(name)
        if getattr(current, "_klora_run", None) is run:
            continue
        inner = getattr(p, name)
        p.__dict__[name] = _make_wrapper(p, run, name, inner, current)


def _unwrap(p: Any, run: _Run) -> None:
    for name in _WRAPPED:
        current = p.__dict__.get(name)
        if getattr(current, "_klora_run", None) is run:
            previous = current._klora_previous
            if previous is None:
                del p.__dict__[name]
            else:
                p.__dict__[name] = previous


def _make_wrapper(p: Any, run: _Run, name: str, inner: Callable[..., Any],
                  previous: Any) -> Callable[..., Any]:
    window = "te" if name == "setup_conds" else "all"

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _window_run
        outer_window = _window_run
        run.windows.append(window)
        _window_run = run
        try:
            run.sync()
            return inner(*args, **kwargs)
        finally:
            run.windows.pop()
            _window_run = outer_window
            if name == "sample" and not run.windows:
                run.detach()
                _unwrap(p, run)
            else:
                try:
                    run.sync()  # only removes: the windows left want fewer parts
                except Exception:
                    run.detach()
                    raise

    wrapper._klora_run = run  # type: ignore[attr-defined]
    wrapper._klora_previous = previous  # type: ignore[attr-defined]
    return wrapper


# ------------------------------------------------------------------------------------------------------
# entry points (called by scripts/klora.py and the callbacks it registers)


def run_of(p: Any) -> _Run | None:
    """The run stored on ``p`` — not one a copy of ``p`` inherited from the object it was copied from."""
    run = getattr(p, "__dict__", {}).get(RUN_ATTR) if p is not None else None
    return run if isinstance(run, _Run) and run.p is p else None


def sweep(keep: _Run | None = None) -> int:
    """Remove the hooks of every run not inside one of its wrapper frames (left over after an error
    outside sampling, or a wrapper replaced by another extension); returns how many runs were cleaned."""
    with _registry_lock:
        stale = [r for r in _attached if r is not keep and not r.windows]
    for r in stale:
        r.detach()
    return len(stale)


def before_process(p: Any, script_args: Iterable[Any]) -> None:
    sweep()


def process(p: Any, script_args: Iterable[Any]) -> None:
    """Start of a generation: a fresh run (a copy of ``p`` may carry its original's, which is not ours)."""
    p.__dict__[RUN_ATTR] = _Run(p, script_args)
    p.__dict__[TAG_ATTR] = None
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        params.pop(common.WARNING_KEY, None)  # a copy of p may carry its original's


def after_extra_networks_activate(p: Any, script_args: Iterable[Any], extra_network_data: Any = None) -> None:
    run = run_of(p)
    if run is None:
        process(p, script_args)
        run = run_of(p)
        assert run is not None
    tag_params = p.__dict__.get(TAG_ATTR)
    if tag_params is None and isinstance(extra_network_data, dict):
        tag_params = list(extra_network_data.get(common.TAG_NAME, []))
    run.activate(tag_params)
    if run.setup is None:
        return
    _wrap(p, run)
    if getattr(p, "is_hr_pass", False) and not run.windows:
        # on only from the hires activation, inside a p.sample that is not wrapped: attach now (the hires
        # conditioning is computed next) until postprocess_batch
        run.fallback = True
        run.sync()


def process_batch(p: Any, script_args: Iterable[Any]) -> None:
    """With ``p.disable_extra_networks`` there is no activation: K-LoRA still follows the panel."""
    if getattr(p, "disable_extra_networks", False):
        p.__dict__[TAG_ATTR] = []
        after_extra_networks_activate(p, script_args, {})


def process_before_every_sampling(p: Any) -> None:
    """Start of a sampling pass (≥ 1.10): τ at the pass's start; attach if our wrapper was bypassed."""
    run = run_of(p)
    if run is None or run.setup is None:
        return
    skipped, full = pass_schedule(p)
    if full > 0:
        run.clock.tau = skipped / full
    if not run.windows and not run.refiner_off:
        run.fallback = True  # no wrapper frame: keep the hooks until postprocess_batch
        run.sync()


def postprocess_batch(p: Any) -> None:
    """After a batch's sampling: our wrapper frames are closed, so anything attached now came through the
    fallback of :func:`process_before_every_sampling`; remove it, and any wrapper left on ``p``, before
    extensions copy ``p`` in ``postprocess_image``."""
    run = run_of(p)
    if run is not None:
        run.detach()
        _unwrap(p, run)


def postprocess(p: Any, processed: Any) -> None:
    run = run_of(p)
    if run is None:
        return
    run.windows.clear()
    run.detach()
    _unwrap(p, run)
    apply.clear_cache()  # factors are reused across the batches and passes of one generation, not kept after
    setup = run.last_setup
    if setup is not None and setup.args.show_map and processed is not None:
        try:
            image = selection_map(setup.plan, int(p.steps), setup.args)
        except Exception as err:  # the map is an extra; never fail the generation for it
            log.warning("K-LoRA: could not draw the selection map: %s", err)
        else:
            processed.images.append(image)
            infotexts = getattr(processed, "infotexts", None)
            if isinstance(infotexts, list) and infotexts:
                infotexts.append(infotexts[0])


def on_cfg_denoiser(params: Any) -> None:
    """``script_callbacks.on_cfg_denoiser``: set τ before the model call(s) of each denoiser step."""
    denoiser = getattr(params, "denoiser", None)
    run = run_of(getattr(denoiser, "p", None)) if denoiser is not None else _window_run
    with _registry_lock:
        others = bool(_attached - {run})
    if others:
        sweep(keep=run)  # hooks of a run not sampling now must not touch this sampling
    if run is None or run.setup is None or run.refiner_off:
        return
    if run.model_switched():
        run.refiner_off = True
        run.detach()
        run.note("not applied after the switch to the refiner")
        return
    if denoiser is not None:
        run.set_progress(denoiser)
    else:
        run.set_progress_fallback(params)


def on_app_started(demo: Any, app: Any) -> None:
    """``script_callbacks.on_app_started`` (also fired by ``api_only()``): bad K-LoRA args in an API request,
    and names the webui's LoRA list lacks, get HTTP 422 with the reason — the webui only logs exceptions
    raised in script hooks, so the request would otherwise succeed without K-LoRA."""
    try:
        common.install_api_validation(app, name_exists=lora_exists)
    except Exception as err:  # K-LoRA works without it; bad args then only warn with the image
        log.warning("K-LoRA: API argument check not installed: %s", err)


def on_script_unloaded() -> None:
    with _registry_lock:
        runs = list(_attached)
    for r in runs:
        r.windows.clear()
        r.detach()
    apply.clear_cache()


# ------------------------------------------------------------------------------------------------------
# the tag, the map, the Analyze button, the settings, the panel


class ExtraNetworkKLora(extra_networks.ExtraNetwork):
    """``<klora:CONTENT:STYLE:…>``: registered so that the webui strips the tag from the text the model sees.
    ``activate`` only records the tag's parameters on ``p`` (called at every activation, with [] when the
    prompt has no tag); the work happens in the script's ``after_extra_networks_activate``, after every
    network (including the builtin Lora, which rebuilds its list) has activated."""

    def __init__(self) -> None:
        super().__init__(common.TAG_NAME)

    def activate(self, p: Any, params_list: list[Any]) -> None:
        p.__dict__[TAG_ATTR] = list(params_list)

    def deactivate(self, p: Any) -> None:
        pass


def selection_map(plan: fusion.Plan, steps: int, args: common.KLoraArgs) -> Any:
    from klora import viz

    return viz.render_selection_map(plan, max(1, steps), title=f"K-LoRA: {args.content} × {args.style}")


def analyze(args: common.KLoraArgs, steps: int) -> tuple[Any, str]:
    """The Analyze button: the selection map and the summary for a pair, without generating."""
    from klora import viz

    try:
        content, style = load_pair(args)
        plan = fusion.make_plan(content, style, args.to_fusion_options(0))
    except KLoraInputError as err:
        return None, f"**{err}**"
    except LoraFormatError as err:
        return None, f"**K-LoRA: cannot read LoRA file** `{err}`"
    except ValueError as err:
        return None, f"**K-LoRA:** {err}"
    text = viz.summarize(plan, steps)
    model = shared.sd_model
    if model is not None:
        try:
            cov = cover(plan, content, style, model_targets(model))
            text += (f"\n\nLoaded model: {len(cov.mapped)} of {len(plan.layers)} layers found"
                     + (f" ({cov.describe()})" if cov.describe() else "") + ".")
        except Exception as err:  # the analysis is useful without it
            log.debug("K-LoRA: coverage check failed: %s", err)
    return selection_map(plan, steps, args), "```\n" + text + "\n```"


def on_before_ui() -> None:
    """Register the tag and the XYZ plot axes (``extra_networks.initialize()`` ran just before)."""
    extra_networks.register_extra_network(ExtraNetworkKLora())
    try:
        common.register_xyz_axes(lora_names)
    except Exception as err:  # the XYZ script may be missing or changed; K-LoRA works without its axes
        log.warning("K-LoRA: XYZ plot axes not added: %s", err)


SETTINGS_SECTION = ("klora", "K-LoRA")


def on_ui_settings() -> None:
    """Settings → K-LoRA: panel defaults and the score cache size."""
    try:
        import gradio as gr
    except ImportError:  # only the webui's UI needs the component classes
        gr = None
    opts = shared.opts
    info = shared.OptionInfo
    opts.add_option("klora_default_pattern", info(
        "s", "Default pattern", gr.Radio if gr else None, {"choices": ["s", "s*"]},
        section=SETTINGS_SECTION).info("s: the paper's linear scale; s*: the official code's"
                                       ).needs_reload_ui())
    opts.add_option("klora_default_show_map", info(
        False, "Show the selection map by default", section=SETTINGS_SECTION).needs_reload_ui())
    opts.add_option("klora_cache_size", info(
        8, "LoRA pairs whose scores are kept in memory", gr.Number if gr else None, {"precision": 0},
        onchange=apply_cache_size, section=SETTINGS_SECTION).info("scores are computed once per pair"))
    apply_cache_size()


def apply_cache_size() -> None:
    size = getattr(shared.opts, "klora_cache_size", 8)
    try:
        scores.set_cache_size(max(0, int(size)))
    except (TypeError, ValueError):
        log.warning("K-LoRA: bad score cache size %r", size)


def panel_defaults() -> common.KLoraArgs:
    opts = shared.opts
    try:
        return common.KLoraArgs(pattern=getattr(opts, "klora_default_pattern", "s"),
                                show_map=bool(getattr(opts, "klora_default_show_map", False)))
    except (AttributeError, common.KLoraArgsError):
        return common.KLoraArgs()


def build_ui(script: Any, is_img2img: bool) -> list[Any]:
    return common.build_ui(script, is_img2img, lora_names, refresh_lora_names, analyze,
                           defaults=panel_defaults(), resolve_name=resolve_pasted_name)

