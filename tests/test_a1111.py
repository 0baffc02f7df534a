"""The webui glue on A1111 (klora/webui/, the A1111 host, scripts/klora.py) in simulated generations.

The webui is the test double in tests/doubles/a1111 (a mirror of the v1.10.1 hook order, step counters and
exception paths); the model is a small real torch model with the module names of an SD1.5/SDXL
checkpoint, and the LoRAs are real kohya-format safetensors files. Every model call of a generation is
observed: the output of each LoRA-patched module minus its base output must equal the delta the plan
chooses at the τ A1111's schedule gives that call. Each generation ends with bit-identical weights and no
hook on any module.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import re
import sys
import time
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from doubles.models import tiny_sd
from safetensors.torch import save_file
from torch import nn

from klora import fusion, scores
from klora.delta import dense_delta
from klora.formats import read_lora
from klora.webui.hosts import a1111 as a1111_host

ROOT = Path(__file__).resolve().parent.parent
FAKE = Path(__file__).resolve().parent / "doubles" / "a1111"
HOST_MODULES = ("modules", "networks", "network", "overlay")


# the glue that imports the webui's modules binds to the double it was first imported with
GLUE = ("klora.webui.session", "klora.webui.schedule", "klora.webui.extension", "klora.py")


def _is_host_module(name: str) -> bool:
    return name.split(".")[0] in HOST_MODULES or name in GLUE


@pytest.fixture(scope="module")
def webui():
    """Put the test double on sys.path for this module only; restore sys.modules afterwards."""
    saved = {k: v for k, v in sys.modules.items() if _is_host_module(k)}
    for k in saved:
        del sys.modules[k]
    sys.path.insert(0, str(FAKE))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add contention on a shared machine
    try:
        import modules.errors
        import modules.extra_networks
        import modules.infotext_utils
        import modules.processing
        import modules.script_callbacks
        import modules.scripts
        import modules.sd_models
        import modules.shared
        import modules.shared_state
        import networks

        from klora.webui import args, extension, infotext, loras, schedule, session
        from klora.webui.hosts.a1111 import A1111Host

        yield SimpleNamespace(
            shared=modules.shared, processing=modules.processing, scripts=modules.scripts,
            callbacks=modules.script_callbacks, extra_networks=modules.extra_networks,
            sd_models=modules.sd_models, errors=modules.errors, state_cls=modules.shared_state.State,
            networks=networks, tiny=tiny_sd, infotext_utils=modules.infotext_utils, args=args,
            extension=extension, infotext=infotext, loras=loras, schedule=schedule, session=session,
            ext=extension.Extension(A1111Host()),
        )
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(FAKE))
        for k in [k for k in sys.modules if _is_host_module(k)]:
            del sys.modules[k]
        import klora.webui

        for name in GLUE:
            klora.webui.__dict__.pop(name.rpartition(".")[2], None)
        sys.modules.update(saved)


# ------------------------------------------------------------------------------------------------------
# LoRA files for the tiny models

# (module path inside the UNet in SGM names, kohya file key) — the layers the test LoRAs patch
UNET_SHARED = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_k",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_v",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_v",
    "input_blocks.1.1.transformer_blocks.0.ff.net.2",
    "input_blocks.1.1.proj_in",
    "input_blocks.1.0.in_layers.2",
    "input_blocks.2.0.op",
    "middle_block.1.transformer_blocks.0.attn1.to_q",
    "middle_block.1.transformer_blocks.0.attn2.to_q",
    "output_blocks.0.1.transformer_blocks.0.attn1.to_v",
    "output_blocks.1.1.conv",
]
UNET_CONTENT_ONLY = ["middle_block.0.emb_layers.1"]
UNET_STYLE_ONLY = ["output_blocks.0.0.out_layers.3"]
TE_SHARED = ["text_model.encoder.layers.0.self_attn.q_proj"]
TE_CONTENT_ONLY = ["text_model.encoder.layers.1.mlp.fc1"]
TE_STYLE_ONLY = ["text_model.encoder.layers.0.self_attn.out_proj"]
TE2_SHARED = [f"text_model.encoder.layers.0.self_attn.{x}_proj" for x in ("q", "k", "v", "out")] + [
    "text_model.encoder.layers.1.mlp.fc2"]
# content magnitudes per shared UNet layer: spread so that the layers flip at different τ
MAGNITUDES = [0.25, 0.4, 0.55, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.35, 1.5, 1.7, 2.0, 2.6]


def _factors(module: nn.Module, rank: int, scale: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    w = module.weight
    if w.dim() == 4:
        down = torch.randn(rank, w.shape[1], w.shape[2], w.shape[3], generator=g) * 0.2
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.2 * scale
    else:
        down = torch.randn(rank, w.shape[1], generator=g) * 0.2
        up = torch.randn(w.shape[0], rank, generator=g) * 0.2 * scale
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(float(rank))}


def _te2_module(model: nn.Module, path: str) -> Any:
    """An OpenCLIP module for an HF-named te2 path (what kohya files name): the MLP Linear, or for q/k/v/out a
    stand-in with the (E, E) weight each of them patches in the fused attention."""
    m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)$", path)
    assert m is not None, path
    block = model.transformer.resblocks[int(m.group(1))]
    if m.group(2) == "mlp":
        return block.mlp.get_submodule({"fc1": "c_fc", "fc2": "c_proj"}[m.group(3)])
    return SimpleNamespace(weight=torch.empty(block.attn.embed_dim, block.attn.embed_dim))


def write_lora(path: Path, sd_model: Any, side: str, seed: int, *, sdxl: bool = False,
               unet_paths: list[str] | None = None) -> Path:
    """A kohya-format LoRA for the tiny model: ``side`` content (rank 2, magnitudes spread) or style
    (rank 1)."""
    g = torch.Generator().manual_seed(seed)
    unet = sd_model.model.diffusion_model
    tensors: dict[str, torch.Tensor] = {}
    shared = unet_paths if unet_paths is not None else UNET_SHARED
    only = UNET_CONTENT_ONLY if side == "content" else UNET_STYLE_ONLY
    rank = 2 if side == "content" else 1
    for i, path_ in enumerate(shared + (only if unet_paths is None else [])):
        scale = MAGNITUDES[i % len(MAGNITUDES)] if side == "content" and path_ in shared else 1.0
        key = "lora_unet_" + path_.replace(".", "_")
        for suffix, t in _factors(unet.get_submodule(path_), rank, scale, g).items():
            tensors[f"{key}.{suffix}"] = t
    if unet_paths is None:
        te_only = TE_CONTENT_ONLY if side == "content" else TE_STYLE_ONLY
        if sdxl:
            te1 = sd_model.conditioner.embedders[0].wrapped.transformer
            te2 = sd_model.conditioner.embedders[1].wrapped.model
            encoders = [("lora_te1_", te1, TE_SHARED + te_only), ("lora_te2_", te2, TE2_SHARED)]
        else:
            te1 = sd_model.cond_stage_model.wrapped.transformer
            encoders = [("lora_te_", te1, TE_SHARED + te_only)]
        for prefix, model, paths in encoders:
            for path_ in paths:
                key = prefix + path_.replace(".", "_")
                module = _te2_module(model, path_) if prefix == "lora_te2_" else model.get_submodule(path_)
                for suffix, t in _factors(module, rank, 1.0, g).items():
                    tensors[f"{key}.{suffix}"] = t
    save_file(tensors, str(path))
    return path


# ------------------------------------------------------------------------------------------------------
# a webui session: model, LoRA folder, the script loaded as the webui loads it


class Session:
    def __init__(self, w: SimpleNamespace, tmp: Path, *, sdxl: bool = False) -> None:
        self.w = w
        self.tmp = tmp
        w.callbacks.clear_callbacks()
        w.extra_networks.initialize()
        w.errors.reported.clear()
        w.shared.state.begin()  # the webui keeps one State object (modules import it by name)
        w.shared.opts.img2img_fix_steps = False
        self.model = w.tiny.TinySD(sdxl=sdxl, seed=1, title="base.safetensors")
        self.refiner = w.tiny.TinySD(sdxl=sdxl, seed=2, title="refiner.safetensors")
        w.shared.opts.refiner_switch_by_sample_steps = False
        w.sd_models.loaded_models.clear()
        w.sd_models.loaded_models.update({"base.safetensors": self.model,
                                          "refiner.safetensors": self.refiner})
        w.sd_models.checkpoints_list.clear()
        w.sd_models.checkpoint_aliases.clear()
        for m in (self.model, self.refiner):
            m.sd_checkpoint_info.register()
        w.shared.opts.sd_model_checkpoint = "base.safetensors"
        w.shared.sd_model = self.model
        w.processing.StableDiffusionProcessing.cached_c = [None, None]
        w.processing.StableDiffusionProcessing.cached_uc = [None, None]
        w.processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
        w.processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
        lora_dir = tmp / "Lora"
        lora_dir.mkdir(exist_ok=True)
        write_lora(lora_dir / "dog.safetensors", self.model, "content", 11, sdxl=sdxl)
        write_lora(lora_dir / "watercolor.safetensors", self.model, "style", 12, sdxl=sdxl)
        write_lora(lora_dir / "cat.safetensors", self.model, "content", 13, sdxl=sdxl)
        write_lora(lora_dir / "ink.safetensors", self.model, "style", 14, sdxl=sdxl)
        w.shared.cmd_opts.lora_dir = str(lora_dir)
        import modules.cache  # the webui's cache folder (the score tables go there): the test's own

        modules.cache.cache_dir = str(tmp / "webui-cache")
        w.networks.list_available_networks()
        scores.clear_cache()
        w.loras._files.clear()
        # scripts/klora.py, imported the way modules/script_loading.py load_module does
        spec = importlib.util.spec_from_file_location("klora.py", ROOT / "scripts" / "klora.py")
        self.script_module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.script_module)
        self.script = self.script_module.KLoraScript()
        self.runner = w.scripts.ScriptRunner()
        self.runner.add_alwayson(self.script, len(self.w.args.ARG_NAMES))
        w.callbacks.before_ui_callback()  # registers the <klora> extra network (initialize() ran above)
        self.snapshot = {id(m): {k: v.detach().clone() for k, v in m.state_dict().items()}
                         for m in (self.model, self.refiner)}

    # -- processing objects ------------------------------------------------------------------------

    def panel(self, **values: Any) -> list[Any]:
        args = self.w.args.KLoraArgs(**values)
        return [getattr(args, n) for n in self.w.args.ARG_NAMES]

    def txt2img(self, prompt: str = "a dog", steps: int = 6, panel: list[Any] | None = None,
                **kw: Any) -> Any:
        p = self.w.processing.StableDiffusionProcessingTxt2Img(
            prompt=prompt, negative_prompt="blurry", steps=steps, width=32, height=32, cfg_scale=5.0,
            sampler_name=kw.pop("sampler_name", "Euler"), seed=7, **kw)
        p.scripts = self.runner
        p.script_args = panel if panel is not None else self.panel()
        return p

    def img2img(self, prompt: str = "a dog", steps: int = 10, denoise: float = 0.5,
                panel: list[Any] | None = None, **kw: Any) -> Any:
        latent = torch.randn(4, 4, 4, generator=torch.Generator().manual_seed(3))
        p = self.w.processing.StableDiffusionProcessingImg2Img(
            prompt=prompt, negative_prompt="blurry", steps=steps, width=32, height=32, cfg_scale=5.0,
            sampler_name=kw.pop("sampler_name", "Euler"), seed=7, init_images=[latent],
            denoising_strength=denoise, **kw)
        p.scripts = self.runner
        p.script_args = panel if panel is not None else self.panel()
        return p

    def generate(self, p: Any) -> Any:
        """modules/txt2img.py: ``with closing(p): process_images(p)`` inside call_queue's state.begin/end."""
        state = self.w.shared.state
        state.begin(job="test")
        try:
            with closing(p):
                return self.w.processing.process_images(p)
        finally:
            state.end()

    # -- invariants ---------------------------------------------------------------------------------

    def assert_clean(self) -> None:
        for model in (self.model, self.refiner):
            for name, m in model.named_modules():
                assert not m._forward_hooks, f"forward hook left on {name}"
                assert not m._forward_pre_hooks, f"pre-hook left on {name}"
            before = self.snapshot[id(model)]
            after = model.state_dict()
            assert before.keys() == after.keys()
            for k, v in before.items():
                assert torch.equal(v, after[k]), f"weight {k} changed"
        assert not self.w.session.attached_sessions()

    def hooked(self, model: nn.Module | None = None) -> int:
        """Forward hooks on the model, not counting the test's own observers."""
        return sum(not getattr(h, "observer", False) for m in (model or self.model).modules()
                   for h in m._forward_hooks.values())


@pytest.fixture
def sd15(webui, tmp_path):
    s = Session(webui, tmp_path)
    yield s
    webui.ext.on_script_unloaded()
    scores.set_disk_cache(None)


@pytest.fixture
def sdxl(webui, tmp_path):
    s = Session(webui, tmp_path, sdxl=True)
    yield s
    webui.ext.on_script_unloaded()
    scores.set_disk_cache(None)


# ------------------------------------------------------------------------------------------------------
# observing every model call


class Observer:
    """Registers (after K-LoRA's) on_cfg_denoiser callback that, per denoiser call, re-registers forward hooks
    on the patched UNet modules — after K-LoRA's own hooks, so they see the final outputs."""

    def __init__(self, session: Session, model: nn.Module | None = None,
                 on_call: Any = None) -> None:
        self.s = session
        self.model = model or session.model
        unet = self.model.model.diffusion_model
        paths = UNET_SHARED + UNET_CONTENT_ONLY + UNET_STYLE_ONLY
        self.modules = {p_: unet.get_submodule(p_) for p_ in paths}
        self.records: list[tuple[int, str, torch.Tensor, torch.Tensor]] = []  # (call, path, x, Δ output)
        self.calls: list[dict[str, Any]] = []
        self.handles: list[Any] = []
        self.on_call = on_call
        session.w.callbacks.on_cfg_denoiser(self.callback)

    def callback(self, params: Any) -> None:
        self.remove()
        d = params.denoiser
        call = {"step": d.step, "total": d.total_steps, "hr": bool(getattr(d.p, "is_hr_pass", False)),
                "klora_hooks": self.s.hooked(self.model), "model": self.s.w.shared.sd_model,
                "cond": params.text_cond}
        self.calls.append(call)
        index = len(self.calls) - 1
        for path_, m in self.modules.items():
            base: dict[str, torch.Tensor] = {}

            def first(module, args, out, base=base):  # runs before K-LoRA's hook: the module's own output
                base["out"] = out.detach().clone()

            def last(module, args, out, path_=path_, index=index, base=base):
                self.records.append((index, path_, args[0].detach().clone(), out.detach() - base.pop("out")))

            first.observer = last.observer = True
            self.handles.append(m.register_forward_hook(first, prepend=True))
            self.handles.append(m.register_forward_hook(last))
        if self.on_call is not None:
            self.on_call(index, params)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def file_layers(session: Session, name: str) -> dict[str, Any]:
    """SGM module path → LoraLayer of the file, matched through the kohya key the test wrote."""
    lora = read_lora(session.tmp / "Lora" / f"{name}.safetensors")
    return {layer.file_key.removeprefix("lora_unet_"): layer for layer in lora.layers.values()}


def delta_of(module: nn.Module, x: torch.Tensor, layers: list[Any]) -> torch.Tensor:
    total = torch.zeros(())
    for layer in layers:
        dw = dense_delta(layer).reshape(module.weight.shape)
        if isinstance(module, nn.Conv2d):
            total = total + F.conv2d(x, dw, None, module.stride, module.padding, module.dilation)
        else:
            total = total + F.linear(x, dw)
    return total


def check_calls(session: Session, obs: Observer, plan: fusion.Plan, taus: list[float],
                content: str = "dog", style: str = "watercolor") -> dict[str, int]:
    """Every observed output equals base + the plan's choice at the expected τ of its call."""
    c_layers, s_layers = file_layers(session, content), file_layers(session, style)
    assert len(obs.calls) == len(taus), (len(obs.calls), len(taus))
    assert obs.records
    seen = {"content": 0, "style": 0, "both": 0, "none": 0}
    for index, path_, x, applied in obs.records:
        module = obs.modules[path_]
        flat = path_.replace(".", "_")
        layer_c, layer_s = c_layers.get(flat), s_layers.get(flat)
        key = (layer_c or layer_s).key
        choice = plan.choose(key, taus[index])
        seen[choice] += 1
        layers = {"content": [layer_c], "style": [layer_s], "both": [layer_c, layer_s], "none": []}[choice]
        expected = delta_of(module, x, [lay for lay in layers if lay is not None])
        torch.testing.assert_close(applied, expected.expand_as(applied), rtol=1e-4,
                                   atol=2e-5, msg=lambda m, k=key, i=index: f"{k} at call {i}: {m}")
    assert seen["content"] and seen["style"], f"the run must exercise both choices: {seen}"
    return seen


def differs_from(plan: fusion.Plan, keys: list[str], taus: list[float], other: list[float]) -> bool:
    """Precondition of the τ tests: the expected τ and a wrong one lead to different choices somewhere."""
    return any(plan.choose(k, a) != plan.choose(k, b) for k in keys for a, b in zip(taus, other, strict=True))


def expected_plan(session: Session, content: str = "dog", style: str = "watercolor", **options: Any) -> Any:
    c = read_lora(session.tmp / "Lora" / f"{content}.safetensors")
    s = read_lora(session.tmp / "Lora" / f"{style}.safetensors")
    return fusion.make_plan(c, s, fusion.FusionOptions(**options))


def shared_keys(plan: fusion.Plan) -> list[str]:
    return [k for k, lp in plan.layers.items() if lp.source == "shared" and k.startswith("unet/")]


# ------------------------------------------------------------------------------------------------------
# whole generations


def test_script_registers_with_the_webui(sd15):
    assert sd15.script.title() == "K-LoRA"
    assert sd15.script.show(False) is sd15.w.scripts.AlwaysVisible
    registered = {c.callback for c in sd15.w.callbacks.callback_map["callbacks_cfg_denoiser"]}
    assert sd15.script_module.ext.on_cfg_denoiser in registered
    assert "klora" in sd15.w.extra_networks.extra_network_registry
    # a reload clears the callbacks and imports the script again: still one of each
    sd15.w.callbacks.clear_callbacks()
    spec = importlib.util.spec_from_file_location("klora.py", ROOT / "scripts" / "klora.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert len(sd15.w.callbacks.callback_map["callbacks_cfg_denoiser"]) == 1


def test_callbacks_register_on_webuis_before_1_8(sd15, monkeypatch):
    """A1111 1.6 and 1.7 take no callback name: modules/script_callbacks.py of v1.7.0 has
    ``on_cfg_denoiser(callback)`` and ``add_callback(callbacks, fun)``. The script loads there too."""
    callbacks = sd15.w.callbacks
    events = {"on_cfg_denoiser": "callbacks_cfg_denoiser", "on_before_ui": "callbacks_before_ui",
              "on_ui_settings": "callbacks_ui_settings", "on_script_unloaded": "callbacks_script_unloaded",
              "on_app_started": "callbacks_app_started"}
    for event, key in events.items():
        def register(callback, key=key):  # v1.7.0's signature: the callback alone
            callbacks.callback_map[key].append(callbacks.ScriptCallback("klora.py", callback, None))

        monkeypatch.setattr(callbacks, event, register)
    callbacks.clear_callbacks()
    spec = importlib.util.spec_from_file_location("klora.py", ROOT / "scripts" / "klora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for key in events.values():
        assert len(callbacks.callback_map[key]) == 1
    assert callbacks.callback_map["callbacks_cfg_denoiser"][0].callback == module.ext.on_cfg_denoiser


def test_txt2img_applies_the_plan_at_every_step(sd15):
    obs = Observer(sd15)
    panel = sd15.panel(enabled=True, content="dog", style="watercolor", show_map=True)
    p = sd15.txt2img(steps=8, panel=panel)
    processed = sd15.generate(p)
    plan = expected_plan(sd15)
    taus = [i / 8 for i in range(8)]
    seen = check_calls(sd15, obs, plan, taus)
    assert seen["content"] > 0 and seen["style"] > 0
    assert any(lp.threshold is not None and 0.5 < lp.threshold < 2.0 for lp in plan.layers.values())
    assert all(call["klora_hooks"] > 0 for call in obs.calls)
    info = p.extra_generation_params["K-LoRA"]
    assert "content: dog" in info and "style: watercolor" in info
    assert f"gamma: auto {plan.gamma:.4g}" in info
    assert "K-LoRA hashes" in p.extra_generation_params
    assert "K-LoRA: " in processed.infotexts[0]
    # the selection map comes after the images, with an infotext so the gallery stays aligned
    assert len(processed.images) == 2 and hasattr(processed.images[-1], "size")
    assert len(processed.infotexts) == len(processed.images)
    obs.remove()
    sd15.assert_clean()


def capture_conds(p: Any) -> dict[str, Any]:
    """Record p.c after setup_conds (close() clears it); K-LoRA's wrapper goes around this one."""
    captured: dict[str, Any] = {}
    orig = p.setup_conds

    def setup_conds() -> None:
        orig()
        captured["c"] = p.c

    p.setup_conds = setup_conds
    return captured


TE_FILE_KEYS = {("lora_te_" + p_.replace(".", "_")): p_ for p_ in TE_SHARED + TE_CONTENT_ONLY + TE_STYLE_ONLY}


def test_text_encoder_deltas_reach_the_conditioning(sd15):
    p = sd15.txt2img(panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    captured = capture_conds(p)
    sd15.generate(p)
    # reference: both files' text-encoder deltas written into a copy of the weights (te policy "both")
    ref = copy.deepcopy(sd15.model)
    te = ref.cond_stage_model.wrapped.transformer
    n = 0
    for name in ("dog", "watercolor"):
        for layer in read_lora(sd15.tmp / "Lora" / f"{name}.safetensors").layers.values():
            if layer.key.startswith("te1/"):
                te.get_submodule(TE_FILE_KEYS[layer.file_key]).weight.data += dense_delta(layer)
                n += 1
    assert n == 4
    with torch.no_grad():
        expected = ref.get_learned_conditioning(["a dog"])
        plain = sd15.model.get_learned_conditioning(["a dog"])
    torch.testing.assert_close(captured["c"], expected, rtol=1e-5, atol=1e-5)
    assert (expected - plain).abs().max() > 1e-3
    sd15.assert_clean()
    # the shared conditioning cache never holds K-LoRA conditionings: the same prompt without K-LoRA
    p2 = sd15.txt2img()
    captured2 = capture_conds(p2)
    sd15.generate(p2)
    torch.testing.assert_close(captured2["c"], plain)


def test_sdxl_fused_open_clip_attention_is_exact(sdxl):
    p = sdxl.txt2img(panel=sdxl.panel(enabled=True, content="dog", style="watercolor", te="content"))
    captured = capture_conds(p)
    sdxl.generate(p)
    ref = copy.deepcopy(sdxl.model)
    te1 = ref.conditioner.embedders[0].wrapped.transformer
    te2 = ref.conditioner.embedders[1].wrapped.model
    lora = read_lora(sdxl.tmp / "Lora" / "dog.safetensors")
    n_te2 = 0
    for layer in lora.layers.values():
        dw = dense_delta(layer)
        m = re.match(r"te(\d)/text_model_encoder_layers_(\d+)_(self_attn|mlp)_(\w+)$", layer.key)
        if m is None:
            continue
        enc, i, block, part = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        if enc == "1":
            te1.text_model.encoder.layers[i].get_submodule(f"{block}.{part}").weight.data += dw
            continue
        n_te2 += 1
        rb = te2.transformer.resblocks[i]
        if block == "mlp":
            rb.mlp.get_submodule({"fc1": "c_fc", "fc2": "c_proj"}[part]).weight.data += dw
        elif part == "out_proj":
            rb.attn.out_proj.weight.data += dw
        else:
            j = "qkv".index(part[0])
            e = rb.attn.embed_dim
            rb.attn.in_proj_weight.data[j * e:(j + 1) * e] += dw
    assert n_te2 == 5
    with torch.no_grad():
        expected = ref.get_learned_conditioning(["a dog"])
        plain = sdxl.model.get_learned_conditioning(["a dog"])
    torch.testing.assert_close(captured["c"], expected, rtol=1e-5, atol=1e-5)
    assert (captured["c"] - plain).abs().max() > 1e-3  # the deltas are visible
    sdxl.assert_clean()


def test_open_clip_attention_with_forward_patched_before_import(webui, monkeypatch):
    """A1111 loads the builtin Lora extension first; its extensions-builtin/Lora/lora_patches.py
    (``LoraPatches.__init__``) replaces ``nn.MultiheadAttention.forward`` with
    networks.py ``network_MultiheadAttention_forward(self, *args, **kwargs)``. The te2 hook imported after
    that must still read open_clip's call (``sgm``'s resblocks: q, k, v positional, attn_mask by name)."""
    original = nn.MultiheadAttention.forward

    def network_MultiheadAttention_forward(self, *args, **kwargs):
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.MultiheadAttention, "forward", network_MultiheadAttention_forward)
    spec = importlib.util.spec_from_file_location("klora_mha_late", ROOT / "klora" / "mha.py")
    late = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "klora_mha_late", late)
    spec.loader.exec_module(late)

    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2).eval()
    x = torch.randn(5, 3, 8)  # (L, N, D) as open_clip's text transformer calls it
    mask = torch.full((5, 5), float("-inf")).triu(1)
    w_in = mha.in_proj_weight.detach() + 0.1 * torch.randn(24, 8)
    w_out = mha.out_proj.weight.detach() + 0.1 * torch.randn(8, 8)
    with torch.no_grad():
        got, _ = late.forward(mha, (x, x, x), {"need_weights": False, "attn_mask": mask}, w_in, w_out)
        ref = copy.deepcopy(mha)
        ref.in_proj_weight.copy_(w_in)
        ref.out_proj.weight.copy_(w_out)
        expected, _ = original(ref, x, x, x, need_weights=False, attn_mask=mask)
        plain, _ = original(mha, x, x, x, need_weights=False, attn_mask=mask)
    torch.testing.assert_close(got, expected)
    assert (got - plain).abs().max() > 1e-3


def test_interrupted_generation_cleans_up(sd15):
    stopped: dict[str, Any] = {}

    def interrupt(index: int, params: Any) -> None:
        if index == 2:
            sd15.w.shared.state.interrupt()  # the next denoiser call raises InterruptedException
            stopped["hooks"] = sd15.hooked()

    obs = Observer(sd15, on_call=interrupt)
    p = sd15.txt2img(steps=8, n_iter=2, panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    processed = sd15.generate(p)
    obs.remove()
    assert stopped["hooks"] > 0
    assert len(obs.calls) == 3  # sampling stopped; the second batch never ran
    assert processed is not None
    sd15.assert_clean()


def test_failing_generation_cleans_up_without_postprocess(sd15, monkeypatch):
    calls = {"postprocess": 0}
    orig_post = sd15.script.postprocess

    def counting_postprocess(*a: Any) -> None:
        calls["postprocess"] += 1
        orig_post(*a)

    monkeypatch.setattr(sd15.script, "postprocess", counting_postprocess)
    orig_apply = sd15.model.apply_model

    def failing(x, t, cond):
        if sd15.model.calls >= 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return orig_apply(x, t, cond)

    monkeypatch.setattr(sd15.model, "apply_model", failing)
    obs = Observer(sd15)
    p = sd15.txt2img(steps=8, panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    with pytest.raises(RuntimeError, match="out of memory"):
        sd15.generate(p)
    obs.remove()
    assert calls["postprocess"] == 0
    assert obs.calls and obs.calls[-1]["klora_hooks"] > 0
    sd15.assert_clean()  # right after the exception, before any later generation


def test_failing_text_encoder_cleans_up(sd15, monkeypatch):
    te = sd15.model.cond_stage_model.wrapped.transformer
    seen: dict[str, int] = {}

    def broken(*a: Any, **k: Any) -> Any:
        seen["hooks"] = sd15.hooked()
        raise RuntimeError("text encoder failed")

    monkeypatch.setattr(te, "forward", broken)
    p = sd15.txt2img(panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    with pytest.raises(RuntimeError, match="text encoder failed"):
        sd15.generate(p)
    assert seen["hooks"] > 0  # the text-encoder hooks were on while it ran
    sd15.assert_clean()



@pytest.mark.parametrize("error", [ValueError("a layer cannot be hooked (simulated)"),
                                   RuntimeError("out of memory (simulated)")])
def test_attach_failure_warns_and_generates_without_klora(sd15, monkeypatch, error):
    """An error while hooking (our code, inside the wrappers) is a warning: the image is made without
    K-LoRA and the infotext does not claim it was applied (there is no hires pass here)."""

    def failing(*a: Any, **k: Any) -> Any:
        raise error

    monkeypatch.setattr(sd15.w.session.apply, "attach", failing)
    obs = Observer(sd15)
    p = sd15.txt2img(panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    processed = sd15.generate(p)
    obs.remove()
    assert len(processed.images) == 1
    warning = p.extra_generation_params["K-LoRA warning"]
    assert str(error) in warning and warning.endswith("The image was made without K-LoRA."), warning
    assert "hires" not in warning
    assert "K-LoRA" not in p.extra_generation_params and "K-LoRA hashes" not in p.extra_generation_params
    assert all(c["klora_hooks"] == 0 for c in obs.calls) and obs.calls
    sd15.assert_clean()



def test_unexpected_error_while_preparing_warns(sd15, monkeypatch):
    """An unforeseen error in our own preparation (here: a model layout the mapping does not expect) is a
    visible warning, not only a traceback in the console that the webui's ScriptRunner logs."""

    def broken(model: Any) -> Any:
        raise AttributeError("'Model' object has no attribute 'diffusion_model' (simulated)")

    monkeypatch.setattr(a1111_host, "model_targets", broken)
    p = sd15.txt2img(panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    processed = sd15.generate(p)
    assert len(processed.images) == 1
    assert not sd15.w.errors.reported, sd15.w.errors.reported
    warning = p.extra_generation_params["K-LoRA warning"]
    assert "diffusion_model" in warning and warning.endswith("The image was made without K-LoRA."), warning
    assert "K-LoRA" not in p.extra_generation_params
    sd15.assert_clean()


def test_batch_count_reapplies_per_batch_and_cleans_between(sd15):
    between: list[int] = []

    class Probe(sd15.w.scripts.Script):
        def title(self) -> str:
            return "probe"

        def before_process_batch(self, p, *args, **kwargs):
            between.append(sd15.hooked())

        def postprocess_batch(self, p, *args, **kwargs):
            between.append(sd15.hooked())

    sd15.runner.add_alwayson(Probe(), 0)
    obs = Observer(sd15)
    p = sd15.txt2img(steps=6, n_iter=3, panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    processed = sd15.generate(p)
    obs.remove()
    assert len(processed.images) == 3
    plan = expected_plan(sd15)
    check_calls(sd15, obs, plan, [i / 6 for i in range(6)] * 3)
    assert between == [0] * 6  # nothing attached between batches (ADetailer & co. run there)
    sd15.assert_clean()


def test_factors_are_reused_across_batches_and_freed_after_the_generation(sd15, monkeypatch):
    from klora import apply

    prepared: list[str] = []
    real_low_rank = apply.low_rank

    def counting_low_rank(layer, strength=1.0):
        prepared.append(layer.key)
        return real_low_rank(layer, strength)

    monkeypatch.setattr(apply, "low_rank", counting_low_rank)
    panel = sd15.panel(enabled=True, content="dog", style="watercolor")
    sd15.generate(sd15.txt2img(steps=4, n_iter=1, panel=panel))
    one_batch = len(prepared)
    assert one_batch > 0
    assert apply.cache_info()["files"] == 0  # nothing kept (no device memory) after postprocess
    prepared.clear()
    sd15.generate(sd15.txt2img(steps=4, n_iter=3, panel=panel))
    assert len(prepared) == one_batch  # batches 2 and 3 took the factors batch 1 prepared
    assert apply.cache_info()["files"] == 0
    sd15.assert_clean()


def test_a_failed_batch_warning_does_not_reach_the_next_batch(sd15):
    """Batches with their own prompts (modules/processing.py setup_prompts: a list prompt, as the prompt
    matrix and prompts-from-file scripts make): batch 1 has a bad tag, batch 2 a good one. The warning
    "made without K-LoRA" belongs to batch 1's images only."""
    p = sd15.txt2img(steps=4, n_iter=2)
    prompts = ["a <klora:dog:nobody>", "a <klora:dog:watercolor>"]

    def setup_prompts() -> None:  # the isinstance(self.prompt, list) branch of the real setup_prompts
        p.all_prompts = prompts
        p.all_negative_prompts = [p.negative_prompt] * len(prompts)
        p.main_prompt, p.main_negative_prompt = prompts[0], p.negative_prompt

    p.setup_prompts = setup_prompts
    processed = sd15.generate(p)
    first, second = processed.infotexts[:2]
    assert "K-LoRA warning:" in first and "no LoRA named 'nobody'" in first, first
    assert "K-LoRA:" in second and "content: dog" in second, second
    assert "K-LoRA warning" not in second, second
    sd15.assert_clean()


def test_img2img_continues_tau_from_its_start(sd15):
    obs = Observer(sd15)
    p = sd15.img2img(steps=10, denoise=0.5, panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    sd15.generate(p)
    obs.remove()
    # setup_img2img_steps: t_enc = int(0.5 · 10) = 5 → the last 6 of 10 steps; 4 skipped
    taus = [(4 + i) / 10 for i in range(6)]
    plan = expected_plan(sd15)
    assert differs_from(plan, shared_keys(plan), taus, [i / 6 for i in range(6)])
    check_calls(sd15, obs, plan, taus)
    sd15.assert_clean()


def test_img2img_fix_steps_branch(sd15):
    sd15.w.shared.opts.img2img_fix_steps = True
    obs = Observer(sd15)
    p = sd15.img2img(steps=5, denoise=0.5, panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    sd15.generate(p)
    obs.remove()
    # fix steps: a 10-step schedule (5 / 0.5), t_enc = 4 → its last 5 steps; 5 skipped
    taus = [(5 + i) / 10 for i in range(5)]
    plan = expected_plan(sd15)
    assert differs_from(plan, shared_keys(plan), taus, [i / 5 for i in range(5)])
    check_calls(sd15, obs, plan, taus)
    sd15.assert_clean()


def test_hires_pass_continues_tau(sd15):
    obs = Observer(sd15)
    p = sd15.txt2img(steps=6, enable_hr=True, hr_second_pass_steps=4, denoising_strength=0.5,
                     panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    sd15.generate(p)
    obs.remove()
    # first pass: i/6; hires: setup_img2img_steps(p, 4) → int(4 / 0.5) = 8 steps, t_enc 3 → 4 skipped
    first = [i / 6 for i in range(6)]
    second = [(4 + i) / 8 for i in range(4)]
    plan = expected_plan(sd15)
    assert [c["hr"] for c in obs.calls] == [False] * 6 + [True] * 4
    assert differs_from(plan, shared_keys(plan), second, [i / 4 for i in range(4)])
    check_calls(sd15, obs, plan, first + second)
    sd15.assert_clean()


def test_second_order_sampler_counts_model_calls(sd15):
    obs = Observer(sd15)
    p = sd15.txt2img(steps=4, sampler_name="Heun", panel=sd15.panel(enabled=True, content="dog",
                                                                     style="watercolor"))
    sd15.generate(p)
    obs.remove()
    # Heun: two calls per step except the last → 7 calls; total_steps = 2 · 4
    assert [c["total"] for c in obs.calls] == [8] * 7
    taus = [i / 8 for i in range(7)]
    plan = expected_plan(sd15)
    assert differs_from(plan, shared_keys(plan), taus, [min(i, 3) / 4 for i in range(7)])
    check_calls(sd15, obs, plan, taus)
    sd15.assert_clean()


def ddim_timesteps(session: Session, steps: int, **kw: Any) -> list[int]:
    """The timestep of each UNet call of a DDIM txt2img run of ``steps`` steps (K-LoRA off)."""
    timesteps: list[int] = []
    active = [True]  # callbacks stay registered for the session: record during this run only

    def record(params: Any) -> None:
        if active:
            timesteps.append(int(params.sigma[0].item()))

    session.w.callbacks.on_cfg_denoiser(record)
    try:
        session.generate(session.txt2img(steps=steps, sampler_name="DDIM", **kw))
    finally:
        active.clear()
    return timesteps


def test_timestep_sampler_txt2img_tau(sd15):
    """modules/sd_samplers_timesteps_impl.py ddim: a 10-step run makes 9 calls, call j at timestep index
    9 - j of the 10 (1000 // 10 apart), τ = j / 10."""
    timesteps = ddim_timesteps(sd15, 10)
    assert timesteps == [901 - 100 * j for j in range(9)]
    obs = Observer(sd15)
    sd15.generate(sd15.txt2img(steps=10, sampler_name="DDIM",
                               panel=sd15.panel(enabled=True, content="dog", style="watercolor")))
    obs.remove()
    assert [c["total"] for c in obs.calls] == [10] * 9
    check_calls(sd15, obs, expected_plan(sd15), [j / 10 for j in range(9)])
    sd15.assert_clean()


@pytest.mark.parametrize("steps, denoise, length", [(10, 0.8, 10), (30, 0.8, 31)])
def test_timestep_sampler_img2img_continues_tau(sd15, steps, denoise, length):
    """DDIM img2img (CompVisSampler.sample_img2img) runs timesteps[:t_enc]: t_enc - 1 calls at indices
    t_enc - 1 … 1 — call i uses the timestep of txt2img call L - t_enc + i (L timesteps: 10 for 10 steps,
    31 for 30, as 1000 // 30 = 33), so τ = (L - t_enc + i) / steps."""
    reference = ddim_timesteps(sd15, steps)
    assert len(reference) == length - 1
    timesteps: list[int] = []
    obs = Observer(sd15, on_call=lambda index, params: timesteps.append(int(params.sigma[0].item())))
    p = sd15.img2img(steps=steps, denoise=denoise, sampler_name="DDIM",
                     panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    sd15.generate(p)
    obs.remove()
    t_enc = int(denoise * steps)
    taus = [(length - t_enc + i) / steps for i in range(t_enc - 1)]
    assert [c["total"] for c in obs.calls] == [t_enc + 1] * (t_enc - 1)
    assert timesteps == [reference[round(tau * steps)] for tau in taus]
    plan = expected_plan(sd15)
    # what the k-diffusion split (steps - t_enc - 1 skipped) would give instead
    kdiffusion_split = [(steps - t_enc - 1 + i) / steps for i in range(t_enc - 1)]
    assert differs_from(plan, shared_keys(plan), taus, kdiffusion_split)
    check_calls(sd15, obs, plan, taus)
    sd15.assert_clean()


def test_timestep_sampler_hires_pass_continues_tau(sd15):
    """DDIM hires pass: setup_img2img_steps(p, 6) at denoise 0.5 → a 12-step schedule (13 timesteps,
    1000 // 12 = 83 apart), t_enc 5: 4 calls at τ = (13 - 5 + i) / 12, after the first pass's 9 at j / 10."""
    reference = ddim_timesteps(sd15, 12)
    timesteps: list[int] = []
    obs = Observer(sd15, on_call=lambda index, params: timesteps.append(int(params.sigma[0].item())))
    panel = sd15.panel(enabled=True, content="dog", style="watercolor")
    p = sd15.txt2img(steps=10, sampler_name="DDIM", enable_hr=True, hr_second_pass_steps=6,
                     denoising_strength=0.5, panel=panel)
    sd15.generate(p)
    obs.remove()
    first = [j / 10 for j in range(9)]
    second = [(8 + i) / 12 for i in range(4)]
    assert [c["hr"] for c in obs.calls] == [False] * 9 + [True] * 4
    assert timesteps[9:] == [reference[8 + i] for i in range(4)]
    plan = expected_plan(sd15)
    assert differs_from(plan, shared_keys(plan), second, [(6 + i) / 12 for i in range(4)])
    check_calls(sd15, obs, plan, first + second)
    sd15.assert_clean()


def test_refiner_switch_detaches_for_the_rest_of_the_pass(sdxl):
    obs = Observer(sdxl)
    sdxl.w.shared.opts.refiner_switch_by_sample_steps = True  # the double's k-diffusion has no sigma table
    p = sdxl.txt2img(steps=6, refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.5,
                     panel=sdxl.panel(enabled=True, content="dog", style="watercolor"))
    sdxl.generate(p)
    obs.remove()
    models = [c["model"] for c in obs.calls]
    assert models[:3] == [sdxl.model] * 3 and models[3:] == [sdxl.refiner] * 3
    assert [c["klora_hooks"] > 0 for c in obs.calls[:3]] == [True] * 3
    assert sdxl.hooked(sdxl.refiner) == 0
    base_calls = {i for i, c in enumerate(obs.calls) if c["model"] is sdxl.model}
    assert all(index in base_calls for index, *_ in obs.records)  # the base UNet did not run after
    info = p.extra_generation_params["K-LoRA"]
    assert "refiner" in info and "content: dog" in info
    sdxl.assert_clean()



def test_refiner_segment_is_conditioned_by_the_refiner_without_deltas(sdxl):
    """modules/sd_samplers_common.py apply_refiner: after the switch the conditioning is made again by the
    refiner's text encoders (``setup_conds``, then ``update_inner_model`` hands it to the sampler); K-LoRA's
    text-encoder deltas, made for the base, must not be in it."""
    obs = Observer(sdxl)
    sdxl.w.shared.opts.refiner_switch_by_sample_steps = True
    p = sdxl.txt2img(steps=6, refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.5,
                     panel=sdxl.panel(enabled=True, content="dog", style="watercolor", te="both"))
    sdxl.generate(p)
    obs.remove()
    with torch.no_grad():
        base_clean = sdxl.model.get_learned_conditioning(["a dog"])
        refiner_clean = sdxl.refiner.get_learned_conditioning(["a dog"])
    assert not torch.allclose(obs.calls[0]["cond"], base_clean)  # the base pass had the deltas
    assert [c["model"] is sdxl.refiner for c in obs.calls] == [False] * 3 + [True] * 3
    for call in obs.calls[3:]:
        torch.testing.assert_close(call["cond"], refiner_clean, rtol=0, atol=0)
    sdxl.assert_clean()

def test_refiner_loaded_into_the_same_model_object_detaches(sdxl, monkeypatch):
    """modules/sd_models.py reload_model_weights: with the default sd_checkpoints_limit = 1, a refiner of the
    base's architecture is loaded in place (load_model_weights into the same object; only its
    sd_checkpoint_info changes), so the switch cannot be seen by comparing model objects."""
    w = sdxl.w
    states = {m.sd_checkpoint_info.title: {k: v.clone() for k, v in m.state_dict().items()}
              for m in (sdxl.model, sdxl.refiner)}
    infos = {m.sd_checkpoint_info.title: m.sd_checkpoint_info for m in (sdxl.model, sdxl.refiner)}

    def reload_in_place(sd_model=None, info=None, forced_reload=False):
        info = info or w.sd_models.select_checkpoint()
        model = w.shared.sd_model
        if model.sd_checkpoint_info is not info:
            with torch.no_grad():
                model.load_state_dict(states[info.title])
            model.sd_checkpoint_info = info
        return model

    monkeypatch.setattr(w.sd_models, "reload_model_weights", reload_in_place)
    obs = Observer(sdxl)
    sdxl.w.shared.opts.refiner_switch_by_sample_steps = True  # the double's k-diffusion has no sigma table
    p = sdxl.txt2img(steps=6, refiner_checkpoint="refiner.safetensors", refiner_switch_at=0.5,
                     panel=sdxl.panel(enabled=True, content="dog", style="watercolor"))
    sdxl.generate(p)
    obs.remove()
    assert [c["model"] is sdxl.model for c in obs.calls] == [True] * 6  # one object throughout
    assert [c["klora_hooks"] > 0 for c in obs.calls] == [True] * 3 + [False] * 3
    info = p.extra_generation_params["K-LoRA"]
    assert "refiner" in info and "content: dog" in info
    reload_in_place(info=infos["base.safetensors"])  # the next generation's first reload
    sdxl.assert_clean()


def test_tag_wins_over_panel(sd15):
    obs = Observer(sd15)
    p = sd15.txt2img(prompt="a cat <klora:cat:ink:beta=0.8>",
                     panel=sd15.panel(enabled=False, content="dog", style="watercolor"))
    sd15.generate(p)
    obs.remove()
    info = p.extra_generation_params["K-LoRA"]
    assert "content: cat" in info and "style: ink" in info and "beta: 0.8" in info and "source: tag" in info
    plan = expected_plan(sd15, "cat", "ink", beta=0.8)
    check_calls(sd15, obs, plan, [i / 6 for i in range(6)], content="cat", style="ink")
    sd15.assert_clean()


def test_hires_prompt_with_its_own_tag(sd15):
    """K-LoRA only in the hires prompt: off in the first pass, on in the hires pass, and gone afterwards."""
    obs = Observer(sd15)
    p = sd15.txt2img(prompt="a dog", steps=6, enable_hr=True, hr_second_pass_steps=4, denoising_strength=0.5,
                     hr_prompt="a dog <klora:dog:watercolor>")
    sd15.generate(p)
    obs.remove()
    assert [c["klora_hooks"] > 0 for c in obs.calls] == [False] * 6 + [True] * 4
    assert "content: dog" in p.extra_generation_params["K-LoRA"]
    sd15.assert_clean()



def test_hires_prompt_with_a_bad_tag_keeps_the_first_pass_field(sd15):
    """K-LoRA applied in the first pass, a bad tag in the hires prompt: the field stays (the first pass used
    it) with a note, and the warning names the hires pass."""
    obs = Observer(sd15)
    p = sd15.txt2img(prompt="a <klora:dog:watercolor>", steps=6, enable_hr=True, hr_second_pass_steps=4,
                     denoising_strength=0.5, hr_prompt="a <klora:dog:nobody>")
    sd15.generate(p)
    obs.remove()
    assert [c["klora_hooks"] > 0 for c in obs.calls] == [True] * 6 + [False] * 4
    info = p.extra_generation_params["K-LoRA"]
    assert "content: dog" in info and "not applied in the hires pass" in info, info
    assert p.extra_generation_params["K-LoRA warning"].endswith("The hires pass was made without K-LoRA.")
    sd15.assert_clean()


def test_panel_applies_with_extra_networks_disabled(sd15):
    obs = Observer(sd15)
    p = sd15.txt2img(steps=6, panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    p.disable_extra_networks = True
    sd15.generate(p)
    obs.remove()
    check_calls(sd15, obs, expected_plan(sd15), [i / 6 for i in range(6)])
    sd15.assert_clean()


def test_xyz_cell_overrides(sd15):
    p = sd15.txt2img(panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    p._klora_xyz = {"alpha": 2.0, "style": "ink"}  # what the XYZ axes' apply() stores on the cell's copy
    sd15.generate(p)
    info = p.extra_generation_params["K-LoRA"]
    assert "alpha: 2" in info and "style: ink" in info
    sd15.assert_clean()


@pytest.mark.parametrize(("prompt", "panel", "message"), [
    ("a <klora:dog:watercolor> <klora:cat:ink>", {}, "2 <klora> tags"),
    ("a dog", {"enabled": True, "content": "nobody", "style": "watercolor"}, "no LoRA named 'nobody'"),
    ("a <klora:dog:watercolor:alpha=much>", {}, "alpha"),
    ("a dog", {"enabled": True, "content": "broken", "style": "watercolor"}, "cannot read LoRA file"),
    ("a dog", {"enabled": True, "content": "other", "style": "other2"}, "another base model"),
    ("a dog", {"enabled": True, "content": "other", "style": "watercolor"}, "no layer in common"),
    ("a dog", {"enabled": True, "content": "dog"}, "no style LoRA"),
])
def test_bad_input_warns_and_generates_without_klora(sd15, prompt, panel, message):
    lora_dir = sd15.tmp / "Lora"
    (lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    # LoRAs for another base model: a layer this UNet does not have
    key = "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q"
    for name in ("other", "other2"):
        tensors = {f"{key}.lora_down.weight": torch.randn(2, 640),
                   f"{key}.lora_up.weight": torch.randn(640, 2)}
        save_file(tensors, str(lora_dir / f"{name}.safetensors"))
    sd15.w.networks.list_available_networks()
    obs = Observer(sd15)
    p = sd15.txt2img(prompt=prompt, panel=sd15.panel(**panel))
    processed = sd15.generate(p)
    obs.remove()
    assert message in processed.comments, processed.comments
    assert "without K-LoRA" in processed.comments
    assert "K-LoRA" not in p.extra_generation_params and "K-LoRA hashes" not in p.extra_generation_params
    # the API's answer has extra_generation_params but not the comments: the warning is there too
    warning = p.extra_generation_params["K-LoRA warning"]
    assert message in warning and warning.count("without K-LoRA") == 1, warning
    assert re.search(r"[^.!?][.!?] The image was made without K-LoRA\.$", warning), warning
    assert f"K-LoRA warning: {sd15.w.infotext_utils.quote(warning)}" in processed.infotexts[0]
    assert sd15.w.infotext.infotext_paste_values({"K-LoRA warning": warning}) == {"enabled": False}
    assert all(c["klora_hooks"] == 0 for c in obs.calls) and obs.calls
    for *_, applied in obs.records:  # the plain model ran
        assert torch.count_nonzero(applied) == 0
    assert len(processed.images) == 1
    # the next generation from a copy of p does not inherit the warning
    good = copy.copy(p)
    good.extra_generation_params = p.extra_generation_params  # a shallow copy shares the dict
    good.prompt, good.script_args = "a dog", sd15.panel(enabled=True, content="dog", style="watercolor")
    sd15.generate(good)
    obs.remove()  # its callback put hooks on for that generation too
    assert "K-LoRA warning" not in good.extra_generation_params and "K-LoRA" in good.extra_generation_params
    sd15.assert_clean()


# ------------------------------------------------------------------------------------------------------
# the HTTP API: on_app_started puts the argument check in front of the webui's app


class StartingApp:
    """The part of starlette's ``Starlette`` that ``install_api_validation`` uses, as webui.py ``api_only()``
    passes it to ``on_app_started``: not started (``middleware_stack`` None), so ``add_middleware`` works.
    Behind the middleware sits the webui, which here records the body it gets."""

    def __init__(self) -> None:
        self.middleware_stack: Any = None
        self.user_middleware: list[tuple[Any, dict[str, Any]]] = []
        self.received: list[Any] = []

    def add_middleware(self, cls: Any, **options: Any) -> None:
        self.user_middleware.insert(0, (cls, options))

    async def webui(self, scope: Any, receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.received.append(json.loads(body))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    def post(self, path: str, payload: Any) -> tuple[int, Any]:
        """One request through the middleware; (status, the 422 detail or the body the webui got)."""
        import asyncio

        app: Any = self.webui
        for cls, options in reversed(self.user_middleware):
            app = cls(app, **options)
        incoming = [{"type": "http.request", "body": json.dumps(payload).encode(), "more_body": False}]
        sent: list[Any] = []

        async def receive() -> Any:
            return incoming.pop(0) if incoming else {"type": "http.disconnect"}

        async def send(message: Any) -> None:
            sent.append(message)

        self.received.clear()
        asyncio.run(app({"type": "http", "method": "POST", "path": path, "headers": []}, receive, send))
        status = sent[0]["status"]
        return status, (json.loads(sent[1]["body"])["detail"] if status != 200 else self.received[0])


def init_script_args(defaults: list[Any], args: list[Any]) -> list[Any]:
    """modules/api/api.py ``Api.init_script_args`` for one always-on script: the panel's values, with the
    request's ``args[i]`` over them for ``i < len(args)``."""
    script_args = list(defaults)
    for idx in range(min(len(defaults), len(args))):
        script_args[idx] = args[idx]
    return script_args


def test_api_args_are_checked_against_the_lora_list(sd15):
    app = StartingApp()
    sd15.w.callbacks.app_started_callback(None, app)  # api_only() passes demo None
    assert not sd15.w.errors.reported
    assert len(app.user_middleware) == 1

    def post(args: Any, prompt: str = "a dog", path: str = "/sdapi/v1/txt2img") -> tuple[int, Any]:
        return app.post(path, {"prompt": prompt, "alwayson_scripts": {"K-LoRA": {"args": args}}})

    status, detail = post([True, "dog", "nobody"])
    assert status == 422 and "no LoRA named 'nobody'" in detail and "'style'" in detail, detail
    status, detail = post([{"content": "nobody", "style": "ink"}], path="/sdapi/v1/img2img")
    assert status == 422 and "no LoRA named 'nobody'" in detail, detail
    status, detail = post([True, "dog", "ink", 1.0, 1.0, "zzz"])
    assert status == 422 and "'pattern'" in detail, detail
    assert post([True, "dog", "ink"])[0] == 200
    assert post([False, "nobody", "ink"])[0] == 200  # off: not checked
    # a tag's names replace the entry's and are reported with the image (as in the UI), not here
    assert post([True, "nobody", "ink"], prompt="a <klora:dog:ink>")[0] == 200
    # a LoRA added after start is found: the list is rescanned once for an unknown name
    write_lora(sd15.tmp / "Lora" / "late.safetensors", sd15.model, "content", 15)
    assert post([{"content": "late", "style": "ink"}])[0] == 200

    # a bare dict reaches the webui as the one-dict list it can index
    status, body = post({"content": "dog", "style": "ink"})
    assert status == 200
    assert body["alwayson_scripts"]["K-LoRA"]["args"] == [{"content": "dog", "style": "ink"}]
    # a list that gives the pattern and stops before β: α/β padded with None (= the pattern's defaults), so
    # the webui's padding with the panel's values (the s pattern's α/β) does not reach them
    ui = sd15.panel(alpha=1.5, beta=0.5)  # what ui() returns: α/β shown for the panel's pattern
    raw = [True, "dog", "watercolor", 1.0, 1.0, "s*"]
    status, body = post(raw)
    sent = body["alwayson_scripts"]["K-LoRA"]["args"]
    assert sent == [*raw, None, None]
    for args, beta in ((sent, "1.275"), (raw, "0.5")):  # without the rewrite: the panel's β
        p = sd15.txt2img(panel=init_script_args(ui, args))
        sd15.generate(p)
        info = p.extra_generation_params["K-LoRA"]
        assert "pattern: s*" in info and "alpha: 1.5" in info and f"beta: {beta}," in info, info
    sd15.assert_clean()


def test_scores_are_cached_across_generations(sd15, monkeypatch):
    counted = {"scored": 0, "reads": 0}
    real_layer_stats = scores.layer_stats  # forms |ΔW| of one layer: the expensive part of scoring
    real_read = sd15.w.loras.read_lora

    def counting_layer_stats(*a: Any, **k: Any) -> Any:
        counted["scored"] += 1
        return real_layer_stats(*a, **k)

    def counting_read(*a: Any, **k: Any) -> Any:
        counted["reads"] += 1
        return real_read(*a, **k)

    monkeypatch.setattr(scores, "layer_stats", counting_layer_stats)
    monkeypatch.setattr(sd15.w.loras, "read_lora", counting_read)
    panel = sd15.panel(enabled=True, content="dog", style="watercolor")
    sd15.generate(sd15.txt2img(panel=panel))
    first = dict(counted)
    misses = scores.cache_info()["pair_misses"]
    assert first["scored"] == 2 * len(UNET_SHARED) and first["reads"] == 2
    sd15.generate(sd15.txt2img(panel=panel, n_iter=2))
    assert counted == first  # neither rescored nor reread
    assert scores.cache_info()["pair_misses"] == misses
    sd15.assert_clean()


def test_wrapper_replaced_by_another_extension_still_applies_and_cleans(sd15):
    """An extension that replaces p.sample after K-LoRA's activation: the fallback attaches at
    process_before_every_sampling and removes at postprocess_batch."""

    class Replacer(sd15.w.scripts.Script):
        def title(self) -> str:
            return "replacer"

        def process_batch(self, p, *args, **kwargs):
            cls_sample = type(p).sample
            p.sample = lambda *a, **k: cls_sample(p, *a, **k)

    sd15.runner.add_alwayson(Replacer(), 0)
    obs = Observer(sd15)
    p = sd15.txt2img(steps=6, panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    sd15.generate(p)
    obs.remove()
    check_calls(sd15, obs, expected_plan(sd15), [i / 6 for i in range(6)])
    sd15.assert_clean()


def test_stale_hooks_are_swept_by_the_next_generation(sd15, monkeypatch):
    """Bypassed wrapper + a failure: hooks left behind are removed before the next generation samples."""

    class Replacer(sd15.w.scripts.Script):
        def title(self) -> str:
            return "replacer"

        def process_batch(self, p, *args, **kwargs):
            cls_sample = type(p).sample

            def sample(*a, **k):
                cls_sample(p, *a, **k)
                raise RuntimeError("NaN in the VAE (simulated)")

            p.sample = sample

    replacer = Replacer()
    sd15.runner.add_alwayson(replacer, 0)
    p = sd15.txt2img(panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    with pytest.raises(RuntimeError, match="NaN"):
        sd15.generate(p)
    assert sd15.hooked() > 0  # left by the bypass + failure
    sd15.runner.alwayson_scripts.remove(replacer)
    obs = Observer(sd15)
    sd15.generate(sd15.txt2img())  # a generation without K-LoRA
    obs.remove()
    assert all(c["klora_hooks"] == 0 for c in obs.calls)
    sd15.assert_clean()


def test_analyze_draws_the_map_without_generating(sd15):
    image, text = sd15.w.ext.analyze(sd15.w.args.KLoraArgs(enabled=True, content="dog", style="watercolor"),
                                     12)
    assert image is not None and image.size[0] > 0
    assert "layers found" in text and sd15.model.calls == 0
    image, text = sd15.w.ext.analyze(sd15.w.args.KLoraArgs(enabled=True, content="dog", style="nobody"), 12)
    assert image is None and "nobody" in text
    sd15.assert_clean()


def test_common_mistakes_warn_and_still_apply(sd15):
    """One file as both LoRAs, a strength of 0 and a LoRA of the pair also as a <lora> tag: each is said
    with the image (infotext and comment), once, and K-LoRA still applies; Analyze says them too."""
    p = sd15.txt2img(prompt="a dog <lora:dog:0.8>", n_iter=2,
                     panel=sd15.panel(enabled=True, content="dog", style="dog", style_strength=0.0))
    sd15.generate(p)
    warning = p.extra_generation_params["K-LoRA warning"]
    assert "dog and dog are the same file" in warning
    assert "the style strength is 0" in warning
    assert "dog is also in the prompt as <lora:dog:…>" in warning and "applied twice" in warning
    assert warning.count("applied twice") == 1
    assert "content: dog, style: dog" in p.extra_generation_params["K-LoRA"]  # applied anyway
    sd15.assert_clean()
    clean = sd15.txt2img(prompt="a dog <lora:ink:0.8>",
                         panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    sd15.generate(clean)
    assert "K-LoRA warning" not in clean.extra_generation_params
    _, text = sd15.w.ext.analyze(sd15.w.args.KLoraArgs(enabled=True, content="dog", style="dog"), 8)
    assert "same file" in text


def test_settings_and_names(sd15):
    sd15.w.callbacks.ui_settings_callback()
    opts = sd15.w.shared.opts
    assert opts.klora_default_pattern == "s" and opts.klora_default_show_map is False
    opts.klora_cache_size = 3
    sd15.w.extension.apply_cache_size()
    assert scores.cache_info()["pair_size"] == 3
    # the score tables go to the webui's cache folder (modules/cache.py cache_dir), bounded by the setting
    sd15.w.extension.apply_cache_size()
    folder = sd15.tmp / "webui-cache" / "klora"
    assert opts.klora_disk_cache_mb == 256 and scores._disk_folder == (folder, 256 * 2**20)
    then = time.time_ns() - 60 * 10**9  # LoRAs saved a minute ago: their sha256 is recorded for restarts
    for name in ("dog", "watercolor"):
        os.utime(sd15.w.loras.resolve_lora(name), ns=(then, then))
    p = sd15.txt2img(panel=sd15.panel(enabled=True, content="dog", style="watercolor"))
    sd15.generate(p)
    assert len(list(folder.glob("*.safetensors"))) == 2
    known = scores.known_files()
    for name in ("dog", "watercolor"):
        path = sd15.w.loras.resolve_lora(name)
        sha256 = sd15.w.loras.read_lora_cached(path).sha256
        assert known is not None and known.get(path, os.stat(path)) == sha256
    opts.klora_disk_cache_mb = 0
    sd15.w.extension.apply_cache_size()
    assert scores._disk_folder is None and scores.known_files() is None
    opts.klora_default_pattern = "s*"
    assert sd15.w.extension.panel_defaults().pattern == "s*"
    assert sd15.w.loras.lora_names() == ["cat", "dog", "ink", "watercolor"]
    assert sd15.w.loras.resolve_lora("dog").endswith("dog.safetensors")
    with pytest.raises(sd15.w.loras.KLoraInputError, match="no LoRA named"):
        sd15.w.loras.resolve_lora("nobody")
    scores.set_cache_size(8)


def test_pass_schedule_matches_setup_img2img_steps(webui):
    processing = webui.processing
    p = processing.StableDiffusionProcessingImg2Img(steps=20, denoising_strength=0.3)
    assert webui.schedule.pass_schedule(p) == (20 - int(0.3 * 20) - 1, 20)
    t = processing.StableDiffusionProcessingTxt2Img(steps=20, denoising_strength=0.7, hr_second_pass_steps=10)
    assert webui.schedule.pass_schedule(t) == (0, 20)
    t.is_hr_pass = True
    assert webui.schedule.pass_schedule(t) == (int(10 / 0.7) - 10, int(10 / 0.7))
    assert math.isclose(webui.schedule.pass_schedule(t)[0] / webui.schedule.pass_schedule(t)[1], 4 / 14)
    # a timestep sampler (modules/sd_samplers_timesteps.py): L - t_enc skipped, L = len(get_timesteps(…))
    ddim = webui.processing.sd_samplers.create_sampler("DDIM", None).model_wrap_cfg
    assert webui.schedule.pass_schedule(p, ddim) == (20 - int(0.3 * 20), 20)
    assert webui.schedule.pass_schedule(t, ddim) == (len(range(0, 1000, 1000 // 14)) - 9, 14)
