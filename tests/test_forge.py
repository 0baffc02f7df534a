"""klora.webui.hosts and the Forge host against the double of Forge (tests/doubles/forge over
tests/doubles/a1111, each item citing the Forge file and function it mirrors) with real torch modules built
from Forge's ``Linear`` (not a torch.nn.Linear) and Forge's module names. Generations run through the doubles'
process_images down to ``KModel.apply_model``, which calls the UNet / Flux transformer; every call of it is
observed.

The oracle of every generation is a deep copy of the model, taken before any hook exists, whose weights had
the deltas the plan chooses merged in (W + ΔW, ΔW rebuilt here from the factors written to the files), at the
τ the test expects for that model call (i / N, continued over the skipped head of an img2img or hires
schedule).
"""

from __future__ import annotations

import copy
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from doubles.models.flux import IntegratedFluxTransformer2DModel
from doubles.models.tiny_forge import TinyClip, TinySgmUNet, TinyT5
from safetensors.torch import save_file
from torch import nn

import klora.webui
from klora import apply
from klora.apply import Target
from klora.formats import read_lora
from klora.layers import layout
from klora.webui import hosts as host
from klora.webui import infotext
from klora.webui.args import TITLE, KLoraArgs
from klora.webui.hosts import backend
from klora.webui.hosts import forge as forge_host

HERE = Path(__file__).parent
# the Forge overlay over the A1111 double, top first (tests/doubles/README.md)
LAYERS = (HERE / "doubles" / "forge", HERE / "doubles" / "a1111")

_HOST_PACKAGES = ("modules", "modules_forge", "backend", "networks", "network", "overlay")


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Hooks (low-rank) vs merged weights in fp32: equal up to rounding, relative to the output's scale (the
    deltas themselves move these outputs by O(1))."""
    scale = max(1.0, float(want.detach().abs().max()))
    return torch.allclose(got, want, rtol=1e-4, atol=1e-5 * scale)


_GLUE = ("klora.webui.session", "klora.webui.schedule", "klora.webui.extension")  # import the webui's modules


def _put_on_path(monkeypatch) -> None:
    for layer in reversed(LAYERS):
        monkeypatch.syspath_prepend(str(layer))


def _purge() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in _HOST_PACKAGES or name in _GLUE:
            del sys.modules[name]
    for name in _GLUE:
        attr = name.rpartition(".")[2]
        if attr in vars(klora.webui):
            delattr(klora.webui, attr)


# ----------------------------------------------------------------------------------------------------
# Host detection


def _spec_finder(present: set[str]):
    def find_spec(name: str):
        return object() if name in present else None

    return find_spec


def test_detect_by_feature():
    forge = host.detect(
        _spec_finder({"modules", "modules_forge", "backend", "backend.patcher.lora"}), lambda: "2.0.1"
    )
    assert forge == host.HostInfo("forge", "2.0.1") and forge.supported and forge.is_forge
    ldm = host.detect(_spec_finder({"modules", "modules_forge", "ldm_patched"}), lambda: "classic")
    assert ldm.name == "forge-ldm" and not ldm.supported and ldm.is_forge
    reforge = host.detect(_spec_finder({"modules", "ldm_patched"}), lambda: None)
    assert reforge.name == "forge-ldm"
    a1111 = host.detect(_spec_finder({"modules", "ldm"}), lambda: "never called")
    assert a1111 == host.HostInfo("a1111") and a1111.supported and not a1111.is_forge
    with pytest.raises(RuntimeError, match="ldm_patched"):
        host.load(ldm)

    def broken(name: str):
        raise ValueError("bad __spec__")

    assert host.detect(broken).name == "a1111"


def test_detect_with_the_real_import_system(monkeypatch):
    _purge()
    assert host.detect().name == "a1111"  # this test process has no Forge packages
    _put_on_path(monkeypatch)
    try:
        info = host.detect()
        assert info == host.HostInfo("forge", "2.0.1v1.10.1")
        host.current.cache_clear()
        assert host.current() is host.current()
        assert isinstance(host.load(info), forge_host.ForgeHost)
    finally:
        host.current.cache_clear()
        _purge()


# ----------------------------------------------------------------------------------------------------
# The Forge double, the models and the LoRA files


def wire(adapter, tmp_path: Path):
    """The extension on ``adapter`` (a host) with its callbacks and the tag registered the way
    scripts/klora.py does, against the double on sys.path, and an empty LoRA folder; returns both."""
    import networks
    from modules import extra_networks, script_callbacks, shared

    from klora.webui.extension import Extension, ExtraNetworkKLora

    extension = Extension(adapter)
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir()
    shared.cmd_opts.lora_dir = str(lora_dir)
    networks.list_available_networks()
    script_callbacks.on_cfg_denoiser(extension.on_cfg_denoiser)
    script_callbacks.on_script_unloaded(extension.on_script_unloaded)
    extra_networks.register_extra_network(ExtraNetworkKLora())
    return extension, lora_dir


def doubles(adapter, layers, tmp_path: Path, monkeypatch):
    """The doubles of ``layers`` on sys.path (top first), the extension on the host ``adapter()`` made against
    them and wired (:func:`wire`); yields what the tests use, and removes everything afterwards."""
    _purge()
    for layer in reversed(layers):
        monkeypatch.syspath_prepend(str(layer))
    import networks
    from backend.operations import ForgeOperations
    from backend.sampling import sampling_function
    from modules import processing, script_callbacks, sd_models, sd_samplers_common, shared
    from modules_forge import main_entry

    forge, lora_dir = wire(adapter(), tmp_path)
    from klora.webui import session

    ns = SimpleNamespace(
        forge=forge,
        session=session,
        shared=shared,
        processing=processing,
        sd_models=sd_models,
        main_entry=main_entry,
        samplers=sd_samplers_common,
        networks=networks,
        lora_dir=lora_dir,
        Linear=ForgeOperations.Linear,
        sampling=sampling_function,
        callbacks=script_callbacks,
    )
    try:
        yield ns
    finally:
        forge.on_script_unloaded()
        shared.state.interrupted = False
        _purge()


@pytest.fixture
def fx(tmp_path, monkeypatch):
    """The Forge double (over the A1111 one) with the Forge host's extension (:func:`doubles`)."""
    yield from doubles(lambda: forge_host.ForgeHost("2.0.1v1.10.1"), LAYERS, tmp_path, monkeypatch)


class Script:
    """The AlwaysVisible script's hooks as scripts/klora.py wires them to the adapter (modules/scripts.py
    ScriptRunner call signatures)."""

    def __init__(self, adapter, args: KLoraArgs | None):
        self.a = adapter
        self.args = (args or KLoraArgs()).to_ui_values()

    def before_process(self, p):
        self.a.before_process(p, self.args)

    def process(self, p):
        self.a.process(p, self.args)

    def before_process_batch(self, p, **kwargs):
        pass

    def after_extra_networks_activate(self, p, **kwargs):
        self.a.after_extra_networks_activate(p, self.args, kwargs.get("extra_network_data"))

    def process_batch(self, p, **kwargs):
        self.a.process_batch(p, self.args)

    def process_before_every_sampling(self, p, **kwargs):
        self.a.process_before_every_sampling(p)

    def before_hr(self, p):
        pass

    def postprocess_batch(self, p, images, **kwargs):
        self.a.postprocess_batch(p)

    def postprocess(self, p, processed):
        self.a.postprocess(p, processed)


def _rand(*shape: int, seed: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * std


# SD1.5: (canonical diffusers module, SGM module path in Forge's UNet, weight shape) for the tiny model
SD_LAYERS = [
    (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
        (32, 32),
    ),
    (
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k",
        (32, 24),
    ),
    (
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_v",
        "middle_block.1.transformer_blocks.0.attn1.to_v",
        (32, 32),
    ),
    (
        "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
        "middle_block.1.transformer_blocks.0.ff.net.0.proj",
        (256, 32),
    ),
    (
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
        "output_blocks.0.1.transformer_blocks.0.attn1.to_out.0",
        (32, 32),
    ),
    ("up_blocks.0.attentions.0.proj_in", "output_blocks.0.1.proj_in", (32, 32, 1, 1)),
    ("down_blocks.0.resnets.0.conv1", "input_blocks.1.0.in_layers.2", (32, 32, 3, 3)),
]
TE_LAYERS = [
    (
        "text_model.encoder.layers.0.self_attn.q_proj",
        "transformer.text_model.encoder.layers.0.self_attn.q_proj",
        (24, 24),
    ),
    ("text_model.encoder.layers.1.mlp.fc1", "transformer.text_model.encoder.layers.1.mlp.fc1", (48, 24)),
]


def _factors(shape, rank, seed, std):
    out, inp = shape[:2]
    kernel = tuple(shape[2:])
    down = _rand(rank, inp, *kernel, seed=seed, std=std)
    up = _rand(out, rank, *((1, 1) if kernel else ()), seed=seed + 1, std=std)
    return down, up


def _write_sd_pair(lora_dir: Path, te: bool = True, rank_c: int = 4, rank_s: int = 2):
    """content: kohya (lora_unet_<diffusers>), style: diffusers/PEFT (unet.… lora_A/B, the spelling Forge's
    key map misses); per-layer magnitudes chosen so that layers flip at different steps. Returns the raw
    deltas."""
    content, style = {}, {}
    deltas = {"content": {}, "style": {}}
    for i, (name, _sgm, shape) in enumerate(SD_LAYERS):
        d, u = _factors(shape, rank_c, 100 + 2 * i, 0.1 * (1 + i))
        k = "lora_unet_" + name.replace(".", "_")
        content[k + ".lora_down.weight"], content[k + ".lora_up.weight"] = d, u
        content[k + ".alpha"] = torch.tensor(2.0)
        deltas["content"]["unet/" + name.replace(".", "_")] = (2.0 / rank_c) * (
            u.flatten(1) @ d.flatten(1)
        ).reshape(shape)
        d, u = _factors(shape, rank_s, 200 + 2 * i, 0.1 * (len(SD_LAYERS) - i))
        k = "unet." + name
        style[k + ".lora_A.weight"], style[k + ".lora_B.weight"] = d, u
        deltas["style"]["unet/" + name.replace(".", "_")] = (u.flatten(1) @ d.flatten(1)).reshape(shape)
    if te:
        for i, (name, _path, shape) in enumerate(TE_LAYERS):
            d, u = _factors(shape, 2, 300 + i, 0.3)
            k = "lora_te_" + name.replace(".", "_")
            content[k + ".lora_down.weight"], content[k + ".lora_up.weight"] = d, u
            deltas["content"]["te1/" + name.replace(".", "_")] = u @ d
            d, u = _factors(shape, 2, 400 + i, 0.2)
            (
                style["text_encoder." + name + ".lora_A.weight"],
                style["text_encoder." + name + ".lora_B.weight"],
            ) = d, u
            deltas["style"]["te1/" + name.replace(".", "_")] = u @ d
    save_file(content, str(lora_dir / "dog.safetensors"))
    save_file(style, str(lora_dir / "watercolor.safetensors"))
    return deltas


_CHECKPOINTS = itertools.count()


def _register(fx, engine, name: str) -> str:
    """``engine`` as a checkpoint file of the webui (a fresh title each time); returns the title."""
    title = f"{name}-{next(_CHECKPOINTS)}.safetensors"
    info = fx.sd_models.CheckpointInfo(title)
    info.register()
    engine.sd_checkpoint_info = info
    fx.sd_models.loaded_models[title] = engine
    return title


def _load(fx, engine, name: str):
    """Select ``engine``'s checkpoint and load it as Forge does (modules_forge/main_entry.py
    checkpoint_change, modules/sd_models.py forge_model_reload)."""
    fx.main_entry.checkpoint_change(_register(fx, engine, name))
    fx.sd_models.forge_model_reload()
    assert fx.shared.sd_model is engine
    return engine


def _count_conds(engine) -> None:
    """``engine.conds_computed``: how often its text encoders ran (get_learned_conditioning)."""
    encode = engine.get_learned_conditioning
    engine.conds_computed = 0

    def counted(prompt):
        engine.conds_computed += 1
        return encode(prompt)

    engine.get_learned_conditioning = counted


def _sd_engine(fx, seed: int = 0):
    from backend.diffusion_engine.sd15 import StableDiffusion

    torch.manual_seed(seed)
    unet = TinySgmUNet(fx.Linear)
    clip = TinyClip(fx.Linear)
    engine = StableDiffusion(unet, clip)
    _count_conds(engine)
    return _load(fx, engine, "tiny-sd15")


def _hooks_left(*models: nn.Module) -> int:
    return sum(len(m._forward_hooks) for model in models for m in model.modules())


def _state(*models: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for model in models for t in model.state_dict().values()]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class Oracle:
    """Expected outputs: copies of the UNet and text encoder with the chosen deltas merged in at τ."""

    def __init__(self, unet: nn.Module, clip: nn.Module, deltas, paths: dict[str, tuple[nn.Module, str]]):
        self.unet0, self.clip0 = copy.deepcopy(unet), copy.deepcopy(clip)
        self.deltas = deltas
        self.paths = paths  # canonical key → ("unet" | "clip", module path)

    def merged(self, plan, tau: float, which: str) -> nn.Module:
        model = copy.deepcopy(self.unet0 if which == "unet" else self.clip0)
        with torch.no_grad():
            for key, (part, path) in self.paths.items():
                if part != which or key not in plan.layers:
                    continue
                choice = plan.choose(key, tau)
                weight = model.get_submodule(path).weight
                for side in ("content", "style"):
                    if choice in (side, "both") and key in self.deltas[side]:
                        weight += self.deltas[side][key].reshape(weight.shape)
        return model


def _sd_paths():
    paths = {"unet/" + n.replace(".", "_"): ("unet", sgm) for n, sgm, _ in SD_LAYERS}
    paths.update({"te1/" + n.replace(".", "_"): ("clip", p) for n, p, _ in TE_LAYERS})
    return paths


def _processing(fx, p_cls, args, prompt="a dog", **kwargs):
    """A processing object (modules/processing.py's dataclasses) with K-LoRA's script: 32×32 (a 4×4 latent),
    CFG scale 1 (Forge then makes no negative conditioning and runs the model once per step), seed 1, Euler,
    4 steps unless given."""
    if p_cls is fx.processing.StableDiffusionProcessingImg2Img:
        kwargs.setdefault("init_images", [_rand(4, 4, 4, seed=3)])
    kwargs = {"steps": 4, "sampler_name": "Euler", "seed": 1, "width": 32, "height": 32, "cfg_scale": 1.0,
              **kwargs}
    p = p_cls(prompt=prompt, **kwargs)
    p.scripts = _Runner([Script(fx.forge, args)])
    return p


def _observe(model: nn.Module, on_call):
    """A forward hook on the UNet / Flux transformer: ``on_call(args, kwargs, output)`` at every call of it;
    returns the handle."""

    def hook(module, args, kwargs, out):
        on_call(args, kwargs, out)

    return model.register_forward_hook(hook, with_kwargs=True)


def _run(fx, engine, p_cls, args, prompt="a dog", record=None, fail_at=None, **kwargs):
    """One generation through the doubles' process_images; returns ``p`` and per model call (τ, output,
    context, hires pass, latent input). ``fail_at``: the model call that raises."""
    calls = []
    dm = engine.forge_objects.unet.model.diffusion_model

    def fail(module, args_, kwargs_):
        if fail_at is not None and len(calls) == fail_at:
            raise RuntimeError("model failed")

    def record_call(args_, kwargs_, out):
        run = fx.session.session_of(p)
        tau = run.clock.tau if run is not None else None
        context, x = kwargs_["context"].detach().clone(), args_[0].detach().clone()
        calls.append((tau, out.detach().clone(), context, p.is_hr_pass, x))

    p = _processing(fx, p_cls, args, prompt, **kwargs)
    handles = [dm.register_forward_pre_hook(fail, with_kwargs=True), _observe(dm, record_call)]
    try:
        fx.processing.process_images(p)
    finally:
        for handle in handles:
            handle.remove()
    if record is not None:
        record.extend(calls)
    return p, calls


class _Runner:
    """modules/scripts.py::ScriptRunner for the alwayson hooks (each script that has the hook, in order)."""

    def __init__(self, scripts):
        self.scripts = scripts

    def __getattr__(self, name):
        def call(p, *args, **kwargs):
            for s in self.scripts:
                hook = getattr(s, name, None)
                if hook is not None:
                    hook(p, *args, **kwargs)

        return call


FLUX_NOTE = "Flux default pattern s*"


def _target_shape(target: Target) -> tuple[int, ...] | None:
    """The shape a delta must have to fit ``target`` (1×1 convs as (out, in)), None where nothing can hook."""
    try:
        return layout(apply.site("key", target).shape)
    except ValueError:
        return None


def _enabled(**kwargs) -> KLoraArgs:
    return KLoraArgs(**{"enabled": True, "content": "dog", "style": "watercolor", **kwargs})


# ----------------------------------------------------------------------------------------------------
# SD1.5 on Forge: a whole generation against the merged oracle


def test_txt2img_equals_merged_weights_and_leaves_nothing(fx):
    deltas = _write_sd_pair(fx.lora_dir)
    engine = _sd_engine(fx)
    unet = engine.forge_objects.unet.model.diffusion_model
    clip = engine.forge_objects.clip.cond_stage_model.clip_l
    before = _state(unet, clip)
    oracle = Oracle(unet, clip, deltas, _sd_paths())
    steps = 8
    p, calls = _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), steps=steps)

    plan = fx.session.session_of(p).last_setup.plan
    assert [c[0] for c in calls] == [i / steps for i in range(steps)]
    assert any(plan.flips(k, steps) for k in plan.layers), (
        "the pair must flip somewhere for this to test much"
    )
    cond = oracle.merged(plan, 0.0, "clip")(["a dog"])
    for i, (tau, out, context, _, x) in enumerate(calls):
        assert _close(context, cond)  # text encoders: both deltas (te=both)
        with torch.no_grad():
            want = oracle.merged(plan, tau, "unet")(x, context=context)
        assert _close(out, want), f"call {i}"
    assert _hooks_left(unet, clip) == 0
    assert _same(before, _state(unet, clip))
    info = p.extra_generation_params[infotext.INFOTEXT_KEY]
    assert "content: dog, style: watercolor" in info and "pattern: s," in info and "Flux" not in info
    assert infotext.parse_infotext(info).content == "dog"
    assert p.extra_generation_params[infotext.INFOTEXT_HASHES_KEY].startswith("content: ")
    # the factors were announced to Forge's memory manager on the patcher the pass sampled with
    setup = fx.session.session_of(p).last_setup
    factors = sum(
        r * (s[1] * (s[2] * s[3] if len(s) == 4 else 1) + s[0]) for _, _, s in SD_LAYERS for r in (4, 2)
    )
    nbytes = lambda dtype: apply.hook_bytes(setup.plan, setup.content, setup.style, setup.unet_keys, dtype)  # noqa: E731
    assert nbytes(torch.float32) == 4 * factors and nbytes(torch.bfloat16) == 2 * factors
    assert fx.sampling.last_preserved_memory[-1] == 4 * factors  # the KModel's computation dtype is fp32
    assert engine.forge_objects_after_applying_lora.unet.extra_preserved_memory_during_sampling == 0


def test_peft_sdxl_style_keys_land_where_kohya_keys_do(fx):
    """The style file uses ``unet.<diffusers>.lora_A`` keys (which Forge's own key map does not match)."""
    _write_sd_pair(fx.lora_dir, te=False)
    engine = _sd_engine(fx)
    style = read_lora(fx.lora_dir / "watercolor.safetensors")
    targets, missing = forge_host.build_targets(engine, style.layers)
    assert missing == []
    unet = engine.forge_objects.unet.model.diffusion_model
    for name, sgm, shape in SD_LAYERS:
        t = targets["unet/" + name.replace(".", "_")]
        assert t.module is unet.get_submodule(sgm) and t.rows is None
        assert _target_shape(t) == (shape[:2] if shape[2:] == (1, 1) else shape)
    assert not isinstance(unet.get_submodule(SD_LAYERS[0][1]), nn.Linear)  # Forge's Linear, matched anyway


def test_text_encoder_conditioning_is_not_cached_across_generations(fx):
    _write_sd_pair(fx.lora_dir)
    engine = _sd_engine(fx)
    # the first generation after a model load conditions into its own cache only (modules/processing.py
    # manage_model_and_prompt_cache → clear_prompt_cache gives the instance and the class different lists)
    _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, None, steps=2)
    computed = [engine.conds_computed]
    p1, calls1 = _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, None, steps=2)
    computed.append(engine.conds_computed)
    _p2, calls2 = _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), steps=2)
    computed.append(engine.conds_computed)
    p3, calls3 = _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, None, steps=2)
    computed.append(engine.conds_computed)
    assert not torch.allclose(calls1[0][2], calls2[0][2])  # K-LoRA's text-encoder deltas were applied
    assert torch.equal(calls1[0][2], calls3[0][2])  # and never leaked into the shared cache
    p2_conds, p3_conds = computed[2] - computed[1], computed[3] - computed[2]
    assert (p2_conds, p3_conds) == (1, 0)
    assert infotext.INFOTEXT_KEY not in p1.extra_generation_params | p3.extra_generation_params


def test_img2img_and_hires_continue_tau_over_the_skipped_head(fx):
    _write_sd_pair(fx.lora_dir, te=False)
    engine = _sd_engine(fx)
    p, calls = _run(
        fx,
        engine,
        fx.processing.StableDiffusionProcessingImg2Img,
        _enabled(),
        steps=10,
        denoising_strength=0.5,
    )
    # setup_img2img_steps: t_enc = int(0.5 * 10) = 5, the run is the last 6 of 10 steps
    assert [c[0] for c in calls] == [(4 + i) / 10 for i in range(6)]
    p, calls = _run(
        fx,
        engine,
        fx.processing.StableDiffusionProcessingTxt2Img,
        _enabled(),
        steps=4,
        enable_hr=True,
        hr_second_pass_steps=3,
        denoising_strength=0.6,
    )
    first = [c[0] for c in calls if not c[3]]
    second = [c[0] for c in calls if c[3]]
    assert first == [i / 4 for i in range(4)]
    # hires: steps = int(3 / 0.6) = 5, t_enc = 2: the last 3 of 5
    assert second == pytest.approx([(2 + i) / 5 for i in range(3)])
    unet = engine.forge_objects.unet.model.diffusion_model
    assert _hooks_left(unet) == 0
    # both passes sampled with the memory announced once (the hires pass calls the script twice)
    setup = fx.session.session_of(p).last_setup
    nbytes = apply.hook_bytes(setup.plan, setup.content, setup.style, setup.unet_keys, torch.float32)
    assert fx.sampling.last_preserved_memory[-2:] == [nbytes] * 2


def test_one_hook_per_module_during_hires_sampling(fx):
    _write_sd_pair(fx.lora_dir, te=False)
    engine = _sd_engine(fx)
    unet = engine.forge_objects.unet.model.diffusion_model
    seen = []

    def count(params):  # on_cfg_denoiser, just before the model call
        seen.append(max(len(m._forward_hooks) for m in unet.modules()))

    fx.callbacks.on_cfg_denoiser(count)
    p = _processing(
        fx, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), "x", steps=2, enable_hr=True,
        hr_second_pass_steps=2, denoising_strength=0.5,
    )
    fx.processing.process_images(p)
    assert seen == [1] * len(seen) and len(seen) == 4


def test_second_order_sampler_counts_calls(fx):
    _write_sd_pair(fx.lora_dir, te=False)
    engine = _sd_engine(fx)
    _, calls = _run(
        fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), steps=3, sampler_name="Heun"
    )
    # Heun: 2 calls per step but one on the last; total_steps = 6; τ = call / 6 (the host's own counter)
    assert [c[0] for c in calls] == [0, 1 / 6, 2 / 6, 3 / 6, 4 / 6]


def test_memory_announced_per_pass_does_not_pile_up_across_generations(fx):
    """K-LoRA adds its factors' size to a clone of the pass's UNet patcher; Forge's processing starts every
    batch and sampling pass from ``forge_objects_after_applying_lora`` again (modules/processing.py), so the
    next generation announces the same amount, not twice it."""
    _write_sd_pair(fx.lora_dir, te=False)
    engine = _sd_engine(fx)
    p, _ = _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), steps=2)
    setup = fx.session.session_of(p).last_setup
    nbytes = apply.hook_bytes(setup.plan, setup.content, setup.style, setup.unet_keys, torch.float32)
    assert nbytes > 0
    _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), steps=2)
    _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, None, steps=2)
    assert fx.sampling.last_preserved_memory[-3:] == [nbytes, nbytes, 0]
    for objects in (engine.forge_objects_original, engine.forge_objects_after_applying_lora):
        assert objects.unet.extra_preserved_memory_during_sampling == 0


def test_timestep_sampler_on_forge(fx):
    """DDIM on Forge (modules/sd_samplers_timesteps.py, its CFGDenoiserTimesteps a subclass of Forge's
    CFGDenoiser): a 10-step run makes 9 calls at τ = j / 10, each equal to the merged weights, with the hooks'
    memory announced for the pass."""
    deltas = _write_sd_pair(fx.lora_dir, te=False)
    engine = _sd_engine(fx)
    unet = engine.forge_objects.unet.model.diffusion_model
    oracle = Oracle(unet, engine.forge_objects.clip.cond_stage_model.clip_l, deltas, _sd_paths())
    p, calls = _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), steps=10,
                    sampler_name="DDIM")
    setup = fx.session.session_of(p).last_setup
    assert [c[0] for c in calls] == [j / 10 for j in range(9)]
    assert any(setup.plan.flips(k, 10) for k in setup.plan.layers)
    for tau, out, context, _, x in calls:
        with torch.no_grad():
            want = oracle.merged(setup.plan, tau, "unet")(x, context=context)
            base = oracle.unet0(x, context=context)
        # hooks and merged weights agree to rounding (a few 1e-5 here), the deltas move the output by O(1)
        assert (base - want).abs().max() > 0.1
        assert torch.allclose(out, want, rtol=1e-4, atol=1e-4), tau
    nbytes = apply.hook_bytes(setup.plan, setup.content, setup.style, setup.unet_keys, torch.float32)
    assert fx.sampling.last_preserved_memory[-1] == nbytes > 0
    assert _hooks_left(unet) == 0


def test_refiner_segment_runs_without_klora(fx):
    from backend.diffusion_engine.sdxl import StableDiffusionXLRefiner

    _write_sd_pair(fx.lora_dir, te=False)
    engine = _sd_engine(fx)
    torch.manual_seed(3)
    refiner = StableDiffusionXLRefiner(TinySgmUNet(fx.Linear), TinyClip(fx.Linear))
    refiner_title = _register(fx, refiner, "refiner")
    hooks_on_refiner = []
    unet = engine.forge_objects.unet.model.diffusion_model
    ref_unet = refiner.forge_objects.unet.model.diffusion_model

    def observe(params):  # on_cfg_denoiser, after the refiner switch, just before the model call
        hooks_on_refiner.append((fx.shared.sd_model is refiner, _hooks_left(ref_unet), _hooks_left(unet)))

    fx.callbacks.on_cfg_denoiser(observe)
    p = _processing(
        fx, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), "x", steps=4,
        refiner_checkpoint=refiner_title, refiner_switch_at=0.5,
    )
    fx.processing.process_images(p)
    assert [r[0] for r in hooks_on_refiner] == [False, False, True, True]
    assert hooks_on_refiner[0][2] > 0 and all(r[1] == 0 and r[2] == 0 for r in hooks_on_refiner[2:])
    assert "refiner" in p.extra_generation_params[infotext.INFOTEXT_KEY]
    assert _hooks_left(unet, ref_unet) == 0


def test_failure_and_interrupt_leave_no_hooks_and_identical_weights(fx):
    _write_sd_pair(fx.lora_dir)
    engine = _sd_engine(fx)
    unet = engine.forge_objects.unet.model.diffusion_model
    clip = engine.forge_objects.clip.cond_stage_model.clip_l
    before = _state(unet, clip)
    with pytest.raises(RuntimeError, match="model failed"):
        _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), steps=4, fail_at=2)
    assert _hooks_left(unet, clip) == 0 and _same(before, _state(unet, clip))

    def interrupting(params):  # on_cfg_denoiser: the user interrupts during the first step
        fx.shared.state.interrupted = True

    fx.callbacks.on_cfg_denoiser(interrupting)
    p = _processing(fx, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), "x", steps=4, n_iter=2)
    fx.processing.process_images(p)
    assert _hooks_left(unet, clip) == 0 and _same(before, _state(unet, clip))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (_enabled(content="cat"), "no LoRA named 'cat'"),
        (_enabled(style=""), "no style LoRA"),
        (_enabled(content="flux_kohya"), "no layer in common"),
        (_enabled(content="broken"), "cannot read LoRA file"),
    ],
)
def test_bad_input_warns_and_generates_without_klora(fx, args, message):
    _write_sd_pair(fx.lora_dir)
    _write_flux_kohya(fx.lora_dir / "flux_kohya.safetensors", 16)
    (fx.lora_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    fx.networks.list_available_networks()
    engine = _sd_engine(fx)
    unet = engine.forge_objects.unet.model.diffusion_model
    base = copy.deepcopy(unet)
    p, calls = _run(fx, engine, fx.processing.StableDiffusionProcessingTxt2Img, args, steps=2)
    assert any(message in c for c in p.comments), p.comments
    assert infotext.INFOTEXT_KEY not in p.extra_generation_params
    with torch.no_grad():
        assert torch.equal(calls[0][1], base(calls[0][4], context=calls[0][2]))
    assert _hooks_left(unet) == 0


def test_tag_over_panel_and_analyze(fx):
    _write_sd_pair(fx.lora_dir, te=False)
    engine = _sd_engine(fx)
    p, _ = _run(
        fx,
        engine,
        fx.processing.StableDiffusionProcessingTxt2Img,
        None,
        prompt="a dog <klora:dog:watercolor:pattern=s*:mode=merge>",
        steps=2,
    )
    info = infotext.parse_infotext(p.extra_generation_params[infotext.INFOTEXT_KEY])
    assert (info.pattern, info.mode, info.enabled) == ("s*", "merge", False)  # from a tag: pasted unticked
    image, text = fx.forge.analyze(_enabled(), 8)
    assert image is not None and "Loaded model (Forge 2.0.1v1.10.1, sd1): 7 of 7 layers found." in text


# ----------------------------------------------------------------------------------------------------
# Flux on Forge


def _flux_engine(fx, hidden=16, depth=1, single=2, seed=0):
    from backend.diffusion_engine.flux import Flux

    torch.manual_seed(seed)
    dm = IntegratedFluxTransformer2DModel(
        in_channels=4,
        vec_in_dim=24,  # the pooled CLIP-L output
        context_in_dim=12,
        hidden_size=hidden,
        num_heads=2,
        depth=depth,
        depth_single_blocks=single,
        linear=lambda i, o: fx.Linear(i, o),
    )
    clip_l, t5 = TinyClip(fx.Linear, dim=24), TinyT5(fx.Linear, dim=12)
    engine = Flux(dm, clip_l, t5)
    return _load(fx, engine, "tiny-flux")


def _write_flux_kohya(path: Path, h: int, seed: int = 0, scale: float = 1.0):
    """kohya: fused qkv (double block 0) and linear1 (single block 0), plus img_mlp.0 and linear2."""
    sd = {}
    for i, (name, out, inp) in enumerate(
        [
            ("double_blocks_0_img_attn_qkv", 3 * h, h),
            ("double_blocks_0_img_mlp_0", 4 * h, h),
            ("single_blocks_0_linear1", 7 * h, h),
            ("single_blocks_1_linear2", h, 5 * h),
        ]
    ):
        k = "lora_unet_" + name
        sd[k + ".lora_down.weight"] = _rand(4, inp, seed=seed + 2 * i, std=0.2)
        sd[k + ".lora_up.weight"] = _rand(out, 4, seed=seed + 2 * i + 1, std=0.2 * scale * (1 + i))
        sd[k + ".alpha"] = torch.tensor(4.0)
    save_file(sd, str(path))
    return sd


def _write_flux_peft(path: Path, h: int, seed: int = 50):
    """diffusers/PEFT: to_q/to_k/to_v of double block 0, single-block 0 q/k/v and proj_mlp, ff.net.0.proj."""
    sd = {}
    names = [
        ("transformer_blocks.0.attn.to_q", h, h),
        ("transformer_blocks.0.attn.to_k", h, h),
        ("transformer_blocks.0.attn.to_v", h, h),
        ("transformer_blocks.0.ff.net.0.proj", 4 * h, h),
        ("single_transformer_blocks.0.attn.to_q", h, h),
        ("single_transformer_blocks.0.attn.to_k", h, h),
        ("single_transformer_blocks.0.attn.to_v", h, h),
        ("single_transformer_blocks.0.proj_mlp", 4 * h, h),
    ]
    for i, (name, out, inp) in enumerate(names):
        sd[f"transformer.{name}.lora_A.weight"] = _rand(2, inp, seed=seed + 2 * i, std=0.3)
        sd[f"transformer.{name}.lora_B.weight"] = _rand(
            out, 2, seed=seed + 2 * i + 1, std=0.3 * (len(names) - i)
        )
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 1})}
    save_file(sd, str(path), metadata=meta)
    return sd


@pytest.fixture
def flux_fx(fx):
    return fx


def _flux_oracle_deltas(h: int, kohya: dict, peft: dict):
    """Canonical diffusers key → (BFL module path, rows, ΔW) computed here from the raw factors."""
    out = {"content": {}, "style": {}}
    rows_of = {"q": slice(0, h), "k": slice(h, 2 * h), "v": slice(2 * h, 3 * h), "mlp": slice(3 * h, 7 * h)}
    fused = {
        "double_blocks_0_img_attn_qkv": [
            ("transformer_blocks_0_attn_to_" + n, "double_blocks.0.img_attn.qkv", rows_of[n]) for n in "qkv"
        ],
        "single_blocks_0_linear1": [
            ("single_transformer_blocks_0_attn_to_" + n, "single_blocks.0.linear1", rows_of[n]) for n in "qkv"
        ]
        + [("single_transformer_blocks_0_proj_mlp", "single_blocks.0.linear1", rows_of["mlp"])],
        "double_blocks_0_img_mlp_0": [
            ("transformer_blocks_0_ff_net_0_proj", "double_blocks.0.img_mlp.0", None)
        ],
        "single_blocks_1_linear2": [
            ("single_transformer_blocks_1_proj_out", "single_blocks.1.linear2", None)
        ],
    }
    for name, children in fused.items():
        k = "lora_unet_" + name
        full = kohya[k + ".lora_up.weight"] @ kohya[k + ".lora_down.weight"]  # alpha 4 / rank 4
        for key, path, rows in children:
            out["content"]["transformer/" + key] = (path, rows, full if rows is None else full[rows])
    paths = {"transformer_blocks.0.attn.to_" + n: ("double_blocks.0.img_attn.qkv", rows_of[n]) for n in "qkv"}
    paths |= {
        "single_transformer_blocks.0.attn.to_" + n: ("single_blocks.0.linear1", rows_of[n]) for n in "qkv"
    }
    paths["single_transformer_blocks.0.proj_mlp"] = ("single_blocks.0.linear1", rows_of["mlp"])
    paths["transformer_blocks.0.ff.net.0.proj"] = ("double_blocks.0.img_mlp.0", None)
    for name, (path, rows) in paths.items():
        d = peft[f"transformer.{name}.lora_B.weight"] @ peft[f"transformer.{name}.lora_A.weight"] * 0.5
        out["style"]["transformer/" + name.replace(".", "_")] = (path, rows, d)
    return out


def test_flux_generation_with_fused_rows_equals_merged_rows(flux_fx):
    fx = flux_fx
    h = 16
    kohya = _write_flux_kohya(fx.lora_dir / "dog.safetensors", h)
    peft = _write_flux_peft(fx.lora_dir / "watercolor.safetensors", h)
    engine = _flux_engine(fx, hidden=h)
    dm = engine.forge_objects.unet.model.diffusion_model
    dm0 = copy.deepcopy(dm)
    before = _state(dm)
    deltas = _flux_oracle_deltas(h, kohya, peft)
    calls = []

    def record_call(args, kwargs, out):  # the latent, timestep, T5 context, pooled CLIP-L and guidance
        tau = fx.session.session_of(p).clock.tau
        inputs = ([a.detach().clone() for a in args], dict(kwargs))
        calls.append((tau, out.detach().clone(), inputs))

    steps = 6
    p = _processing(fx, fx.processing.StableDiffusionProcessingTxt2Img, _enabled(), "x", steps=steps)
    handle = _observe(dm, record_call)
    try:
        fx.processing.process_images(p)
    finally:
        handle.remove()
    setup = fx.session.session_of(p).last_setup
    plan = setup.plan
    assert plan.options.pattern == "s*"  # Flux default
    info = p.extra_generation_params[infotext.INFOTEXT_KEY]
    assert "pattern: s*" in info and FLUX_NOTE in info
    # every split key of both files landed on its BFL rows
    assert set(setup.unet_keys) == set(deltas["content"]) | set(deltas["style"])
    for key in setup.unet_keys:
        target = setup.targets[key]
        path, rows = (deltas["content"].get(key) or deltas["style"][key])[:2]
        assert target.module is dm.get_submodule(path) and target.rows == rows
    assert [c[0] for c in calls] == [i / steps for i in range(steps)]
    for tau, out, (args, kwargs) in calls:
        merged = copy.deepcopy(dm0)
        with torch.no_grad():
            for side in ("content", "style"):
                for key, (path, rows, d) in deltas[side].items():
                    if plan.choose(key, tau) in (side, "both"):
                        w = merged.get_submodule(path).weight
                        (w if rows is None else w[rows]).add_(d)
            want = merged(*args, **kwargs)
        assert _close(out, want), tau
    assert _hooks_left(dm) == 0 and _same(before, _state(dm))


def test_flux_pattern_chosen_by_the_tag_is_kept(flux_fx):
    fx = flux_fx
    _write_flux_kohya(fx.lora_dir / "dog.safetensors", 16)
    _write_flux_peft(fx.lora_dir / "watercolor.safetensors", 16)
    _flux_engine(fx)
    calls = []
    fx.callbacks.on_cfg_denoiser(lambda params: calls.append(1))
    p = _processing(
        fx, fx.processing.StableDiffusionProcessingTxt2Img, None, "<klora:dog:watercolor:pattern=s>", steps=2
    )
    fx.processing.process_images(p)
    info = p.extra_generation_params[infotext.INFOTEXT_KEY]
    assert "pattern: s," in info and "Flux default" not in info and len(calls) == 2
    args, note = fx.session.with_family_defaults(_enabled(alpha=1.2), "flux")
    assert (args.pattern, note) == ("s", None)
    args, note = fx.session.with_family_defaults(replace(_enabled(), given={"beta"}), "flux")
    assert (args.pattern, note) == ("s", None)
    args, note = fx.session.with_family_defaults(_enabled(alpha=1.5, beta=0.5), "flux")  # the panel's numbers
    assert (args.pattern, args.resolved_beta, note) == ("s*", 1.275, FLUX_NOTE)
    args, note = fx.session.with_family_defaults(_enabled(), "sdxl")
    assert (args.pattern, note) == ("s", None)
    args, note = fx.session.with_family_defaults(_enabled(), "flux")
    assert (args.pattern, note) == ("s*", FLUX_NOTE)


def test_flux_text_encoders_are_clip_l_and_t5(fx):
    engine = _flux_engine(fx)
    keys_ = [
        "te1/text_model_encoder_layers_0_self_attn_q_proj",
        "te3/encoder_block_0_layer_0_SelfAttention_k",
        "te2/text_model_encoder_layers_0_self_attn_q_proj",
    ]
    targets, missing = forge_host.build_targets(engine, keys_)
    cond = engine.forge_objects.clip.cond_stage_model
    assert targets[keys_[0]].module is cond.clip_l.transformer.text_model.encoder.layers[0].self_attn.q_proj
    assert targets[keys_[1]].module is cond.t5xxl.transformer.encoder.block[0].layer[0].SelfAttention.k
    assert missing == [keys_[2]]  # Flux has no CLIP-G


def test_forge_key_map_agrees_with_ours_on_real_flux_sizes(fx):
    """Forge's own map (mirrored from comfyui_lora_collection's flux_to_diffusers facts) and klora.flux place
    every diffusers Flux key on the same module and rows of a FLUX.1-dev-sized model (on the meta device)."""
    from backend.diffusion_engine.flux import Flux
    from backend.patcher.lora import model_lora_keys_unet

    with torch.device("meta"):
        dm = IntegratedFluxTransformer2DModel(linear=lambda i, o: fx.Linear(i, o))
    engine = Flux(dm, nn.Module(), nn.Module())
    key_map = model_lora_keys_unet(engine.forge_objects.unet.model, {})
    canonical = sorted(
        {"transformer/" + k[len("lora_transformer_") :] for k in key_map if k.startswith("lora_transformer_")}
    )
    assert len(canonical) == 19 * 14 + 38 * 6
    ours, missing = forge_host.build_targets(engine, canonical)
    assert missing == []
    theirs = backend.key_map_targets(engine, canonical, ("lora_unet_", "lora_transformer_"))
    assert set(theirs) == set(ours)
    for key in canonical:
        assert ours[key].module is theirs[key].module, key
        assert ours[key].rows == theirs[key].rows, key


def test_sdxl_text_encoders_are_clip_l_and_clip_g(fx):
    from backend.diffusion_engine.sdxl import StableDiffusionXL

    torch.manual_seed(0)
    engine = StableDiffusionXL(TinySgmUNet(fx.Linear), TinyClip(fx.Linear), TinyClip(fx.Linear, dim=32))
    keys_ = [
        "te1/text_model_encoder_layers_1_mlp_fc2",
        "te2/text_model_encoder_layers_0_self_attn_v_proj",
        "te3/encoder_block_0_layer_0_SelfAttention_q",
    ]
    targets, missing = forge_host.build_targets(engine, keys_)
    cond = engine.forge_objects.clip.cond_stage_model
    assert targets[keys_[0]].module is cond.clip_l.transformer.text_model.encoder.layers[1].mlp.fc2
    assert targets[keys_[1]].module is cond.clip_g.transformer.text_model.encoder.layers[0].self_attn.v_proj
    assert _target_shape(targets[keys_[1]]) == (32, 32)
    assert missing == [keys_[2]]
    assert forge_host.ForgeHost().family(engine) == "sdxl"


@pytest.mark.parametrize("ops", ["ForgeOperationsGGUF", "ForgeOperationsBNB4bits"])
def test_quantised_linears_are_placed_by_their_logical_shape(fx, tmp_path, ops):
    """GGUF and NF4 Linears declare no in/out features and store a packed weight (backend/operations*.py):
    placed by their logical shape, their hooked outputs equal a plain Linear's with the delta merged in."""
    import backend.operations as operations

    from klora.fusion import make_plan
    from klora.options import FusionOptions

    deltas = _write_sd_pair(tmp_path, te=False)
    content, style = (read_lora(tmp_path / f"{n}.safetensors") for n in ("dog", "watercolor"))
    plan = make_plan(content, style, FusionOptions(mode="merge"))
    torch.manual_seed(3)
    quantised = TinySgmUNet(getattr(operations, ops).Linear)
    torch.manual_seed(3)
    dense = TinySgmUNet(fx.Linear)
    linear = [(n.replace(".", "_"), sgm, shape) for n, sgm, shape in SD_LAYERS if len(shape) == 2]
    engine = SimpleNamespace(forge_objects=SimpleNamespace(
        unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=quantised)), clip=None))
    targets, missing = forge_host.build_targets(engine, [f"unet/{k}" for k, _, _ in linear])
    assert missing == []
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), apply.attached(plan, content, style, targets, apply.StepClock()):
        for key, sgm, shape in linear:
            target = targets[f"unet/{key}"]
            assert target.module is quantised.get_submodule(sgm) and _target_shape(target) == shape
            ref = dense.get_submodule(sgm)
            w = ref.weight + deltas["content"][f"unet/{key}"] + deltas["style"][f"unet/{key}"]
            inp = x[..., : shape[1]]
            torch.testing.assert_close(target.module(inp), torch.nn.functional.linear(inp, w, ref.bias))
    assert _hooks_left(quantised) == 0


def test_forge_key_map_fallback_places_what_we_do_not(fx):
    """A key our resolution does not know (here: an SGM-named canonical key) found through Forge's key map."""
    engine = _sd_engine(fx)
    key = "unet/input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    targets, missing = forge_host.build_targets(engine, [key, "unet/nothing_here"])
    unet = engine.forge_objects.unet.model.diffusion_model
    assert targets[key].module is unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    assert missing == ["unet/nothing_here"]


class _OneBlockPerLevelUNet(nn.Module):
    """The module layout backend/nn/unet.py::IntegratedUNet2DConditionModel.__init__ builds for
    ``channel_mult=[1, 2]``, ``num_res_blocks=[1, 1]``, attention at both levels: input_blocks 0 conv,
    1 (res, attention), 2 (Downsample ``op``), 3 (res, attention); output_blocks 0, 1 (+ Upsample ``conv``),
    2, 3 (res, attention); the config's ``num_res_blocks``/``channel_mult`` kept as attributes."""

    def __init__(self, lin, dim: int = 16, context_dim: int = 24, emb: int = 16) -> None:
        from doubles.models.tiny_forge import ResBlock, SpatialTransformer

        super().__init__()
        self.num_res_blocks = [1, 1]
        self.channel_mult = [1, 2]

        def level() -> nn.ModuleList:
            return nn.ModuleList([ResBlock(dim, emb, lin), SpatialTransformer(dim, context_dim, lin)])

        down, up = nn.Module(), nn.Module()
        down.op = nn.Conv2d(dim, dim, 3, stride=2, padding=1)
        up.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.input_blocks = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(4, dim, 3, padding=1)), level(), nn.ModuleList([down]), level()]
        )
        self.middle_block = nn.ModuleList(
            [ResBlock(dim, emb, lin), SpatialTransformer(dim, context_dim, lin), ResBlock(dim, emb, lin)]
        )
        self.output_blocks = nn.ModuleList([level(), level(), level(), level()])
        self.output_blocks[1].append(up)


def test_unet_with_one_block_per_level_maps_by_its_own_layout(fx):
    """Forge numbers SGM blocks from the checkpoint's config; with one block per level the two-block formula
    would miss ``down_blocks.1`` and put ``up_blocks.1.attentions.0`` on ``output_blocks.3``."""
    from backend.diffusion_engine.sd15 import StableDiffusion

    unet = _OneBlockPerLevelUNet(fx.Linear)
    engine = StableDiffusion(unet, TinyClip(fx.Linear))
    def attn(block: nn.Module, which: str, proj: str) -> nn.Module:
        return getattr(getattr(block[1].transformer_blocks[0], which), proj)

    tb = "transformer_blocks_0"
    ib, ob = unet.input_blocks, unet.output_blocks
    want = {
        f"unet/down_blocks_0_attentions_0_{tb}_attn1_to_q": attn(ib[1], "attn1", "to_q"),
        "unet/down_blocks_0_downsamplers_0_conv": ib[2][0].op,
        "unet/down_blocks_1_resnets_0_conv1": ib[3][0].in_layers[2],
        f"unet/down_blocks_1_attentions_0_{tb}_attn2_to_k": attn(ib[3], "attn2", "to_k"),
        "unet/mid_block_attentions_0_proj_in": unet.middle_block[1].proj_in,
        f"unet/up_blocks_0_attentions_1_{tb}_attn1_to_v": attn(ob[1], "attn1", "to_v"),
        "unet/up_blocks_0_upsamplers_0_conv": ob[1][2].conv,
        f"unet/up_blocks_1_attentions_0_{tb}_attn1_to_q": attn(ob[2], "attn1", "to_q"),
        f"unet/up_blocks_1_attentions_1_{tb}_attn1_to_q": attn(ob[3], "attn1", "to_q"),
        "unet/up_blocks_1_resnets_1_conv2": ob[3][0].out_layers[3],
    }
    absent = [f"unet/up_blocks_1_attentions_2_{tb}_attn1_to_q", f"unet/down_blocks_1_attentions_1_{tb}_to_q"]
    targets, missing = forge_host.build_targets(engine, [*want, *absent])
    assert missing == absent
    for key, module in want.items():
        assert targets[key].module is module, key


def test_target_shape_counts_rows_and_squeezes_1x1(fx):
    assert _target_shape(Target(nn.Linear(8, 24), slice(8, 16))) == (8, 8)
    assert _target_shape(Target(fx.Linear(8, 24))) == (24, 8)
    assert _target_shape(Target(nn.Conv2d(4, 6, 1))) == (6, 4)
    assert _target_shape(Target(nn.Conv2d(4, 6, 3))) == (6, 4, 3, 3)
    assert _target_shape(Target(nn.LayerNorm(4))) is None


def test_the_script_wires_every_hook_to_the_forge_adapter(fx):
    """scripts/klora.py, imported the way modules/script_loading.py load_module does, picks the Forge adapter
    and registers its callbacks."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("klora.py", HERE.parent / "scripts" / "klora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.ext.host, forge_host.ForgeHost) and module.ext.host.label == "Forge 2.0.1v1.10.1"
    assert module.HOST_ERROR is None
    registered = {
        name: [c.callback for c in callbacks] for name, callbacks in fx.callbacks.callback_map.items()
    }
    assert module.ext.on_cfg_denoiser in registered["callbacks_cfg_denoiser"]
    assert module.ext.on_before_ui in registered["callbacks_before_ui"]
    assert module.ext.on_ui_settings in registered["callbacks_ui_settings"]
    assert module.ext.on_app_started in registered["callbacks_app_started"]
    script = module.KLoraScript()
    assert script.title() == TITLE
    assert script.show(False) is module.scripts.AlwaysVisible
