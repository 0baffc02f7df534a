"""K-LoRA for diffusers pipelines: the engine as one more host, behind one call.

::

    import klora.diffusers
    with klora.diffusers.fuse(pipe, "dog.safetensors", "watercolor.safetensors", pattern="s*") as plan:
        image = pipe("a dog in a bucket", num_inference_steps=30).images[0]
    print(plan.summary())

:func:`fuse` reads both files (:func:`klora.formats.read_lora`), makes the plan
(:func:`klora.fusion.make_plan`), places every canonical layer key on the pipeline's modules and returns a
:class:`PipelineFusion`. Inside the ``with`` block forward hooks (:func:`klora.apply.attach`) add, in every
layer and at every sampling step, the delta the plan chooses; when the block ends, however it ends, the hooks
are gone. No weight is ever written.

**Modules.** Every Linear/Conv2d of the pipeline's ``unet`` or ``transformer`` and of its ``text_encoder``,
``text_encoder_2``, ``text_encoder_3`` is indexed under :func:`klora.keys.canonical_key` of its module path:
the function the reader builds file keys with, so a module and a file key meet by construction (for a UNet
and CLIP encoders it is what :func:`klora.keys.sd.module_targets` gives with diffusers naming; a test checks
it). The index sees through PEFT's LoRA layers (what ``load_lora_weights`` puts in place of a Linear; the
real Linear is its ``base_layer``) and torch.compile's wrapper (``_orig_mod``). Component names follow the
reader: a transformer's layers are ``transformer/…`` in files the Flux scheme reads and ``unet/…`` in files
the SD scheme reads (PEFT ``transformer.…`` of other DiTs, kohya ``lora_unet_…``), so a transformer is
indexed under both; ``text_encoder_2`` is ``te2`` (SDXL's CLIP-G), and also ``te3`` when the pipeline has no
``text_encoder_3`` (the Flux reader's name for Flux's T5). Where a pipeline fused an attention's projections
(``fuse_qkv_projections()``: ``to_qkv``, ``to_kv``, ``to_added_qkv``), ``to_q``/``to_k``/``to_v`` (and
``add_*_proj``) land on output-row slices of the fused Linear, which is what runs.

**Progress τ** is the pipeline's own: step ``i`` of ``N`` of its scheduler, read by a forward pre-hook of the
denoiser before each call (:func:`schedule_position`): the scheduler's ``step_index`` (before its first
``step()``: ``begin_index``, which diffusers' img2img and inpaint pipelines set to where ``strength`` starts
the pass, else 0), PNDM's ``counter``, or for the schedulers that keep no index (DDIM, DDPM) the position of
the denoiser's ``timestep`` in ``scheduler.timesteps``. Positions count entries of the full schedule, so an
img2img pass continues τ = (skipped + i) / full as in the webui; a second-order scheduler (Heun, KDPM2,
``order`` 2) has two entries per step, both at the same τ. Every model call between two ``scheduler.step``
calls sees the same τ, so batched and unbatched CFG, true CFG and guidance-distilled models agree.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from klora import apply, fusion, keys, scores, viz
from klora import options as option_table
from klora.apply import Coverage, Hooks, StepClock, Target
from klora.delta import dense_delta
from klora.formats import read_lora
from klora.layers import LoraFile

__all__ = [
    "FuseError",
    "KLoraWarning",
    "NoSharedLayerError",
    "PipelineFusion",
    "PipelineMap",
    "UnsupportedPipelineError",
    "fuse",
    "fuse_options",
    "map_pipeline",
    "read_options",
    "schedule_position",
]

LoraSource = str | os.PathLike[str] | LoraFile


class FuseError(ValueError):
    """K-LoRA cannot be fused into this pipeline with these LoRAs; the message says why."""


class UnsupportedPipelineError(FuseError):
    """The pipeline has no model K-LoRA can place layers on."""


class NoSharedLayerError(FuseError):
    """The two LoRAs share no layer the pipeline has: there is nothing to choose between."""


class KLoraWarning(UserWarning):
    """Something K-LoRA did differently from what was asked (layers skipped, a LoRA loaded twice…)."""


# ------------------------------------------------------------------------------------------------ options


def _plan_fields() -> frozenset[str]:
    """The options that shape a plan: the engine's (the table marks them) and ``gamma_value``, which
    :meth:`FusionOptions.from_fields` reads for a manual γ."""
    return frozenset(o.name for o in option_table.engine_options()) | {"gamma_value"}


def fuse_options() -> tuple[str, ...]:
    """The names :func:`fuse` takes: the tag's keys of the options that shape a plan, from the options
    table (their long field names and aliases are accepted too)."""
    plan_fields = _plan_fields()
    return tuple(o.tag for o in option_table.OPTIONS if o.tag and o.name in plan_fields)


def read_options(given: Mapping[str, Any]) -> tuple[dict[str, Any], frozenset[str]]:
    """Keyword options as the tag spells them (``cw``, ``pattern``, ``gamma``…, any spelling
    :func:`klora.options.parse` reads) → (field values, the fields the user chose). Raises
    :class:`klora.options.OptionError` (a ValueError) with the tag's messages."""
    plan_fields = _plan_fields()
    values: dict[str, Any] = {}
    set_by: dict[str, str] = {}
    for key, raw in given.items():
        try:
            name = option_table.field_name(key)
        except option_table.OptionError:
            raise option_table.OptionError(f"unknown K-LoRA argument {key!r}; fuse() takes "
                                           f"{', '.join(fuse_options())} (or their long names)") from None
        if name not in plan_fields:
            raise option_table.OptionError(
                f"K-LoRA argument {key!r} ({name}) does not shape the fusion, so fuse() does not take it; "
                f"its options are {', '.join(fuse_options())}"
                + ("; the LoRAs are fuse()'s second and third arguments" if name in ("content", "style")
                   else "; draw the map with plan.selection_map()" if name == "show_map" else ""), name)
        for field_name, value in option_table.parse(name, raw).items():
            if field_name in set_by:
                raise option_table.OptionError(
                    f"K-LoRA arguments {set_by[field_name]!r} and {key!r} both set {field_name}", field_name)
            set_by[field_name] = key
            values[field_name] = value
    if "gamma_value" in values:  # a γ value is a manual γ
        if values.setdefault("gamma", "manual") != "manual":
            raise option_table.OptionError(f"K-LoRA argument {set_by['gamma_value']!r} is a manual gamma, "
                                           f"but gamma is {values['gamma']!r}", "gamma_value")
        set_by.setdefault("gamma", set_by["gamma_value"])
    return values, frozenset(set_by)


# ------------------------------------------------------------------------------------------------ modules

# Pipeline attribute → the canonical components its layers have in files. A transformer's layers are
# ``transformer/…`` when the Flux scheme reads the file and ``unet/…`` when the SD scheme does (PEFT
# ``transformer.…`` files of other DiTs, kohya ``lora_unet_…``).
DENOISERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("unet", ("unet",)),
    ("transformer", ("transformer", "unet")),
)
TEXT_ENCODERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("text_encoder", ("te1",)),
    ("text_encoder_2", ("te2",)),
    ("text_encoder_3", ("te3",)),
)
# fused Linear of a diffusers attention → the projections whose output rows it holds, in order
FUSED_PROJECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("to_qkv", ("to_q", "to_k", "to_v")),
    ("to_kv", ("to_k", "to_v")),
    ("to_added_qkv", ("add_q_proj", "add_k_proj", "add_v_proj")),
)
_FAMILIES = {"FluxTransformer2DModel": "flux", "ChromaTransformer2DModel": "chroma"}


def _peft_base(module: nn.Module) -> nn.Module | None:
    """The layer a PEFT tuner layer (``peft.tuners.lora.Linear`` …) wraps, or None for any other module."""
    getter = getattr(module, "get_base_layer", None)
    if callable(getter) and isinstance(getattr(module, "base_layer", None), nn.Module):
        base = getter()
        return base if isinstance(base, nn.Module) else None
    return None


def _walk(module: nn.Module, path: str = "") -> Iterator[tuple[str, nn.Module]]:
    """(dotted path, module) of ``module`` and everything below it, with the paths LoRA files use: through
    torch.compile's ``OptimizedModule`` (``_orig_mod``); a PEFT tuner layer is given, not what it holds."""
    inner = getattr(module, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        yield from _walk(inner, path)
        return
    yield path, module
    if _peft_base(module) is not None:
        return
    for name, child in module.named_children():
        yield from _walk(child, f"{path}.{name}" if path else name)


def _unwrapped(module: nn.Module) -> nn.Module:
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, nn.Module) else module


def _rows(module: nn.Module) -> int | None:
    out = getattr(module, "out_features", None)
    return int(out) if isinstance(out, int) else None


def _fused_targets(path: str, attention: nn.Module) -> dict[str, Target]:
    """Module path of each projection → its rows in the fused Linear that a fused attention runs instead."""
    out: dict[str, Target] = {}
    for fused_name, parts in FUSED_PROJECTIONS:
        fused = getattr(attention, fused_name, None)
        if not isinstance(fused, nn.Module):
            continue
        fused = _peft_base(fused) or fused
        total = _rows(fused)
        sizes = [_rows(getattr(attention, part, None) or nn.Identity()) for part in parts]
        if total is None:
            continue
        if any(size is None for size in sizes):  # the separate projections are gone: equal thirds
            if total % len(parts):
                continue
            sizes = [total // len(parts)] * len(parts)
        if sum(sizes) != total:  # type: ignore[arg-type]
            continue
        start = 0
        for part, size in zip(parts, sizes, strict=True):
            assert size is not None
            out[f"{path}.{part}" if path else part] = Target(fused, slice(start, start + size))
            start += size
    return out


@dataclass
class PipelineMap:
    """Where canonical layer keys land in one pipeline.

    ``targets``: every key the pipeline's modules offer. ``denoisers``: the models whose calls are sampling
    steps (the step clock is read before each). ``peft``: key → the PEFT LoRA layer around its module (for
    LoRAs the user loaded with ``load_lora_weights``). ``family``: ``sd1``, ``sdxl``, ``flux``… or the
    denoiser's class name."""

    targets: dict[str, Target] = field(default_factory=dict)
    denoisers: list[nn.Module] = field(default_factory=list)
    peft: dict[str, nn.Module] = field(default_factory=dict)
    family: str = ""


def _family(denoiser: nn.Module) -> str:
    name = type(denoiser).__name__
    if name == "UNet2DConditionModel":
        config = getattr(denoiser, "config", None)
        if getattr(config, "addition_embed_type", None) == "text_time":
            return "sdxl"
        return "sd2" if getattr(config, "cross_attention_dim", None) == 1024 else "sd1"
    return _FAMILIES.get(name, name)


def _index(model: nn.Module, components: tuple[str, ...], found: PipelineMap) -> None:
    fused: dict[str, Target] = {}
    for path, module in _walk(model):
        base = _peft_base(module)
        layer = module if base is None else base
        if path and isinstance(layer, (nn.Linear, nn.Conv2d)):
            for component in components:
                key = keys.canonical_key(component, path)
                if key not in found.targets:
                    found.targets[key] = Target(layer)
                    if base is not None:
                        found.peft[key] = module
        if getattr(module, "fused_projections", False) is True:
            fused.update(_fused_targets(path, module))
    for path, target in fused.items():
        for component in components:
            key = keys.canonical_key(component, path)
            found.targets[key] = target
            found.peft.pop(key, None)


def map_pipeline(pipe: Any) -> PipelineMap:
    """Canonical key → target for every layer of ``pipe``'s denoiser and text encoders (see the module
    docstring). Raises :class:`UnsupportedPipelineError` when the pipeline has no UNet or transformer."""
    found = PipelineMap()
    for attr, components in DENOISERS:
        model = getattr(pipe, attr, None)
        if isinstance(model, nn.Module):
            found.denoisers.append(model)
            found.family = found.family or _family(_unwrapped(model))
            _index(model, components, found)
            break  # one denoiser: Wan 2.2's low-noise ``transformer_2`` is not patched, as diffusers' default
    if not found.denoisers:
        raise UnsupportedPipelineError(
            f"K-LoRA cannot map {type(pipe).__name__}: it has no `unet` or `transformer` model (K-LoRA "
            "places a LoRA pair on a diffusers pipeline's UNet or transformer and its text encoders)")
    has_third = isinstance(getattr(pipe, "text_encoder_3", None), nn.Module)
    for attr, components in TEXT_ENCODERS:
        model = getattr(pipe, attr, None)
        if isinstance(model, nn.Module):
            if attr == "text_encoder_2" and not has_third:
                components = (*components, "te3")  # Flux's T5: the Flux reader names it te3
            _index(model, components, found)
    return found


# -------------------------------------------------------------------------------------------------- steps


def _timestep_index(timesteps: torch.Tensor, timestep: Any) -> int | None:
    """Position of the denoiser's ``timestep`` argument (a number or a tensor of one value per sample) in
    the schedule, or None."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            return None
        value = float(timestep.reshape(-1)[0])
    elif isinstance(timestep, int | float) and not isinstance(timestep, bool):
        value = float(timestep)
    else:
        return None
    hits = (timesteps.detach().to("cpu", torch.float64) == value).nonzero()
    return int(hits[0, 0]) if len(hits) else None


def schedule_position(scheduler: Any, timestep: Any = None) -> tuple[int, int] | None:
    """(step ``i``, steps ``N``) of the denoiser call about to run, in the scheduler's full schedule; None
    when the scheduler has no schedule yet or cannot tell.

    The position in ``scheduler.timesteps`` is the scheduler's own ``step_index`` (before the first ``step()``
    its ``begin_index``, which img2img/inpaint pipelines set to where ``strength`` starts the pass, else 0),
    else PNDM's ``counter``, else where ``timestep`` sits in ``scheduler.timesteps`` (DDIM, DDPM: the
    pipelines that use them pass the scheduler's own timestep). A scheduler of ``order`` k has k entries per
    step (Heun: two model calls per step), so ``i`` = position // k and ``N`` = ⌈entries / k⌉."""
    timesteps = getattr(scheduler, "timesteps", None)
    if not isinstance(timesteps, torch.Tensor) or timesteps.ndim != 1 or len(timesteps) == 0:
        return None
    if hasattr(scheduler, "step_index"):
        position = scheduler.step_index
        if position is None:
            position = getattr(scheduler, "begin_index", None) or 0
    elif isinstance(getattr(scheduler, "counter", None), int):
        position = scheduler.counter
    else:
        position = _timestep_index(timesteps, timestep)
        if position is None:
            return None
    order = getattr(scheduler, "order", 1)
    order = order if isinstance(order, int) and order >= 1 else 1
    return int(position) // order, math.ceil(len(timesteps) / order)


class _StepReader:
    """The denoiser's forward pre-hook: sets the clock to the scheduler's step before each model call, and
    records the τ of each call of the latest run."""

    def __init__(self, pipe: Any, clock: StepClock, denoiser: nn.Module) -> None:
        self.pipe = pipe
        self.clock = clock
        self.taus: list[float] = []
        self.steps: int | None = None
        self.scheduler_name = ""
        self._schedule: torch.Tensor | None = None  # the run's timesteps (a new tensor per set_timesteps)
        self._warned = False
        # where a positional ``timestep`` sits (UNet2DConditionModel.forward(sample, timestep, …))
        try:
            params = list(inspect.signature(type(_unwrapped(denoiser)).forward).parameters.values())[1:]
        except (TypeError, ValueError):
            params = []
        names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self._timestep_arg = names.index("timestep") if "timestep" in names else None

    def _timestep(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if "timestep" in kwargs:
            return kwargs["timestep"]
        i = self._timestep_arg
        return args[i] if i is not None and i < len(args) else None

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        scheduler = getattr(self.pipe, "scheduler", None)
        self.scheduler_name = type(scheduler).__name__
        found = schedule_position(scheduler, self._timestep(args, kwargs))
        if found is None:
            if getattr(scheduler, "timesteps", None) is None:  # a call outside a run: nothing to tell
                return
            if not self._warned:
                self._warned = True
                warnings.warn(f"K-LoRA cannot tell the sampling step from the pipeline's "
                              f"{self.scheduler_name}; its calls keep tau = {self.clock.tau:g}", KLoraWarning,
                              stacklevel=2)
            return
        step, steps = found
        timesteps = scheduler.timesteps
        if timesteps is not self._schedule:
            self._schedule = timesteps
            self.taus = []
        self.steps = steps
        self.taus.append(self.clock.set_step(step, steps))


# ------------------------------------------------------------------------------------------ loaded twice


def _direction(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().to("cpu", torch.float32).reshape(-1)
    norm = flat.norm()
    return flat / norm if norm > 0 else flat


def _loaded_as(file: LoraFile, peft: Mapping[str, nn.Module], probes: int = 3) -> list[str]:
    """Adapters of the pipeline (``load_lora_weights``) whose deltas point the same way as ``file``'s on up to
    ``probes`` of its layers (the smallest): the same LoRA loaded twice, at whatever adapter weight."""
    probe_keys = sorted((k for k in file.layers if k in peft), key=lambda k: math.prod(file.layers[k].shape))
    if not probe_keys:
        return []
    matches: set[str] | None = None
    for key in probe_keys[:probes]:
        layer, wrapper = file.layers[key], peft[key]
        here: set[str] = set()
        for adapter in list(getattr(wrapper, "lora_A", {}) or {}):
            try:  # a warning's evidence: whatever fails here (a device PEFT cannot read, meta) is no evidence
                ours = _direction(dense_delta(layer))
                theirs = _direction(wrapper.get_delta_weight(adapter))  # PEFT's B·A·scaling
            except Exception:
                continue
            if theirs.numel() == ours.numel() and float(theirs @ ours) > 0.9999:
                here.add(adapter)
        matches = here if matches is None else matches & here
        if not matches:
            return []
    return sorted(matches or ())


# ------------------------------------------------------------------------------------------------- fusion


class PipelineFusion:
    """A LoRA pair K-LoRA fuses into one pipeline: the plan, where its layers land, the step clock.

    The hooks exist only inside ``with`` (or between :meth:`attach` and :meth:`remove`); they are removed
    however the block ends (an exception, ``KeyboardInterrupt``). They never write a weight.
    """

    def __init__(self, pipe: Any, content: LoraFile, style: LoraFile, plan: fusion.Plan, mapping: PipelineMap,
                 coverage: Coverage, note: str | None) -> None:
        self.pipeline = pipe
        self.content = content
        self.style = style
        self.plan = plan
        self.family = mapping.family
        self.note = note
        self.coverage = coverage
        self.targets: dict[str, Target] = {k: mapping.targets[k] for k in coverage.mapped}
        self.denoisers = list(mapping.denoisers)
        # text-encoder layers run once per prompt with a fixed choice: only those that apply something
        self.text_encoder_keys = [k for k in coverage.mapped
                                  if keys.is_text_encoder(k) and plan.choose(k, 0.0) != "none"]
        self.denoiser_keys = [k for k in coverage.mapped if not keys.is_text_encoder(k)]
        self.clock = StepClock()
        self._reader = _StepReader(pipe, self.clock, self.denoisers[0])
        self._hooks: Hooks | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._hooks is not None

    def attach(self) -> PipelineFusion:
        """Put the hooks in place (τ starts at 0)."""
        if self._hooks is not None:
            raise FuseError("this K-LoRA fusion is already attached")
        for denoiser in self.denoisers:
            if any(isinstance(h, _StepReader) for h in denoiser._forward_pre_hooks.values()):
                raise FuseError(f"another K-LoRA fusion is attached to this {type(self.pipeline).__name__}; "
                                "leave its `with` block first")
        self.clock.tau = 0.0
        hooks = apply.attach(self.plan, self.content, self.style, self.targets, self.clock,
                             self.denoiser_keys + self.text_encoder_keys)
        try:
            for denoiser in self.denoisers:
                self._handles.append(denoiser.register_forward_pre_hook(self._reader, with_kwargs=True))
        except BaseException:
            hooks.remove()
            for handle in self._handles:
                handle.remove()
            self._handles = []
            raise
        self._hooks = hooks
        return self

    def remove(self) -> None:
        """Remove every hook (idempotent)."""
        handles, self._handles = self._handles, []
        hooks, self._hooks = self._hooks, None
        try:
            for handle in handles:
                handle.remove()
        finally:
            if hooks is not None:
                hooks.remove()

    def __enter__(self) -> PipelineFusion:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    # -- what it does ------------------------------------------------------------------------------

    @property
    def tau(self) -> float:
        """The current sampling progress."""
        return self.clock.tau

    @property
    def taus(self) -> tuple[float, ...]:
        """τ of each denoiser call of the latest run (a step whose model runs twice, as with unbatched CFG,
        gives two entries)."""
        return tuple(self._reader.taus)

    @property
    def steps(self) -> int | None:
        """N of the latest run's schedule (None before any)."""
        return self._reader.steps

    def choices(self, steps: int | None = None) -> dict[str, str]:
        """Canonical key → one letter per step (C content, S style, B both, - none) for an N-step run
        (default: the latest run's N, else 30), every layer of the plan in model order."""
        return viz.choice_table(self.plan, steps or self.steps or 30)

    def summary(self, steps: int | None = None) -> str:
        """What was fused where, the options and γ used, and which layer applies which LoRA when (over the
        latest run's N steps, else 30, unless ``steps`` is given)."""
        n = steps or self.steps or 30
        cov = self.coverage
        skipped = len(cov.missing) + len(cov.mismatched)
        lines = [f"K-LoRA on {type(self.pipeline).__name__} ({self.family}): content {self.content.name}, "
                 f"style {self.style.name}",
                 f"applied: {len(self.denoiser_keys)} denoiser and {len(self.text_encoder_keys)} "
                 f"text-encoder layers" + (f"; skipped {skipped} ({cov.describe()})" if skipped else "")]
        if self.note:
            lines.append(f"note: {self.note}")
        if self._reader.taus:
            t = self._reader.taus
            lines.append(f"latest run: {len(t)} denoiser calls over {self.steps} steps of "
                         f"{self._reader.scheduler_name}, tau {t[0]:.3g} → {t[-1]:.3g}")
        return "\n".join([*lines, viz.summarize(self.plan, n)])

    def selection_map(self, steps: int | None = None, title: str | None = None) -> Any:
        """The selection map (a PIL image): one row per layer, one column per step."""
        n = steps or self.steps or 30
        return viz.render_selection_map(
            self.plan, n, title=title or f"K-LoRA selection map: {self.content.name} + {self.style.name}")

    def __repr__(self) -> str:
        state = "attached" if self.attached else "detached"
        return (f"<PipelineFusion {self.content.name} × {self.style.name} on {type(self.pipeline).__name__}, "
                f"{len(self.targets)} layers, {state}>")


def _read(source: LoraSource, role: str) -> LoraFile:
    if isinstance(source, LoraFile):
        return source
    if isinstance(source, str | os.PathLike):
        return read_lora(source, scores.known_files())
    raise TypeError(f"the {role} LoRA must be a path or a klora.layers.LoraFile, got {type(source).__name__}")


def _check(content: LoraFile, style: LoraFile, pipe: Any, plan: fusion.Plan, cov: Coverage) -> None:
    """Refuse a pair that shares no denoiser layer the pipeline has (text-encoder layers alone leave nothing
    to choose: their choice is fixed), warn about layers it skips."""
    shared = [k for k, lp in plan.layers.items() if lp.source == "shared" and not keys.is_text_encoder(k)]
    if not shared:
        raise NoSharedLayerError(f"K-LoRA: {content.name} and {style.name} have no UNet/transformer layer in "
                                 "common, so there is nothing to choose between; are they for the same base "
                                 "model?")
    mapped = set(cov.mapped)
    if not any(k in mapped for k in shared):
        missing = sum(k in cov.missing for k in shared)
        unfit = len(shared) - missing
        why = ", ".join(part for part in (f"{missing} with no module" if missing else "",
                                          f"{unfit} whose shape does not fit" if unfit else "") if part)
        raise NoSharedLayerError(
            f"K-LoRA: none of the {len(shared)} UNet/transformer layers both {content.name} and {style.name} "
            f"patch exists in this {type(pipe).__name__} ({why}); are the LoRAs made for another base model?")
    total = len(plan.layers)
    if cov.missing or cov.mismatched:
        shown = ", ".join((cov.missing + cov.mismatched)[:3])
        warnings.warn(f"K-LoRA: {len(cov.missing) + len(cov.mismatched)} of {total} layers of "
                      f"{content.name} × {style.name} were skipped ({cov.describe()}; e.g. {shown})",
                      KLoraWarning, stacklevel=3)


def fuse(pipe: Any, content: LoraSource, style: LoraSource, *, seed: int = 0,
         **options: Any) -> PipelineFusion:
    """Prepare K-LoRA for ``pipe`` with a content (subject) and a style LoRA; use the result as a context
    manager around the pipeline's calls.

    ``content``, ``style``: paths of ``.safetensors`` files or files already read
    (:func:`klora.formats.read_lora`). ``options``: the tag's options with the same names and values
    (``cw``, ``sw``, ``alpha``, ``beta``, ``pattern``, ``gamma``, ``mode``, ``scope``, ``te``, ``k`` …:
    :func:`fuse_options`); the model family's defaults apply where none is given (Flux: pattern ``s*``).
    ``seed``: the seed of mode ``random``.

    Raises :class:`klora.options.OptionError` for a bad option, :class:`klora.layers.LoraFormatError` for a
    file it cannot read, :class:`UnsupportedPipelineError` for a pipeline without a UNet or transformer,
    :class:`NoSharedLayerError` for a pair that shares no layer the pipeline has (all ValueErrors); warns
    (:class:`KLoraWarning`) about skipped layers and about a LoRA also loaded with ``load_lora_weights``.
    """
    values, chosen = read_options(options)
    mapping = map_pipeline(pipe)
    updates, note = option_table.family_defaults(mapping.family, values, chosen)
    fusion_options = option_table.FusionOptions.from_fields({**values, **updates}, seed=seed)
    content_file, style_file = _read(content, "content"), _read(style, "style")
    device = getattr(pipe, "device", None)  # scores are formed there when it is an accelerator
    plan = fusion.make_plan(content_file, style_file, fusion_options,
                            device if getattr(device, "type", "cpu") != "cpu" else None)
    coverage = apply.cover(plan, content_file, style_file, mapping.targets)
    _check(content_file, style_file, pipe, plan, coverage)
    for role, file in (("content", content_file), ("style", style_file)):
        adapters = _loaded_as(file, {k: m for k, m in mapping.peft.items() if k in coverage.mapped})
        if adapters:
            warnings.warn(
                f"K-LoRA: the {role} LoRA {file.name} is also loaded into the pipeline (adapter "
                f"{', '.join(map(repr, adapters))}); K-LoRA adds its delta on top, so it counts twice: "
                "unload it (pipe.delete_adapters) or leave it out of fuse()", KLoraWarning, stacklevel=2)
    return PipelineFusion(pipe, content_file, style_file, plan, mapping, coverage, note)
