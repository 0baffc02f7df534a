"""The generation lifecycle, written once for every host (A1111 1.6 – 1.10 and Forge share
``modules/processing.py`` ``process_images_inner``; what differs is the
:class:`~klora.webui.hosts.base.Host`).

* ``process``: a :class:`Session` is stored on ``p`` with the panel's arguments.
* ``<klora:…>`` tags: the extra network only records its parameters on ``p``; every
  ``after_extra_networks_activate`` (per batch, the hires pass, the lowvram hires-cond path) resolves
  panel < tag < XYZ cell, reads both files through the webui's LoRA list, makes the plan (scores cached),
  maps canonical keys to the model's modules through the host and writes the infotext. Bad input becomes a
  warning under the images and in the infotext; that image is made without K-LoRA.
* Hooks exist only inside frames we own: the activation wraps ``p.setup_conds`` and ``p.sample`` on the
  instance; the wrapper attaches the hooks on entry (text-encoder layers for ``setup_conds``, all layers for
  ``sample``, which also covers the hires pass and its conditioning) and removes them in ``finally``, so they
  are gone when sampling ends, is interrupted, or raises — ``postprocess`` does not run after an exception,
  and nothing else has to. The wrappers remove themselves after ``p.sample``, before any later copy of
  ``p`` (ADetailer, XYZ) could inherit them. Fallbacks for a wrapper that another extension replaced:
  ``process_before_every_sampling`` attaches, ``postprocess_batch``/``postprocess`` detach, and the next
  generation, any other sampling's ``on_cfg_denoiser`` and ``on_script_unloaded`` remove what is left.
* ``on_cfg_denoiser`` sets τ (:mod:`klora.webui.schedule`). A model switch mid-pass (the SDXL refiner)
  detaches for the rest of the pass and says so in the infotext.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from modules import shared

from klora import apply, fusion, options
from klora.apply import Coverage, Hooks, Target
from klora.keys import is_text_encoder
from klora.layers import LoraFile, LoraFormatError
from klora.webui import infotext, loras, tag, xyz
from klora.webui.args import KLoraArgs, KLoraArgsError, from_script_args
from klora.webui.hosts.base import Host
from klora.webui.loras import KLoraInputError
from klora.webui.schedule import Progress

log = logging.getLogger("klora")

SESSION_ATTR = "_klora"
TAG_ATTR = "_klora_tag"


@dataclass
class Setup:
    """What one activation resolved: the arguments and, when K-LoRA applies, everything to attach."""

    args: KLoraArgs
    from_tag: bool
    content: LoraFile
    style: LoraFile
    plan: fusion.Plan
    model: Any
    targets: dict[str, Target]
    te_keys: list[str]
    unet_keys: list[str]
    note: str | None = None  # what the model family's defaults changed (infotext)
    checkpoint: Any = None  # the checkpoint the model held when the setup was made (Host.loaded_checkpoint)
    expert: str | None = None  # a second expert's checkpoint this setup continues on (Host.expert_pair)
    warnings: list[str] = field(default_factory=list)  # what preparing it warned (said again per batch)


_attached: set[Session] = set()  # sessions with hooks on some module (strong refs: they must stay findable)
_registry_lock = threading.RLock()
window_session: Session | None = None  # the session whose wrapper frame is innermost (hosts without denoiser)


class Session:
    """K-LoRA's state for one processing object ``p`` (stored as ``p._klora``)."""

    def __init__(self, p: Any, script_args: Iterable[Any], host: Host) -> None:
        self.p_ref = weakref.ref(p)
        self.host = host
        self.panel: KLoraArgs | None = None
        self.panel_error: str | None = None
        try:
            self.panel = from_script_args(list(script_args))
        except KLoraArgsError as err:
            self.panel_error = str(err)
        self.base_checkpoint = host.loaded_checkpoint(p, shared.sd_model)
        self.tag_params: list[Any] | None = None  # of the last activation (for a switch none announced)
        self.prompt_loras: tuple[str, ...] = ()
        self.setup: Setup | None = None  # for the current pass; None = K-LoRA off
        self.batch_setup: Setup | None = None  # what the current batch applied (infotext of its images)
        self.last_setup: Setup | None = None  # the last one that applied (for the map)
        self.progress = Progress()
        self.clock = self.progress.clock
        self.parts: dict[str, Hooks] = {}  # "te" / "unet" → attached hooks
        self.windows: list[str] = []  # wrapper frames on the stack: "te" (setup_conds) or "all" (sample)
        self.fallback = False  # attached by process_before_every_sampling because a wrapper was bypassed
        self.notes: list[str] = []
        self.refiner_off = False
        self._batch: int | None = None
        self._key: tuple | None = None
        self._warned: set[str] = set()
        self._emitted: list[str] = []
        self._private_conds = False
        self._applied = False

    @property
    def p(self) -> Any:
        return self.p_ref()

    # -- attachment ------------------------------------------------------------------------------

    def model_switched(self) -> bool:
        """Whether the loaded model is not the one the setup was made for: another object, or the same object
        with another checkpoint loaded into it (modules/sd_models.py ``reload_model_weights`` loads a
        checkpoint of the same architecture in place, e.g. a same-family refiner; Neo's fast refiner loads
        the weights alone, :meth:`Host.loaded_checkpoint`)."""
        setup, model = self.setup, shared.sd_model
        return (setup is None or model is not setup.model
                or self.host.loaded_checkpoint(self.p, model) != setup.checkpoint)

    def follow_switch(self) -> bool:
        """A model switch seen first by the denoiser (no activation announced it, e.g. extra networks off):
        activate again when the host continues K-LoRA on the new checkpoint (Wan 2.2's second expert);
        whether K-LoRA applies to the model now loaded."""
        setup = self.setup
        if setup is None or self.host.expert_pair(self.p, shared.sd_model, setup.args.content,
                                                  setup.args.style) is None:
            return False
        self.activate(self.tag_params, self.prompt_loras)
        return self.setup is not None and not self.model_switched()

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
                    self.parts[part] = apply.attach(setup.plan, setup.content, setup.style, setup.targets,
                                                    self.clock, keys)
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
            previous = params.get(infotext.WARNING_KEY)
            params[infotext.WARNING_KEY] = f"{previous} {message}" if previous else message

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
        if setup is not None and setup.expert is not None and self.batch_setup is not None:
            setup = self.batch_setup  # the pair the user chose; a second expert's pair is a note
        if setup is None:
            params.pop(infotext.INFOTEXT_KEY, None)
            params.pop(infotext.INFOTEXT_HASHES_KEY, None)
            return
        notes = [setup.note, *self.notes] if setup.note else self.notes
        params[infotext.INFOTEXT_KEY] = infotext.format_infotext(
            setup.args, setup.plan.gamma, "; ".join(notes) or None, from_tag=setup.from_tag)
        hashes = infotext.format_hashes(loras.short_hash(setup.content), loras.short_hash(setup.style))
        if hashes:
            params[infotext.INFOTEXT_HASHES_KEY] = hashes
        else:
            params.pop(infotext.INFOTEXT_HASHES_KEY, None)

    # -- activation ------------------------------------------------------------------------------

    def _new_batch(self) -> None:
        self._batch = getattr(self.p, "iteration", 0)  # a new batch: its images get their own infotext
        self.batch_setup = None
        self.notes = []
        self._applied = False  # whether a pass of this batch ran with the denoiser hooks on
        self._warned.clear()  # an earlier batch's warnings are not about this batch's images
        self._emitted = []
        params = getattr(self.p, "extra_generation_params", None)
        if isinstance(params, dict):
            params.pop(infotext.WARNING_KEY, None)

    def activate(self, tag_params: list[Any] | None, prompt_loras: Iterable[str] = ()) -> None:
        """Resolve the arguments of this activation and prepare (not attach) what K-LoRA applies.
        ``prompt_loras``: the names of the prompt's ``<lora:…>`` tags. On a checkpoint other than the one the
        generation started with, K-LoRA continues with the pair the host names for it (Wan 2.2's low-noise
        expert) or is off."""
        p = self.p
        self.tag_params, self.prompt_loras = tag_params, tuple(prompt_loras)
        if not getattr(p, "is_hr_pass", False) and getattr(p, "iteration", 0) != self._batch:
            self._new_batch()
        self.refiner_off = False  # the model is switched back to the base at the start of each pass
        try:
            from_tag = tag.parse_tag(tag_params or None)
            if self.panel is None:
                if from_tag is None and not xyz.overrides(p):
                    raise KLoraArgsError(self.panel_error or "K-LoRA: bad arguments")
                panel = KLoraArgs()
            else:
                panel = self.panel
            args = xyz.effective_args(panel, from_tag, p)
            if not args.enabled:
                self.off("not applied in the hires pass")
                return
            args.require_pair()
        except KLoraArgsError as err:
            self.fail(str(err) if str(err).startswith("K-LoRA") else f"K-LoRA: {err}")
            return
        model = shared.sd_model
        info = self.host.loaded_checkpoint(p, model)
        expert = None
        if self.base_checkpoint is not None and info is not None and info != self.base_checkpoint:
            title = getattr(info, "short_title", None) or "another checkpoint"
            pair = self.host.expert_pair(p, model, args.content, args.style)
            if pair is None:
                # a hires checkpoint, or the refiner kept loaded: the LoRAs were chosen for the base model
                self.off(f"not applied on {title}")
                return
            args, expert = replace(args, content=pair[0], style=pair[1]), title
        seed = int(p.seeds[0]) if args.mode == "random" and getattr(p, "seeds", None) else 0
        key = (args, args.given, from_tag is not None, seed, id(model), info, tuple(prompt_loras))
        if key == self._key and self.setup is not None:
            for message in self.setup.warnings:
                self.warn(message)
            self.keep_for_batch(self.setup)
            self.write_infotext()
            self.sync()
            return
        mark = len(self._emitted)
        try:
            setup = self.prepare(args, from_tag is not None, seed, model, prompt_loras)
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
        setup.checkpoint, setup.expert = info, expert
        setup.warnings = self._emitted[mark:]
        self.detach()  # hooks of another plan must not stay
        self.setup = self.last_setup = setup
        self.keep_for_batch(setup)
        self._key = key
        if setup.te_keys and not self._private_conds:
            private_cond_caches(p)
            self._private_conds = True
        if expert is not None:
            self.note(f"on {expert}: content {setup.args.content}, style {setup.args.style}")
        self.write_infotext()
        self.sync()
        if expert is not None and "all" in self.windows and self.parts:
            self.host.before_sampling(p, setup)  # the expert samples the rest of this pass

    def keep_for_batch(self, setup: Setup) -> None:
        """What the batch's infotext states: the pair the user chose, not a second expert's (a note)."""
        if setup.expert is None or self.batch_setup is None:
            self.batch_setup = setup

    def prepare(self, args: KLoraArgs, from_tag: bool, seed: int, model: Any,
                prompt_loras: Iterable[str] = ()) -> Setup:
        """Read the pair, make the plan and place it on ``model`` (the host's targets), checked; warn about
        the common mistakes (:func:`pair_warnings`)."""
        refusal = self.host.refusal(model)
        if refusal:
            raise KLoraInputError(refusal)
        family = self.host.family(model)
        args, note = with_family_defaults(args, family)
        content, style = loras.load_pair(args.content, args.style)
        for message in pair_warnings(args, content, style, prompt_loras):
            self.warn(message)
        plan = fusion.make_plan(content, style, args.to_fusion_options(seed), scoring_device())
        targets = self.host.targets(model, plan.layers)
        cov = apply.cover(plan, content, style, targets)
        te_keys, unet_keys = self.check_coverage(args, plan, cov, f"the loaded {family} model")
        return Setup(args, from_tag, content, style, plan, model, {k: targets[k] for k in cov.mapped},
                     te_keys, unet_keys, note)

    def check_coverage(self, args: KLoraArgs, plan: fusion.Plan, cov: Coverage,
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


def scoring_device() -> Any:
    """Where the scores' products are formed: the webui's compute device when it is not the CPU
    (modules/devices.py ``device``: A1111, Forge, Neo), else the CPU."""
    try:
        from modules import devices

        device = devices.device
    except (ImportError, AttributeError):
        return None
    return device if getattr(device, "type", "cpu") != "cpu" else None


def pair_warnings(args: KLoraArgs, content: LoraFile, style: LoraFile, prompt_loras: Iterable[str] = ()
                  ) -> list[str]:
    """What the user probably did not mean (the generation goes on; the warnings go with the image and into
    Analyze): one file as both LoRAs, a strength of 0, a LoRA of the pair also in the prompt as ``<lora:…>``
    (the webui adds its delta to the weights and K-LoRA adds it again)."""
    out = []
    if content.sha256 and content.sha256 == style.sha256:
        out.append(f"K-LoRA: {args.content} and {args.style} are the same file, so every layer gets that "
                   "LoRA whichever side is chosen; choose a subject LoRA and a style LoRA.")
    for side, strength in (("content", args.content_strength), ("style", args.style_strength)):
        if strength == 0:
            out.append(f"K-LoRA: the {side} strength is 0, so the layers that choose the {side} LoRA add "
                       "nothing.")
    pair = {os.path.realpath(f.path): name for f, name in ((content, args.content), (style, args.style))}
    for name in dict.fromkeys(prompt_loras):
        path = loras.file_of(name)
        if path is not None and os.path.realpath(path) in pair:
            out.append(f"K-LoRA: {pair[os.path.realpath(path)]} is also in the prompt as <lora:{name}:…>, so "
                       "its delta is applied twice (by the webui and by K-LoRA); remove that <lora> tag.")
    return out


def with_family_defaults(args: KLoraArgs, family: str) -> tuple[KLoraArgs, str | None]:
    """``args`` with the model family's option defaults (:data:`klora.options.FAMILY_DEFAULTS`: Flux uses the
    official code's ``s*``) where the user did not choose, and the note saying so (None when nothing
    changed)."""
    updates, note = options.family_defaults(family, args.to_dict(), args.given)
    return (replace(args, **updates), note) if updates else (args, None)


def private_cond_caches(p: Any) -> None:
    """Give ``p`` its own conditioning caches: conditionings made with K-LoRA's text-encoder deltas must not
    land in the webui's shared cache, whose key (modules/processing.py ``cached_params``) knows nothing of the
    panel — a later generation with the same prompt would reuse them."""
    for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        if hasattr(p, name):
            setattr(p, name, [None, None])


def session_of(p: Any) -> Session | None:
    """The session stored on ``p`` — not one a copy of ``p`` inherited from the object it was copied from."""
    session = getattr(p, "__dict__", {}).get(SESSION_ATTR) if p is not None else None
    return session if isinstance(session, Session) and session.p is p else None


def attached_sessions() -> set[Session]:
    """Sessions whose hooks are on some module now."""
    with _registry_lock:
        return set(_attached)


def sweep(keep: Session | None = None) -> int:
    """Remove the hooks of every session not inside one of its wrapper frames (left over after an error
    outside sampling, or a wrapper replaced by another extension); returns how many were cleaned."""
    with _registry_lock:
        stale = [s for s in _attached if s is not keep and not s.windows]
    for s in stale:
        s.detach()
    return len(stale)


# ------------------------------------------------------------------------------------------------------
# the wrappers around p.setup_conds and p.sample


_WRAPPED = ("setup_conds", "sample")


def wrap(p: Any, session: Session) -> None:
    for name in _WRAPPED:
        current = p.__dict__.get(name)
        if getattr(current, "_klora_session", None) is session:
            continue
        inner = getattr(p, name)
        p.__dict__[name] = _make_wrapper(p, session, name, inner, current)


def unwrap(p: Any, session: Session) -> None:
    for name in _WRAPPED:
        current = p.__dict__.get(name)
        if getattr(current, "_klora_session", None) is session:
            previous = current._klora_previous
            if previous is None:
                del p.__dict__[name]
            else:
                p.__dict__[name] = previous


def _make_wrapper(p: Any, session: Session, name: str, inner: Callable[..., Any],
                  previous: Any) -> Callable[..., Any]:
    window = "te" if name == "setup_conds" else "all"

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        global window_session
        outer = window_session
        session.windows.append(window)
        window_session = session
        try:
            session.sync()
            return inner(*args, **kwargs)
        finally:
            session.windows.pop()
            window_session = outer
            if name == "sample" and not session.windows:
                session.detach()
                unwrap(p, session)
            else:
                try:
                    session.sync()  # only removes: the windows left want fewer parts
                except Exception:
                    session.detach()
                    raise

    wrapper._klora_session = session  # type: ignore[attr-defined]
    wrapper._klora_previous = previous  # type: ignore[attr-defined]
    return wrapper
