"""klora.diffusers on tiny SD1.5, SDXL and Flux pipelines built from diffusers classes
(tests/tiny_pipelines.py).

Oracles:

* mode ``merge`` against diffusers itself: both files loaded with ``load_lora_weights``, weighted with
  ``set_adapters`` and merged with ``fuse_lora``;
* every other mode against a run without hooks whose weights, before each scheduler step ``i`` (the
  pipeline's own loop index, from ``callback_on_step_end``), hold the deltas the plan chooses at τ = i/N;
* τ against the schedule each scheduler and pass actually runs (img2img ``strength``, second-order
  schedulers, unbatched true CFG).

Latents are compared (``output_type="latent"``): the VAE's clipping could hide a difference.
"""

from __future__ import annotations

import os
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import diffusers
import pytest
import tiny_pipelines as tp
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

import klora.diffusers as kd
from klora import options, scores
from klora.delta import dense_delta
from klora.formats import container, read_lora
from klora.keys.sd import module_targets
from klora.layers import LoraFormatError

BUILDERS: dict[str, Callable[..., diffusers.DiffusionPipeline]] = {
    "sd15": tp.sd15, "sdxl": tp.sdxl, "flux": tp.flux}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: on a busy 2-core machine a second torch thread makes a sampling run 10-30×
    slower (measured), not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> Callable[[str], tuple[Path, Path]]:
    """family → (content, style) PEFT files for that tiny pipeline, written once: content rank 4 / alpha 2,
    style rank 2 / alpha 4."""
    folder = tmp_path_factory.mktemp("loras")
    made: dict[str, tuple[Path, Path]] = {}

    def pair(family: str) -> tuple[Path, Path]:
        if family not in made:
            build = BUILDERS[family]
            made[family] = (
                tp.write_lora(build, folder, f"{family}_content.safetensors", seed=1),
                tp.write_lora(build, folder, f"{family}_style.safetensors", seed=2, rank=2, alpha=4))
        return made[family]

    return pair


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    """Equal up to float error, relative to the tensors' scale (the tiny models' latents reach ~10²)."""
    return float((a - b).abs().max()) <= rtol * float(b.abs().max()) + 1e-6


def _differs(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-2) -> bool:
    return float((a - b).abs().max()) > rtol * float(b.abs().max())


def _quiet_fuse(*args, **kwargs) -> kd.PipelineFusion:
    with warnings.catch_warnings():
        warnings.simplefilter("error", kd.KLoraWarning)  # no layer may be skipped
        return kd.fuse(*args, **kwargs)


# ------------------------------------------------------------------------------------- merge = diffusers


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux"])
def test_merge_mode_equals_diffusers_load_lora_weights_and_fuse_lora(family, loras):
    content, style = loras(family)
    pipe = BUILDERS[family]()
    plain = tp.run(pipe)
    with _quiet_fuse(pipe, content, style, mode="merge", cw=0.7, sw=1.3) as plan:
        ours = tp.run(pipe)
    assert plan.text_encoder_keys and plan.denoiser_keys
    pipe.load_lora_weights(content, adapter_name="content")
    pipe.load_lora_weights(style, adapter_name="style")
    pipe.set_adapters(["content", "style"], [0.7, 1.3])
    pipe.fuse_lora(adapter_names=["content", "style"])
    theirs = tp.run(pipe)
    assert _differs(theirs, plain)  # the LoRAs matter, so a missing or wrong delta would show
    assert _close(ours, theirs)


# -------------------------------------------------------------------------------- exact at every step


def _merged_run(pipe, fusion: kd.PipelineFusion, steps: int, shift: int = 0, **kw) -> torch.Tensor:
    """The pipeline without hooks; before scheduler step i (``callback_on_step_end`` gives the loop index)
    the weights hold the deltas the plan chooses at τ = (i + shift) / N, text encoders their fixed choice."""
    plan = fusion.plan
    keys = fusion.denoiser_keys + fusion.text_encoder_keys
    modules = {id(fusion.targets[k].module): fusion.targets[k].module for k in keys}
    originals = {i: m.weight.detach().clone() for i, m in modules.items()}
    strength = {"content": plan.options.content_strength, "style": plan.options.style_strength}
    files = {"content": fusion.content, "style": fusion.style}

    def load(tau: float) -> None:
        weights = {i: w.clone() for i, w in originals.items()}
        for key in keys:
            choice = plan.choose(key, tau)
            chosen = ("content", "style") if choice == "both" else (choice,) if choice != "none" else ()
            target = fusion.targets[key]
            for role in chosen:
                if key in files[role].layers:
                    rows = slice(None) if target.rows is None else target.rows
                    w = weights[id(target.module)]
                    w[rows] += dense_delta(files[role].layers[key], strength[role]).reshape(w[rows].shape)
        with torch.no_grad():
            for i, m in modules.items():
                m.weight.copy_(weights[i])

    def step_end(_pipe, i, _t, callback_kwargs):
        load((i + 1 + shift) / steps)
        return callback_kwargs

    load(shift / steps)
    try:
        return tp.run(pipe, steps, callback_on_step_end=step_end, **kw)
    finally:
        with torch.no_grad():
            for i, m in modules.items():
                m.weight.copy_(originals[i])


@pytest.mark.parametrize(("family", "opts"), [
    ("sd15", {"gamma": "paper", "te": "content"}),
    ("sdxl", {"mode": "random", "te": "style"}),
    ("flux", {}),  # Flux's default pattern s*
])
def test_hooks_equal_weights_merged_per_step(family, opts, loras):
    steps = 4
    content, style = loras(family)
    pipe = BUILDERS[family]()
    fusion = _quiet_fuse(pipe, content, style, seed=3, **opts)
    rows = fusion.choices(steps)
    decided = [rows[k] for k in fusion.denoiser_keys]
    assert any(len(set(r)) > 1 for r in decided)  # layers switch during the run: τ matters
    assert any("C" in r for r in decided) and any("S" in r for r in decided)
    with fusion:
        hooked = tp.run(pipe, steps)
    assert fusion.taus == tuple(i / steps for i in range(steps))
    assert _close(hooked, _merged_run(pipe, fusion, steps))
    assert _differs(hooked, _merged_run(pipe, fusion, steps, shift=1), rtol=1e-3)  # one step off shows


def test_bf16_model_follows_the_float32_result(loras):
    """The fusion's effect on a bf16 UNet (the hooks compute in the layer's dtype) is the float32 one up to
    bf16 rounding (one model call: sampling steps would amplify the rounding of the model itself)."""
    content, style = loras("sd15")
    g = torch.Generator().manual_seed(0)
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor(500),
              "encoder_hidden_states": torch.randn(1, tp.MAX_TOKENS, 32, generator=g)}
    effect = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = tp.sd15().to(dtype)
        args = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad():
            plain = pipe.unet(**args).sample.float()
            with _quiet_fuse(pipe, content, style, cw=2, sw=2):
                effect[dtype] = pipe.unet(**args).sample.float() - plain
    size = float(effect[torch.float32].abs().max())
    assert size > 0.1
    assert float((effect[torch.bfloat16] - effect[torch.float32]).abs().max()) < 0.05 * size


# ------------------------------------------------------------------------------------------------------ τ


def _image() -> Image.Image:
    return Image.new("RGB", (32, 32), (120, 80, 200))


def _mask() -> Image.Image:
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    return mask


@pytest.mark.parametrize(("name", "build", "kwargs", "expected"), [
    ("euler txt2img", lambda: tp.sd15(), {}, [0, 1 / 4, 2 / 4, 3 / 4]),
    ("euler img2img", lambda: diffusers.StableDiffusionImg2ImgPipeline(**tp.sd15().components),
     {"image": _image(), "strength": 0.5}, [2 / 4, 3 / 4]),
    ("euler inpaint", lambda: diffusers.StableDiffusionInpaintPipeline(**tp.sd15().components),
     {"image": _image(), "mask_image": _mask(), "strength": 0.5, "height": 32, "width": 32}, [2 / 4, 3 / 4]),
    ("ddim img2img (no step index)", lambda: diffusers.StableDiffusionImg2ImgPipeline(
        **tp.sd15(diffusers.DDIMScheduler(steps_offset=1)).components),
     {"image": _image(), "strength": 0.75}, [1 / 4, 2 / 4, 3 / 4]),
    ("pndm (its counter)", lambda: tp.sd15(diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1)),
     {}, [0, 1 / 5, 2 / 5, 3 / 5, 4 / 5]),
    ("heun (order 2)", lambda: tp.sd15(diffusers.HeunDiscreteScheduler()), {}, [0, 0, 1 / 4, 1 / 4, 2 / 4,
                                                                              2 / 4, 3 / 4]),
    ("sdxl img2img", lambda: diffusers.StableDiffusionXLImg2ImgPipeline(**tp.sdxl().components),
     {"image": _image(), "strength": 0.5}, [2 / 4, 3 / 4]),
    ("sdxl inpaint", lambda: diffusers.StableDiffusionXLInpaintPipeline(**tp.sdxl().components),
     {"image": _image(), "mask_image": _mask(), "strength": 0.75, "height": 32, "width": 32},
     [1 / 4, 2 / 4, 3 / 4]),
    ("flux true cfg (two calls a step)", lambda: tp.flux(),
     {"negative_prompt": "a cat", "true_cfg_scale": 2.0}, [0, 0, 1 / 4, 1 / 4, 2 / 4, 2 / 4, 3 / 4, 3 / 4]),
    ("flux img2img", lambda: diffusers.FluxImg2ImgPipeline(**tp.flux().components),
     {"image": _image(), "strength": 0.5}, [2 / 4, 3 / 4]),
])
def test_tau_is_the_step_of_the_full_schedule(name, build, kwargs, expected, loras):
    pipe = build()
    pipe.set_progress_bar_config(disable=True)
    family = "flux" if isinstance(pipe.components.get("transformer"), nn.Module) else (
        "sdxl" if pipe.components.get("text_encoder_2") is not None else "sd15")
    content, style = loras(family)
    with _quiet_fuse(pipe, content, style) as plan:
        tp.run(pipe, 4, **kwargs)
    assert plan.taus == pytest.approx(expected, abs=1e-12)


def test_schedule_position_without_a_schedule_or_index():
    assert kd.schedule_position(types.SimpleNamespace(timesteps=None)) is None
    ddim = diffusers.DDIMScheduler()
    ddim.set_timesteps(5)
    assert kd.schedule_position(ddim, ddim.timesteps[3]) == (3, 5)
    assert kd.schedule_position(ddim, ddim.timesteps[3].expand(2)) == (3, 5)  # a timestep per sample
    assert kd.schedule_position(ddim, torch.tensor(0.5)) is None  # not on the schedule: cannot tell


# ---------------------------------------------------------------------------------- nothing left behind


def _our_hooks(pipe) -> int:
    count = 0
    for component in pipe.components.values():
        if isinstance(component, nn.Module):
            for m in component.modules():
                count += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return count


def _state(pipe) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.detach().clone() for name, c in pipe.components.items()
            if isinstance(c, nn.Module) for k, v in c.state_dict().items()}


@pytest.mark.parametrize("ending", ["finished", "RuntimeError", "KeyboardInterrupt"])
def test_after_the_block_weights_are_bit_identical_and_a_plain_call_is_plain(ending, loras):
    content, style = loras("sd15")
    pipe = tp.sd15()
    plain = tp.run(pipe)
    before, hooks_before = _state(pipe), _our_hooks(pipe)
    error = {"finished": None, "RuntimeError": RuntimeError, "KeyboardInterrupt": KeyboardInterrupt}[ending]

    def stop_at_step_1(_pipe, i, _t, callback_kwargs):
        if error is not None and i == 1:
            raise error("stopped")
        return callback_kwargs

    fusion = _quiet_fuse(pipe, content, style)
    if error is None:
        with fusion:
            fused = tp.run(pipe, callback_on_step_end=stop_at_step_1)
        assert _differs(fused, plain)
    else:
        with pytest.raises(error), fusion:
            tp.run(pipe, callback_on_step_end=stop_at_step_1)
    assert not fusion.attached and _our_hooks(pipe) == hooks_before
    after = _state(pipe)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(tp.run(pipe), plain)
    fusion.remove()  # idempotent


def test_two_fusions_cannot_stack_and_one_can_be_reentered(loras):
    content, style = loras("flux")
    pipe = tp.flux()
    first = _quiet_fuse(pipe, content, style)
    with first:
        with pytest.raises(kd.FuseError, match="already attached"):
            first.attach()
        with pytest.raises(kd.FuseError, match="another K-LoRA fusion"):
            _quiet_fuse(pipe, content, style).attach()
    with first:  # a fusion can be used again
        assert first.attached


# --------------------------------------------------------------------------- LoRAs loaded by diffusers


def test_loras_loaded_with_load_lora_weights_stay_and_the_same_file_twice_warns(loras, tmp_path):
    content, style = loras("sd15")
    extra = tp.write_lora(tp.sd15, tmp_path, "extra.safetensors", seed=7)
    pipe = tp.sd15()
    pipe.load_lora_weights(extra, adapter_name="extra")
    with _quiet_fuse(pipe, content, style, mode="merge") as plan:  # no warning: another LoRA
        to_q = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q  # PEFT's wrapper
        key = "unet/down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
        assert plan.targets[key].module is to_q.base_layer
        ours = tp.run(pipe)
    pipe.load_lora_weights(content, adapter_name="content")
    with pytest.warns(kd.KLoraWarning, match="content LoRA sd15_content is also loaded .*adapter 'content'"):
        kd.fuse(pipe, content, style)
    pipe.load_lora_weights(style, adapter_name="style")
    pipe.set_adapters(["extra", "content", "style"], [1.0, 1.0, 1.0])
    assert _close(ours, tp.run(pipe))  # K-LoRA's deltas on top of the loaded LoRA = all three loaded


# -------------------------------------------------------------------------------------- fused qkv rows


@pytest.mark.parametrize("family", ["sd15", "flux"])
def test_fused_projections_take_their_rows(family, loras):
    content, style = loras(family)
    pipe = BUILDERS[family]()
    with _quiet_fuse(pipe, content, style) as plan:
        separate = tp.run(pipe)
    (pipe.unet if family == "sd15" else pipe.transformer).fuse_qkv_projections()
    fused = _quiet_fuse(pipe, content, style)
    sliced = [k for k, t in fused.targets.items() if t.rows is not None]
    assert sliced and all(k.endswith(("to_q", "to_k", "to_v", "add_q_proj", "add_v_proj")) for k in sliced)
    assert len(fused.targets) == len(plan.targets)
    with fused:
        assert _close(tp.run(pipe), separate)


# ------------------------------------------------------------------------------ offload and compile


def test_model_cpu_offload_hooks_compose(loras):
    """accelerate's offload hooks (``enable_model_cpu_offload``; on this CPU-only machine with device
    "cpu", which installs the same hooks) replace the models' forward: K-LoRA's hooks still run."""
    content, style = loras("flux")
    pipe = tp.flux()
    with _quiet_fuse(pipe, content, style, mode="random"):
        expected = tp.run(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert getattr(pipe.transformer, "_hf_hook", None) is not None
    with _quiet_fuse(pipe, content, style, mode="random") as plan:
        assert _close(tp.run(pipe), expected)
    assert len(plan.taus) == 3


def test_compiled_blocks_follow_tau(loras):
    """A block compiled with torch.compile keeps applying each step's choice (dynamo re-guards on the
    hooks' state); mode random changes choices every step, so a stale graph would show."""
    content, style = loras("flux")
    pipe = tp.flux()
    with _quiet_fuse(pipe, content, style, mode="random"):
        expected = tp.run(pipe)
    torch._dynamo.reset()
    pipe.transformer.single_transformer_blocks[0].compile(backend="eager")
    try:
        with _quiet_fuse(pipe, content, style, mode="random"):
            assert _close(tp.run(pipe), expected)
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- mapping


def test_unet_and_clip_keys_are_those_of_module_targets():
    pipe = tp.sdxl()
    mapping = kd.map_pipeline(pipe)
    for model, component in ((pipe.unet, "unet"), (pipe.text_encoder, "te1"), (pipe.text_encoder_2, "te2")):
        expected = module_targets(model, component, "diffusers")
        assert {k: mapping.targets[k].module for k in expected} == expected
    assert mapping.family == "sdxl" and mapping.denoisers == [pipe.unet]
    pipe.unet = torch.compile(pipe.unet, backend="eager")  # an OptimizedModule around the UNet (not run)
    compiled = kd.map_pipeline(pipe)
    assert compiled.family == "sdxl" and compiled.denoisers == [pipe.unet]
    assert {k: t.module for k, t in compiled.targets.items()} == \
        {k: t.module for k, t in mapping.targets.items()}


def _family_transformer(family: str) -> tuple[nn.Module, list[str]]:
    torch.manual_seed(0)
    if family == "qwen-image":
        return diffusers.QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=1, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=16, axes_dims_rope=(2, 2, 4)), \
            ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "img_mlp.net.2", "txt_mod.1"]
    if family == "z-image":
        return diffusers.ZImageTransformer2DModel(
            dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=16,
            axes_dims=[4, 6, 6], axes_lens=[64, 32, 32]), ["to_q", "to_k", "to_v", "to_out.0", "w1", "w2"]
    if family == "wan":
        return diffusers.WanTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16,
            freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32), \
            ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.2"]
    if family == "chroma":
        return diffusers.ChromaTransformer2DModel(
            patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8),
            approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1), \
            ["to_q", "to_k", "to_v", "proj_mlp", "ff.net.2"]
    return diffusers.SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
        out_channels=4, pos_embed_max_size=16), \
        ["to_q", "to_k", "to_v", "add_k_proj", "to_add_out", "ff.net.2"]


_PIPELINES = {"qwen-image": "QwenImagePipeline", "z-image": "ZImagePipeline", "wan": "WanPipeline",
              "chroma": "ChromaPipeline", "sd3": "StableDiffusion3Pipeline"}


@pytest.mark.parametrize("family", list(_PIPELINES))
def test_other_families_place_every_layer_on_the_module_it_names(family, tmp_path):
    """A diffusers-format LoRA of each family's transformer (PEFT adapter saved by the pipeline class's
    ``save_lora_weights``): every layer lands on the module its file key names, whichever scheme read it."""
    transformer, targets = _family_transformer(family)
    cls = getattr(diffusers, _PIPELINES[family])
    paths = []
    for seed in (1, 2):
        model, _ = _family_transformer(family)
        state, config = tp._adapter(model, targets, 2, 2.0, seed, 0.05)
        cls.save_lora_weights(tmp_path, weight_name=f"{seed}.safetensors", transformer_lora_layers=state,
                              transformer_lora_adapter_metadata=config)
        paths.append(tmp_path / f"{seed}.safetensors")
    blanks = {name: None for name in cls._get_signature_keys(cls)[0]
              if name not in ("transformer", "scheduler")}
    pipe = cls(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), **blanks)
    fusion = _quiet_fuse(pipe, *paths)
    content = read_lora(paths[0])
    assert set(fusion.denoiser_keys) == set(content.layers) and len(content.layers) >= 5
    for key, layer in content.layers.items():
        module_path = layer.file_key.removeprefix("transformer.")
        assert fusion.targets[key].module is transformer.get_submodule(module_path), key
    assert fusion.plan.options.pattern == ("s*" if family == "chroma" else "s")


def test_flux_fused_file_layers_land_on_the_separate_projections(tmp_path):
    """A BFL-named Flux LoRA (fused ``img_attn.qkv``, ``linear1``) is split by the reader into q, k, v (and
    proj_mlp) layers, which diffusers' Flux has as separate modules; its T5 layers (``text_encoder_2.``, which
    the Flux reader calls te3) land on the pipeline's ``text_encoder_2``."""
    pipe = tp.flux()
    t = pipe.transformer
    hidden = t.config.num_attention_heads * t.config.attention_head_dim
    mlp = t.single_transformer_blocks[0].proj_mlp.out_features
    t5_q = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q
    files = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for name, (out, inp) in {"diffusion_model.double_blocks.0.img_attn.qkv": (3 * hidden, hidden),
                                 "diffusion_model.single_blocks.0.linear1": (3 * hidden + mlp, hidden),
                                 "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q":
                                     (t5_q.out_features, t5_q.in_features)}.items():
            tensors[f"{name}.lora_A.weight"] = torch.randn(2, inp, generator=g) * 0.05
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, 2, generator=g) * 0.05
        files.append(tmp_path / f"bfl{seed}.safetensors")
        save_file(tensors, str(files[-1]))
    fusion = _quiet_fuse(pipe, *files)
    to_k = fusion.targets["transformer/transformer_blocks_0_attn_to_k"]
    assert to_k.module is t.transformer_blocks[0].attn.to_k and to_k.rows is None
    assert fusion.targets["transformer/single_transformer_blocks_0_proj_mlp"].module is \
        t.single_transformer_blocks[0].proj_mlp
    assert len(fusion.denoiser_keys) == 7
    assert fusion.targets["te3/encoder_block_0_layer_0_SelfAttention_q"].module is t5_q
    assert fusion.text_encoder_keys == ["te3/encoder_block_0_layer_0_SelfAttention_q"]


# ------------------------------------------------------------------------------------------- the options


def _valid_value(opt: options.Option):
    """A value of ``opt`` other than its default, spelled as a user would."""
    if opt.type == "choice":
        return next(label for code, label in opt.choices.items() if code != opt.default)  # the panel label
    if opt.type == "gamma":
        return "paper"
    if opt.integer:
        return 3
    return str(0.5 if opt.default in (None, 1.0, 0.0) else opt.default / 2)  # text, as the tag gives it


def test_every_plan_option_of_the_table_reaches_the_plan(loras):
    content, style = loras("flux")
    pipe = tp.flux()
    names = kd.fuse_options()
    assert {"cw", "sw", "alpha", "beta", "pattern", "gamma", "mode", "scope", "te", "k"} <= set(names)
    for opt in options.OPTIONS:
        if opt.tag not in names or opt.name == "gamma_value":
            continue
        value = _valid_value(opt)
        plan = kd.fuse(pipe, content, style, **{opt.tag: value}).plan
        expected = options.parse(opt.name, value)[opt.name]
        assert getattr(plan.options, opt.name) == expected, opt.name
    plan = kd.fuse(pipe, content, style, gamma=0.8, content_strength=0.5).plan  # a γ number, a long name
    assert plan.gamma == 0.8 and plan.options.content_strength == 0.5
    assert kd.fuse(pipe, content, style, gamma="manual", gamma_value=2).plan.gamma == 2
    assert kd.fuse(pipe, content, style, gamma_value=3).plan.gamma == 3  # a value alone means manual


def test_flux_uses_pattern_s_star_unless_the_user_chose(loras):
    content, style = loras("flux")
    pipe = tp.flux()
    default = kd.fuse(pipe, content, style)
    assert default.plan.options.pattern == "s*" and default.note == "Flux default pattern s*"
    assert "Flux default pattern s*" in default.summary()
    for chosen in ({"pattern": "s"}, {"beta": 0.7}):
        fusion = kd.fuse(pipe, content, style, **chosen)
        assert fusion.plan.options.pattern == "s" and fusion.note is None
    sd = kd.fuse(tp.sd15(), *loras("sd15"))
    assert sd.plan.options.pattern == "s"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"patern": "s"}, "unknown K-LoRA argument 'patern'"),
    ({"pattern": "x"}, "'pattern': 'x' is not one of s, s\\*"),
    ({"cw": "strong"}, "'content_strength' must be a finite number"),
    ({"k": 2.5}, "whole number"),
    ({"cw": 1, "content_strength": 2}, "both set content_strength"),
    ({"content_lora": "dog"}, "second and third arguments"),
    ({"map": True}, "selection_map"),
    ({"pattern": "s*", "alpha": 0}, "must be > 0 with pattern s\\*"),
    ({"gamma": "paper", "gamma_value": 2}, "'gamma_value' is a manual gamma, but gamma is 'paper'"),
    ({"enabled": True}, "does not shape the fusion"),
])
def test_bad_options_are_the_tags_messages(kwargs, message, loras):
    content, style = loras("sd15")
    with pytest.raises(options.OptionError, match=message):
        kd.fuse(tp.sd15(), content, style, **kwargs)


def test_pipelines_and_pairs_it_cannot_use_get_a_clear_error(loras, tmp_path):
    content, style = loras("sd15")
    with pytest.raises(kd.UnsupportedPipelineError, match="has no `unet` or `transformer`"):
        kd.fuse(types.SimpleNamespace(vae=tp.vae()), content, style)
    unconditional = diffusers.DDPMPipeline(unet=diffusers.UNet2DModel(
        sample_size=8, block_out_channels=(16, 16), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2), scheduler=diffusers.DDPMScheduler())
    unfit = r"none of the 48 UNet/transformer layers .* in this DDPMPipeline .*no module, .*does not fit"
    with pytest.raises(kd.NoSharedLayerError, match=unfit):
        kd.fuse(unconditional, content, style)
    with pytest.raises(kd.NoSharedLayerError, match=r"none of .* exists in this StableDiffusionPipeline"):
        kd.fuse(tp.sd15(), *loras("flux"))  # Flux LoRAs: only their CLIP layers fit SD1.5
    with pytest.raises(kd.NoSharedLayerError, match="no UNet/transformer layer in common"):
        kd.fuse(tp.sd15(), content, loras("flux")[1])
    with pytest.raises(LoraFormatError, match="file not found"):
        kd.fuse(tp.sd15(), tmp_path / "missing.safetensors", style)
    with pytest.raises(TypeError, match="content LoRA must be a path"):
        kd.fuse(tp.sd15(), 42, style)
    assert issubclass(kd.FuseError, ValueError)


def test_skipped_layers_are_warned_and_files_may_be_given_read(loras):
    content, style = (read_lora(p) for p in loras("sd15"))
    pipe = tp.sd15()
    pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q = nn.Linear(64, 8)  # other shape
    with pytest.warns(kd.KLoraWarning, match="1 of 54 layers .* skipped .*1 whose shape does not fit"):
        fusion = kd.fuse(pipe, content, style)
    assert fusion.content is content
    assert "skipped 1" in fusion.summary(4)
    assert fusion.selection_map(4).size[0] > 0


def test_with_the_disk_cache_on_a_second_process_neither_hashes_nor_scores(loras, tmp_path, monkeypatch):
    """After ``scores.set_disk_cache``, fuse records the files' hashes and score tables there; with the memory
    caches gone (as in a new process) the same fusion reads both instead of hashing and forming products."""
    folder = tmp_path / "klora-cache"
    then = time.time_ns() - 60 * 10**9
    paths = loras("sd15")
    for path in paths:
        os.utime(path, ns=(then, then))
    scores.set_disk_cache(folder)
    scores.clear_cache()  # earlier tests scored this pair in memory
    try:
        first = _quiet_fuse(tp.sd15(), *paths).plan
        assert (folder / "files.json").is_file() and len(list(folder.glob("*.safetensors"))) == 2
        scores.clear_cache()

        def forbidden(*args, **kwargs):
            raise AssertionError("hashed or scored again")

        monkeypatch.setattr(container, "sha256", forbidden)
        monkeypatch.setattr(scores, "layer_stats", forbidden)
        second = _quiet_fuse(tp.sd15(), *paths).plan
        assert second.layers == first.layers
    finally:
        scores.set_disk_cache(None)
        scores.clear_cache()
