"""The Forge Neo host (:mod:`klora.webui.hosts.neo`) against the Neo double: Neo's layer over the Forge and
A1111 doubles (``tests/doubles/neo``, ``forge``, ``a1111``; ``tests/doubles/README.md``).

* Detection by feature, and the host the real import system finds.
* For every family Neo runs (SD1.5, SDXL, Flux, Chroma, Z-Image, Lumina 2, Qwen-Image, Wan 2.x T2V and 2.1
  I2V, and their text encoders): the module tree Neo builds, on the meta device with Neo's exact names and
  shapes (``tests/doubles/models``), and every LoRA spelling Neo's own loader accepts landing on the right
  module or row slice.
* Whole generations through the doubles: Z-Image (plain and GGUF Linears) equal to the merged oracle, Wan
  2.2's two experts in both of Neo's refiner modes with τ running on through the switch, another family's
  refiner ending K-LoRA, Nunchaku and unknown engines refused with the image made without K-LoRA; after each,
  bit-identical weights and no hook left.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path

import pytest
import torch
from doubles.models.flux import IntegratedFluxTransformer2DModel
from doubles.models.neo import NextDiT, Qwen3, QwenImageTransformer2DModel, WanModel
from doubles.models.tiny_forge import TinyClip, TinyT5
from safetensors.torch import save_file
from test_forge import (
    LAYERS,
    _enabled,
    _hooks_left,
    _load,
    _observe,
    _processing,
    _rand,
    _register,
    _same,
    _state,
    doubles,
)
from torch import nn

from klora import apply
from klora.formats import read_lora
from klora.layers import layout
from klora.webui import hosts as host
from klora.webui import infotext
from klora.webui.hosts import neo as neo_host

# Neo's layer over the Forge double's (tests/doubles/README.md)
NEO_LAYERS = (Path(__file__).parent / "doubles" / "neo", *LAYERS)


@pytest.fixture
def nfx(tmp_path, monkeypatch):
    """The Neo double (over Forge's and A1111's) with the Neo host's extension (test_forge ``doubles``)."""
    yield from doubles(lambda: neo_host.NeoHost("2.26"), NEO_LAYERS, tmp_path, monkeypatch)


def _engine(name: str):
    """Neo's engine class ``name`` (backend/diffusion_engine/*.py of the double)."""
    modules = {
        "StableDiffusion": "sd15",
        "StableDiffusionXL": "sdxl",
        "Flux": "flux",
        "Chroma": "chroma",
        "ZImage": "zimage",
        "Lumina2": "lumina",
        "QwenImage": "qwen",
        "Wan": "wan",
        "Anima": "anima",
    }
    return getattr(importlib.import_module(f"backend.diffusion_engine.{modules[name]}"), name)


# ----------------------------------------------------------------------------------------------------
# Detection


def _finder(present: set[str]):
    return lambda name: object() if name in present else None


BACKEND = {"modules", "modules_forge", "backend", "backend.patcher.lora"}


def test_neo_is_detected_by_its_comfy_port_or_its_version():
    by_package = host.detect(
        _finder(BACKEND | {"modules_forge.packages.comfy.lora"}), lambda: None, lambda: "2.26"
    )
    assert by_package == host.HostInfo("neo", "2.26") and by_package.supported and by_package.is_forge
    assert host.detect(_finder(BACKEND), lambda: "neo", lambda: "2.30").name == "neo"
    assert host.detect(_finder(BACKEND), lambda: "2.0.1v1.10.1", lambda: None) == host.HostInfo(
        "forge", "2.0.1v1.10.1"
    )
    classic = host.detect(
        _finder({"modules", "modules_forge", "ldm_patched"}), lambda: "classic", lambda: None
    )
    assert classic.name == "forge-ldm"
    with pytest.raises(RuntimeError, match=r"Forge Neo .*ldm_patched"):
        host.load(classic)
    assert isinstance(host.load(by_package), neo_host.NeoHost)
    assert host.load(by_package).label == "Forge Neo 2.26"


def test_the_real_import_system_finds_neo(nfx):
    host.current.cache_clear()
    try:
        assert host.detect() == host.HostInfo("neo", "2.26")
        assert isinstance(host.load(), neo_host.NeoHost)
    finally:
        host.current.cache_clear()


# ----------------------------------------------------------------------------------------------------
# Neo's module trees (meta device, exact names and shapes) and every spelling Neo's loader accepts

Expected = list[tuple[str, slice | None]]  # (module path in the tree, rows)
Shape = tuple[int, ...]  # (out, in) or a conv's (out, in, kh, kw)


def _rows(path: str, *sizes: int) -> Expected:
    """The row slices of a fused module, in order."""
    out, start = [], 0
    for size in sizes:
        out.append((path, slice(start, start + size)))
        start += size
    return out


def _write_group(path: Path, cases: dict[str, tuple[Shape, Expected]], form: str) -> None:
    down, up = {
        "kohya": (".lora_down.weight", ".lora_up.weight"),
        "peft": (".lora_A.weight", ".lora_B.weight"),
        "peft_default": (".lora_A.default.weight", ".lora_B.default.weight"),
    }[form]
    tensors = {}
    for name, (
        (out, inp, *kernel),
        _,
    ) in cases.items():  # a conv: (out, in, kh, kw), stored 4-D as kohya does
        tensors[name + down] = torch.ones(1, inp, *kernel)
        tensors[name + up] = torch.ones(out, 1, *([1] * len(kernel)))
    save_file(tensors, str(path))


def _check_spellings(tmp_path: Path, engine, root: nn.Module, groups: dict[str, dict], form: str = "kohya"):
    """Each group is one file in one spelling: file module name → ((out, in), where its layers must land).
    Every layer of the file is placed, on that module and those rows, and fits (shape check of the hooks)."""
    host_ = neo_host.NeoHost()
    for group, cases in groups.items():
        path = tmp_path / f"{group.replace(' ', '_')}.safetensors"
        _write_group(path, cases, "peft_default" if "PEFT default" in group else form)
        lora = read_lora(path)
        targets = host_.targets(engine, lora.layers)
        for name, (_shape, expected) in cases.items():
            layers = [layer for layer in lora.layers.values() if layer.file_key.split("[")[0] == name]
            assert layers, (group, name)
            got = []
            for layer in layers:
                target = targets.get(layer.key)
                assert target is not None, (group, name, layer.key)
                assert layout(apply.site(layer.key, target).shape) == layer.layout, (group, layer.key)
                got.append((next(p for p, m in root.named_modules() if m is target.module), target.rows))
            assert sorted(got, key=str) == sorted(expected, key=str), (group, name)


def _tree(modules: dict[str, nn.Module]) -> nn.Module:
    """A module tree holding ``modules`` at these dotted paths (the rest of the model left out)."""
    root = nn.Module()
    for path, module in modules.items():
        parent = root
        *heads, last = path.split(".")
        for head in heads:
            if not hasattr(parent, head):
                parent.add_module(head, nn.Module())
            parent = getattr(parent, head)
        parent.add_module(last, module)
    return root


def _meta_engine(nfx, name: str, dm: nn.Module, *encoders: nn.Module):
    engine = _engine(name)(dm, *encoders)
    nfx.shared.sd_model = engine
    return engine


def test_sd15_and_sdxl_unet_and_clip(nfx, tmp_path):
    """backend/nn/unet.py SGM names at SD1.5 / SDXL sizes; kohya (diffusers and SGM), PEFT, ComfyUI and the
    text encoders (kohya, ComfyUI's text_encoders.)."""
    StableDiffusion, StableDiffusionXL = _engine("StableDiffusion"), _engine("StableDiffusionXL")

    with torch.device("meta"):
        unet = _tree(
            {
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q": nn.Linear(320, 320, bias=False),
                "input_blocks.1.1.proj_in": nn.Conv2d(320, 320, 1),
                "middle_block.1.transformer_blocks.0.attn2.to_k": nn.Linear(768, 1280, bias=False),
                "output_blocks.11.1.transformer_blocks.0.ff.net.2": nn.Linear(1280, 320),
                "output_blocks.2.1.conv": nn.Conv2d(1280, 1280, 3, padding=1),
            }
        )
        clip = TinyClip(nn.Linear, dim=768, layers=12)
    engine = StableDiffusion(unet, clip)
    assert neo_host.NeoHost().family(engine) == "sd1"
    _check_spellings(
        tmp_path,
        engine,
        engine.forge_objects.unet.model.diffusion_model,
        {
            "kohya diffusers": {
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
                    (320, 320),
                    [("input_blocks.1.1.transformer_blocks.0.attn1.to_q", None)],
                ),
                "lora_unet_up_blocks_0_upsamplers_0_conv": (
                    (1280, 1280, 3, 3),
                    [("output_blocks.2.1.conv", None)],
                ),
            },
            "kohya SGM": {
                "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k": (
                    (1280, 768),
                    [("middle_block.1.transformer_blocks.0.attn2.to_k", None)],
                ),
            },
            "ComfyUI": {
                "diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.2": (
                    (320, 1280),
                    [("output_blocks.11.1.transformer_blocks.0.ff.net.2", None)],
                ),
                "diffusion_model.input_blocks.1.1.proj_in": (
                    (320, 320),
                    [("input_blocks.1.1.proj_in", None)],
                ),
            },
        },
    )
    cond = engine.forge_objects.clip.cond_stage_model
    te_q = "text_model.encoder.layers.11.self_attn.q_proj"
    for spelling in (
        "lora_te_text_model_encoder_layers_11_self_attn_q_proj",
        "text_encoders.clip_l.transformer." + te_q,
        "text_encoder." + te_q,
    ):
        path = tmp_path / "te.safetensors"
        save_file(
            {
                spelling + ".lora_down.weight": torch.ones(1, 768),
                spelling + ".lora_up.weight": torch.ones(768, 1),
            },
            str(path),
        )
        lora = read_lora(path)
        (key,) = lora.layers
        assert neo_host.NeoHost().targets(engine, [key])[key].module is cond.clip_l.get_submodule(
            "transformer." + te_q
        ), spelling

    with torch.device("meta"):
        unet = _tree(
            {
                "input_blocks.4.1.transformer_blocks.1.attn2.to_k": nn.Linear(2048, 640, bias=False),
                "output_blocks.0.1.transformer_blocks.9.attn1.to_out.0": nn.Linear(1280, 1280),
            }
        )
        clip_l, clip_g = TinyClip(nn.Linear, dim=768, layers=1), TinyClip(nn.Linear, dim=1280, layers=32)
    engine = StableDiffusionXL(unet, clip_l, clip_g)
    assert neo_host.NeoHost().family(engine) == "sdxl"
    _check_spellings(
        tmp_path,
        engine,
        engine.forge_objects.unet.model.diffusion_model,
        {
            "kohya SGM": {
                "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k": (
                    (640, 2048),
                    [("input_blocks.4.1.transformer_blocks.1.attn2.to_k", None)],
                ),
                "lora_unet_output_blocks_0_1_transformer_blocks_9_attn1_to_out_0": (
                    (1280, 1280),
                    [("output_blocks.0.1.transformer_blocks.9.attn1.to_out.0", None)],
                ),
            },
        },
    )
    for spelling in (
        "lora_te2_text_model_encoder_layers_31_self_attn_q_proj",
        "text_encoders.clip_g.transformer.text_model.encoder.layers.31.self_attn.q_proj",
    ):
        path = tmp_path / "te2.safetensors"
        save_file(
            {
                spelling + ".lora_down.weight": torch.ones(1, 1280),
                spelling + ".lora_up.weight": torch.ones(1280, 1),
            },
            str(path),
        )
        (key,) = read_lora(path).layers
        target = neo_host.NeoHost().targets(engine, [key])[key]
        assert target.module is clip_g.transformer.text_model.encoder.layers[31].self_attn.q_proj, spelling


def _flux_tree(chroma: bool = False) -> nn.Module:
    """backend/nn/flux.py at FLUX.1-dev sizes; Chroma: the same blocks without their modulation Linears and
    without vector_in/guidance_in (backend/nn/chroma.py)."""
    with torch.device("meta"):
        dm = IntegratedFluxTransformer2DModel()
        if chroma:
            for block in dm.double_blocks:
                del block.img_mod, block.txt_mod
            for block in dm.single_blocks:
                del block.modulation
            del dm.vector_in, dm.guidance_in
    return dm


FLUX_H = 3072
FLUX_GROUPS = {
    "kohya BFL": {
        "lora_unet_double_blocks_18_img_attn_qkv": (
            (3 * FLUX_H, FLUX_H),
            _rows("double_blocks.18.img_attn.qkv", FLUX_H, FLUX_H, FLUX_H),
        ),
        "lora_unet_single_blocks_37_linear2": ((FLUX_H, 5 * FLUX_H), [("single_blocks.37.linear2", None)]),
    },
    "ComfyUI BFL": {
        "diffusion_model.single_blocks.37.linear1": (
            (7 * FLUX_H, FLUX_H),
            _rows("single_blocks.37.linear1", FLUX_H, FLUX_H, FLUX_H, 4 * FLUX_H),
        ),
        "diffusion_model.single_blocks.0.linear1_qkv": (
            (3 * FLUX_H, FLUX_H),
            _rows("single_blocks.0.linear1", FLUX_H, FLUX_H, FLUX_H),
        ),
        "diffusion_model.double_blocks.0.txt_attn.proj": (
            (FLUX_H, FLUX_H),
            [("double_blocks.0.txt_attn.proj", None)],
        ),
    },
    "diffusers": {
        "transformer.transformer_blocks.0.attn.add_k_proj": (
            (FLUX_H, FLUX_H),
            [("double_blocks.0.txt_attn.qkv", slice(FLUX_H, 2 * FLUX_H))],
        ),
        "transformer.single_transformer_blocks.1.proj_mlp": (
            (4 * FLUX_H, FLUX_H),
            [("single_blocks.1.linear1", slice(3 * FLUX_H, 7 * FLUX_H))],
        ),
    },
    "bare diffusers": {
        "single_transformer_blocks.4.attn.to_v": (
            (FLUX_H, FLUX_H),
            [("single_blocks.4.linear1", slice(2 * FLUX_H, 3 * FLUX_H))],
        ),
    },
    "OneTrainer": {
        "lora_transformer_transformer_blocks_2_ff_context_net_2": (
            (FLUX_H, 4 * FLUX_H),
            [("double_blocks.2.txt_mlp.2", None)],
        ),
        "lora_transformer_single_transformer_blocks_2_attn_to_k": (
            (FLUX_H, FLUX_H),
            [("single_blocks.2.linear1", slice(FLUX_H, 2 * FLUX_H))],
        ),
    },
    "lycoris": {
        "lycoris_single_transformer_blocks_3_proj_out": (
            (FLUX_H, 5 * FLUX_H),
            [("single_blocks.3.linear2", None)],
        ),
        "lycoris_transformer_blocks_1_attn_to_q": (
            (FLUX_H, FLUX_H),
            [("double_blocks.1.img_attn.qkv", slice(0, FLUX_H))],
        ),
    },
}


@pytest.mark.parametrize("chroma", [False, True], ids=["flux", "chroma"])
def test_flux_and_chroma(nfx, tmp_path, chroma):
    Flux = _engine("Flux")

    dm = _flux_tree(chroma)
    with torch.device("meta"):
        t5 = TinyT5(nn.Linear, dim=4096, blocks=1, ffn=10240)
        clip_l = TinyClip(nn.Linear, dim=768, layers=1)
    engine = _meta_engine(nfx, "Chroma", dm, t5) if chroma else Flux(dm, clip_l, t5)
    assert neo_host.NeoHost().family(engine) == ("chroma" if chroma else "flux")
    _check_spellings(tmp_path, engine, dm, FLUX_GROUPS)
    te = {
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.1.DenseReluDense.wo": (
            (4096, 10240),
            "transformer.encoder.block.0.layer.1.DenseReluDense.wo",
        )
    }
    # kohya: Neo numbers T5 after the CLIPs it has (te2 with CLIP-L on Flux, te1 alone on Chroma)
    kohya_t5 = "lora_te1_" if chroma else "lora_te2_"
    te[kohya_t5 + "encoder_block_0_layer_0_SelfAttention_q"] = (
        (4096, 4096),
        "transformer.encoder.block.0.layer.0.SelfAttention.q",
    )
    flux_layer = "lora_unet_double_blocks_0_img_attn_proj"  # what makes the file a Flux file
    for name, ((out, inp), module) in te.items():
        path = tmp_path / "te.safetensors"
        save_file(
            {
                name + ".lora_down.weight": torch.ones(1, inp),
                name + ".lora_up.weight": torch.ones(out, 1),
                flux_layer + ".lora_down.weight": torch.ones(1, FLUX_H),
                flux_layer + ".lora_up.weight": torch.ones(FLUX_H, 1),
            },
            str(path),
        )
        key = next(k for k in read_lora(path).layers if k.startswith("te"))
        assert neo_host.NeoHost().targets(engine, [key])[key].module is t5.get_submodule(module), name
    if chroma:  # no modulation Linears: a LoRA on them finds no module, and says so
        targets, missing = neo_host.build_targets(
            engine, "chroma", ["transformer/transformer_blocks_0_norm1_linear"]
        )
        assert targets == {} and missing == ["transformer/transformer_blocks_0_norm1_linear"]


Z, ZH = 3840, 10240


def test_zimage(nfx, tmp_path):
    with torch.device("meta"):
        dm, qwen3 = NextDiT(), Qwen3()
    engine = _meta_engine(nfx, "ZImage", dm, qwen3)
    assert neo_host.NeoHost().family(engine) == "zimage" and neo_host.NeoHost().refusal(engine) is None
    qkv = _rows("layers.29.attention.qkv", Z, Z, Z)
    groups = {
        "kohya native": {
            "lora_unet_layers_29_attention_qkv": ((3 * Z, Z), qkv),
            "lora_unet_noise_refiner_1_attention_out": ((Z, Z), [("noise_refiner.1.attention.out", None)]),
            "lora_unet_context_refiner_0_feed_forward_w2": (
                (Z, ZH),
                [("context_refiner.0.feed_forward.w2", None)],
            ),
            "lora_unet_layers_0_adaLN_modulation_0": ((4 * Z, 256), [("layers.0.adaLN_modulation.0", None)]),
            "lora_unet_x_embedder": ((Z, 64), [("x_embedder", None)]),
            "lora_unet_final_layer_adaLN_modulation_1": (
                (Z, 256),
                [("final_layer.adaLN_modulation.1", None)],
            ),
            "lora_unet_t_embedder_mlp_2": ((256, 1024), [("t_embedder.mlp.2", None)]),
        },
        "ComfyUI native": {
            "diffusion_model.layers.29.attention.qkv": ((3 * Z, Z), qkv),
            "diffusion_model.cap_embedder.1": ((Z, 2560), [("cap_embedder.1", None)]),
            "diffusion_model.final_layer.linear": ((64, Z), [("final_layer.linear", None)]),
        },
        "diffusers": {
            "transformer.layers.3.attention.to_k": ((Z, Z), [("layers.3.attention.qkv", slice(Z, 2 * Z))]),
            "transformer.layers.3.attention.to_out.0": ((Z, Z), [("layers.3.attention.out", None)]),
            "transformer.noise_refiner.0.attention.to_q": (
                (Z, Z),
                [("noise_refiner.0.attention.qkv", slice(0, Z))],
            ),
            "transformer.all_x_embedder.2-1": ((Z, 64), [("x_embedder", None)]),
            "transformer.all_final_layer.2-1.linear": ((64, Z), [("final_layer.linear", None)]),
        },
        "ComfyUI diffusers": {
            "diffusion_model.context_refiner.1.attention.to_v": (
                (Z, Z),
                [("context_refiner.1.attention.qkv", slice(2 * Z, 3 * Z))],
            ),
            "diffusion_model.layers.7.feed_forward.w3": ((ZH, Z), [("layers.7.feed_forward.w3", None)]),
        },
        "bare diffusers PEFT default": {
            "layers.0.attention.to_v": ((Z, Z), [("layers.0.attention.qkv", slice(2 * Z, 3 * Z))]),
        },
        "lycoris": {
            "lycoris_layers_2_attention_to_q": ((Z, Z), [("layers.2.attention.qkv", slice(0, Z))]),
            "lycoris_layers_2_feed_forward_w1": ((ZH, Z), [("layers.2.feed_forward.w1", None)]),
        },
    }
    _check_spellings(tmp_path, engine, dm, groups)
    _check_spellings(tmp_path, engine, dm, {"diffusers": groups["diffusers"]}, form="peft")
    name = "text_encoders.qwen3.model.layers.35.self_attn.k_proj"
    path = tmp_path / "te.safetensors"
    save_file(
        {
            name + ".lora_down.weight": torch.ones(1, 2560),
            name + ".lora_up.weight": torch.ones(1024, 1),
            "diffusion_model.layers.0.attention.out.lora_down.weight": torch.ones(1, Z),
            "diffusion_model.layers.0.attention.out.lora_up.weight": torch.ones(Z, 1),
        },
        str(path),
    )
    lora = read_lora(path)
    targets = neo_host.NeoHost().targets(engine, lora.layers)
    assert (
        targets["te_qwen3/model_layers_35_self_attn_k_proj"].module is qwen3.model.layers[35].self_attn.k_proj
    )


def test_lumina2_rows_follow_its_grouped_query_attention(nfx, tmp_path):
    """Lumina 2: qkv 2304 → 2304 | 768 | 768 (24 heads, 8 kv heads of 96); Neo's own map gives k and v 2304
    rows each."""
    with torch.device("meta"):
        dm = NextDiT(
            dim=2304, n_heads=24, n_kv_heads=8, n_layers=26, hidden=9216, z_image=False, cap_feat_dim=2304
        )
    engine = _meta_engine(nfx, "Lumina2", dm, nn.Module())
    assert neo_host.NeoHost().family(engine) == "lumina2"
    _check_spellings(
        tmp_path,
        engine,
        dm,
        {
            "diffusers": {
                "transformer.layers.25.attention.to_q": (
                    (2304, 2304),
                    [("layers.25.attention.qkv", slice(0, 2304))],
                ),
                "transformer.layers.25.attention.to_k": (
                    (768, 2304),
                    [("layers.25.attention.qkv", slice(2304, 3072))],
                ),
                "transformer.layers.25.attention.to_v": (
                    (768, 2304),
                    [("layers.25.attention.qkv", slice(3072, 3840))],
                ),
            },
            "native": {
                "diffusion_model.layers.1.attention.qkv": (
                    (3840, 2304),
                    _rows("layers.1.attention.qkv", 2304, 768, 768),
                ),
                "diffusion_model.layers.1.adaLN_modulation.1": (
                    (4 * 2304, 1024),
                    [("layers.1.adaLN_modulation.1", None)],
                ),
            },
        },
    )


Q = 3072


def test_qwen_image(nfx, tmp_path):
    with torch.device("meta"):
        dm = QwenImageTransformer2DModel()
        qwen25 = Qwen3(hidden=3584, layers=1, heads=28, kv_heads=4, mlp=18944)
    engine = _meta_engine(nfx, "QwenImage", dm, qwen25)
    assert neo_host.NeoHost().family(engine) == "qwen-image"  # not Wan, whatever its is_wan flag says
    groups = {
        "diffusers PEFT default": {
            "transformer.transformer_blocks.59.attn.to_q": (
                (Q, Q),
                [("transformer_blocks.59.attn.to_q", None)],
            ),
            "transformer.transformer_blocks.59.img_mlp.net.2": (
                (Q, 4 * Q),
                [("transformer_blocks.59.img_mlp.net.2", None)],
            ),
            "transformer.norm_out.linear": ((2 * Q, Q), [("norm_out.linear", None)]),
            "transformer.img_in": ((Q, 64), [("img_in", None)]),
        },
        "kohya": {
            "lora_unet_transformer_blocks_0_img_mlp_net_0_proj": (
                (4 * Q, Q),
                [("transformer_blocks.0.img_mlp.net.0.proj", None)],
            ),
            "lora_unet_transformer_blocks_0_attn_to_add_out": (
                (Q, Q),
                [("transformer_blocks.0.attn.to_add_out", None)],
            ),
        },
        "lycoris": {
            "lycoris_transformer_blocks_1_txt_mod_1": (
                (6 * Q, Q),
                [("transformer_blocks.1.txt_mod.1", None)],
            ),
        },
        "ComfyUI": {
            "diffusion_model.transformer_blocks.2.attn.to_out.0": (
                (Q, Q),
                [("transformer_blocks.2.attn.to_out.0", None)],
            ),
            "diffusion_model.transformer_blocks.2.txt_mlp.net.0.proj": (
                (4 * Q, Q),
                [("transformer_blocks.2.txt_mlp.net.0.proj", None)],
            ),
        },
        "bare": {
            "transformer_blocks.3.attn.add_v_proj": (
                (Q, Q),
                [("transformer_blocks.3.attn.add_v_proj", None)],
            ),
            "transformer_blocks.3.img_mod.1": ((6 * Q, Q), [("transformer_blocks.3.img_mod.1", None)]),
            "proj_out": ((64, Q), [("proj_out", None)]),
        },
        "attention only (read as Flux's names)": {
            "transformer.transformer_blocks.40.attn.to_k": (
                (Q, Q),
                [("transformer_blocks.40.attn.to_k", None)],
            ),
        },
    }
    _check_spellings(tmp_path, engine, dm, groups, form="peft")
    name = "text_encoders.qwen25_7b.model.layers.0.self_attn.v_proj"
    path = tmp_path / "te.safetensors"
    save_file(
        {
            name + ".lora_A.weight": torch.ones(1, 3584),
            name + ".lora_B.weight": torch.ones(512, 1),
            "transformer.transformer_blocks.0.img_mod.1.lora_A.weight": torch.ones(1, Q),
            "transformer.transformer_blocks.0.img_mod.1.lora_B.weight": torch.ones(6 * Q, 1),
        },
        str(path),
    )
    targets = neo_host.NeoHost().targets(engine, read_lora(path).layers)
    assert (
        targets["te_qwen25_7b/model_layers_0_self_attn_v_proj"].module
        is qwen25.model.layers[0].self_attn.v_proj
    )


W, WF = 5120, 13824


@pytest.mark.parametrize("i2v", [False, True], ids=["t2v", "i2v-2.1"])
def test_wan(nfx, tmp_path, i2v):
    with torch.device("meta"):
        dm, umt5 = WanModel(i2v=i2v), TinyT5(nn.Linear, dim=4096, blocks=24, ffn=10240)
    engine = _meta_engine(nfx, "Wan", dm, umt5)
    assert neo_host.NeoHost().family(engine) == "wan"
    groups = {
        "musubi kohya": {
            "lora_unet_blocks_39_self_attn_q": ((W, W), [("blocks.39.self_attn.q", None)]),
            "lora_unet_blocks_39_ffn_0": ((WF, W), [("blocks.39.ffn.0", None)]),
            "lora_unet_time_projection_1": ((6 * W, W), [("time_projection.1", None)]),
        },
        "ComfyUI": {
            "diffusion_model.blocks.0.cross_attn.o": ((W, W), [("blocks.0.cross_attn.o", None)]),
            "diffusion_model.blocks.2.ffn.2": ((W, WF), [("blocks.2.ffn.2", None)]),
            "diffusion_model.text_embedding.0": ((W, 4096), [("text_embedding.0", None)]),
            "diffusion_model.head.head": ((64, W), [("head.head", None)]),
        },
        "diffusers": {
            "transformer.blocks.3.attn2.to_k": ((W, W), [("blocks.3.cross_attn.k", None)]),
            "transformer.blocks.3.attn1.to_out.0": ((W, W), [("blocks.3.self_attn.o", None)]),
            "transformer.blocks.3.ffn.net.0.proj": ((WF, W), [("blocks.3.ffn.0", None)]),
            "transformer.condition_embedder.time_proj": ((6 * W, W), [("time_projection.1", None)]),
            "transformer.proj_out": ((64, W), [("head.head", None)]),
        },
    }
    if i2v:
        groups["ComfyUI I2V"] = {
            "diffusion_model.blocks.0.cross_attn.k_img": ((W, W), [("blocks.0.cross_attn.k_img", None)]),
            "diffusion_model.img_emb.proj.1": ((1280, 1280), [("img_emb.proj.1", None)]),
        }
        groups["diffusers I2V"] = {
            "transformer.blocks.0.attn2.add_v_proj": ((W, W), [("blocks.0.cross_attn.v_img", None)]),
            "transformer.condition_embedder.image_embedder.ff.net.2": ((W, 1280), [("img_emb.proj.3", None)]),
        }
    _check_spellings(tmp_path, engine, dm, groups)
    name = "text_encoders.umt5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wi_1"
    path = tmp_path / "te.safetensors"
    save_file(
        {
            name + ".lora_down.weight": torch.ones(1, 4096),
            name + ".lora_up.weight": torch.ones(10240, 1),
            "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.ones(1, W),
            "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.ones(W, 1),
        },
        str(path),
    )
    targets = neo_host.NeoHost().targets(engine, read_lora(path).layers)
    assert targets["te3/encoder_block_23_layer_1_DenseReluDense_wi_1"].module is umt5.get_submodule(
        "transformer.encoder.block.23.layer.1.DenseReluDense.wi_1"
    )
    if not i2v:  # Wan 2.2 A14B I2V has no image cross-attention: its keys find no module
        targets, missing = neo_host.build_targets(engine, "wan", ["transformer/blocks_0_attn2_add_k_proj"])
        assert missing == ["transformer/blocks_0_attn2_add_k_proj"]


# ----------------------------------------------------------------------------------------------------
# Whole generations through the doubles


def _lora(
    path: Path,
    layers: dict[str, tuple[int, int]],
    seed: int,
    std: float,
    alpha: float | None = None,
    rank: int = 2,
) -> dict[str, torch.Tensor]:
    """A LoRA with kohya suffixes (``<name>.lora_down/up.weight``) on the given file module names; returns
    each module's ΔW (alpha/rank applied)."""
    tensors, deltas = {}, {}
    for i, (name, (out, inp)) in enumerate(layers.items()):
        down = _rand(rank, inp, seed=seed + 2 * i, std=std)
        up = _rand(out, rank, seed=seed + 2 * i + 1, std=std * (1 + i % 3))
        tensors[name + ".lora_down.weight"], tensors[name + ".lora_up.weight"] = down, up
        if alpha is not None:
            tensors[name + ".alpha"] = torch.tensor(alpha)
        deltas[name] = up @ down * ((alpha or rank) / rank)
    save_file(tensors, str(path))
    return deltas


Pieces = dict[
    str, dict[str, tuple[str, slice | None, torch.Tensor]]
]  # side → canonical key → (module, rows, ΔW)


def _merged(model: nn.Module, plan, tau: float, pieces: Pieces) -> nn.Module:
    """A copy of ``model`` with the ΔW the plan chooses at ``tau`` merged in."""
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for side, keys_ in pieces.items():
            for key, (path, rows, delta) in keys_.items():
                if plan.choose(key, tau) in (side, "both"):
                    weight = merged.get_submodule(path).weight
                    (weight if rows is None else weight[rows]).add_(delta)
    return merged


def _record(nfx, calls: list, get_p) -> callable:
    """A forward-hook callback (test_forge ``_observe``) recording per model call: τ, the session's plan and
    expert, the output and the inputs."""

    def record(args, kwargs, out):
        s = nfx.session.session_of(get_p())
        inputs = ([a.detach().clone() for a in args], dict(kwargs))
        calls.append((s.clock.tau, s.setup.plan, s.setup.expert, out.detach().clone(), inputs))

    return record


def _check_calls(calls: list, oracle) -> None:
    """Every recorded call's output equals the oracle's model (``oracle(expert) → (model, pieces)``) with the
    chosen deltas merged, fed the same inputs."""
    for tau, plan, expert, out, (args, kwargs) in calls:
        model, pieces = oracle(expert)
        with torch.no_grad():
            want = _merged(model, plan, tau, pieces)(*args, **kwargs)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


D = 16  # Z-Image width here: 4 tokens of 2×2 patches of the 4-channel latent (a 32×32 image)


def _zimage(nfx, linear, seed: int = 0, name: str = "zimage-turbo"):
    torch.manual_seed(seed)
    dm = NextDiT(
        dim=D,
        n_heads=2,
        n_layers=1,
        n_refiner_layers=1,
        hidden=32,
        cap_feat_dim=12,
        in_channels=4,
        linear=linear,
    )
    qwen3 = Qwen3(hidden=12, layers=1, heads=2, kv_heads=1, head_dim=6, mlp=16, vocab=10)
    return _load(nfx, _engine("ZImage")(dm, qwen3), name), dm


def _zimage_pair(nfx) -> Pieces:
    """content in diffusers spelling (q, k, v, out, w1 of layers.0; q of noise_refiner.0), style in Neo's
    native one (the fused qkv and w1 of layers.0, out of noise_refiner.0): both decide per projection."""
    c = _lora(
        nfx.lora_dir / "dog.safetensors",
        {
            "diffusion_model.layers.0.attention.to_q": (D, D),
            "diffusion_model.layers.0.attention.to_k": (D, D),
            "diffusion_model.layers.0.attention.to_v": (D, D),
            "diffusion_model.layers.0.attention.to_out.0": (D, D),
            "diffusion_model.layers.0.feed_forward.w1": (32, D),
            "diffusion_model.noise_refiner.0.attention.to_q": (D, D),
        },
        seed=10,
        std=0.3,
        alpha=1.0,
    )
    s = _lora(
        nfx.lora_dir / "watercolor.safetensors",
        {
            "lora_unet_layers_0_attention_qkv": (3 * D, D),
            "lora_unet_layers_0_feed_forward_w1": (32, D),
            "lora_unet_noise_refiner_0_attention_out": (D, D),
        },
        seed=40,
        std=0.25,
        rank=4,
    )
    qkv, rows = "layers.0.attention.qkv", {p: slice(i * D, (i + 1) * D) for i, p in enumerate("qkv")}
    content = {
        f"transformer/layers_0_attention_to_{p}": (
            qkv,
            rows[p],
            c[f"diffusion_model.layers.0.attention.to_{p}"],
        )
        for p in "qkv"
    }
    content |= {
        "transformer/layers_0_attention_to_out_0": (
            "layers.0.attention.out",
            None,
            c["diffusion_model.layers.0.attention.to_out.0"],
        ),
        "transformer/layers_0_feed_forward_w1": (
            "layers.0.feed_forward.w1",
            None,
            c["diffusion_model.layers.0.feed_forward.w1"],
        ),
        "transformer/noise_refiner_0_attention_to_q": (
            "noise_refiner.0.attention.qkv",
            rows["q"],
            c["diffusion_model.noise_refiner.0.attention.to_q"],
        ),
    }
    fused = s["lora_unet_layers_0_attention_qkv"]
    style = {f"transformer/layers_0_attention_to_{p}": (qkv, rows[p], fused[rows[p]]) for p in "qkv"}
    style |= {
        "transformer/layers_0_feed_forward_w1": (
            "layers.0.feed_forward.w1",
            None,
            s["lora_unet_layers_0_feed_forward_w1"],
        ),
        "transformer/noise_refiner_0_attention_to_out_0": (
            "noise_refiner.0.attention.out",
            None,
            s["lora_unet_noise_refiner_0_attention_out"],
        ),
    }
    return {"content": content, "style": style}


@pytest.mark.parametrize("ops", ["ForgeOperations", "ForgeOperationsGGUF"])
def test_zimage_generation_equals_merged_per_projection_and_leaves_nothing(nfx, ops):
    import backend.operations as operations

    pieces = _zimage_pair(nfx)
    torch.manual_seed(0)
    _, dense = _zimage(nfx, operations.ForgeOperations.Linear, name="dense-twin")  # the oracle's weights
    _, dm = _zimage(nfx, getattr(operations, ops).Linear)
    before = _state(dm)
    calls: list = []
    steps = 6
    p = _processing(nfx, nfx.processing.StableDiffusionProcessingTxt2Img, _enabled(), "a dog", steps=steps)
    handle = _observe(dm, _record(nfx, calls, lambda: p))
    try:
        nfx.processing.process_images(p)
    finally:
        handle.remove()
    field = p.extra_generation_params[infotext.INFOTEXT_KEY]
    assert "pattern: s*" in field and "Z-Image default pattern s*" in field
    setup = nfx.session.session_of(p).last_setup
    assert set(setup.unet_keys) == set(pieces["content"]) | set(pieces["style"])
    assert [c[0] for c in calls] == [i / steps for i in range(steps)]
    shared_keys = set(pieces["content"]) & set(pieces["style"])
    assert {c[1].choose(k, c[0]) for c in calls for k in shared_keys} == {"content", "style"}  # they flip
    _check_calls(calls, lambda expert: (dense, pieces))
    assert _hooks_left(dm) == 0 and _same(before, _state(dm))


WAN_DIM = 16  # 4 × the latent's channels: the 2×2 patches are the tokens


def _wan(nfx, seed: int) -> tuple:
    torch.manual_seed(seed)
    dm = WanModel(dim=WAN_DIM, ffn_dim=32, num_layers=2, text_dim=12, out_dim=4)
    return _engine("Wan")(dm, TinyT5(nfx.Linear, dim=12)), dm


def _wan_pair(nfx, expert: str, seed: int) -> Pieces:
    """content (ComfyUI spelling) and style (musubi kohya) for one expert: self-attention q, o and ffn.0 of
    block 0 both, cross-attention k of block 1 content only, ffn.2 of block 1 style only."""
    c = _lora(
        nfx.lora_dir / f"dog_{expert}_noise.safetensors",
        {
            "diffusion_model.blocks.0.self_attn.q": (WAN_DIM, WAN_DIM),
            "diffusion_model.blocks.0.self_attn.o": (WAN_DIM, WAN_DIM),
            "diffusion_model.blocks.0.ffn.0": (32, WAN_DIM),
            "diffusion_model.blocks.1.cross_attn.k": (WAN_DIM, WAN_DIM),
        },
        seed=seed,
        std=0.3,
        alpha=1.0,
    )
    s = _lora(
        nfx.lora_dir / f"ink_{expert}_noise.safetensors",
        {
            "lora_unet_blocks_0_self_attn_q": (WAN_DIM, WAN_DIM),
            "lora_unet_blocks_0_self_attn_o": (WAN_DIM, WAN_DIM),
            "lora_unet_blocks_0_ffn_0": (32, WAN_DIM),
            "lora_unet_blocks_1_ffn_2": (WAN_DIM, 32),
        },
        seed=seed + 50,
        std=0.25,
        rank=4,
    )
    canonical = {
        "blocks.0.self_attn.q": "blocks_0_attn1_to_q",
        "blocks.0.self_attn.o": "blocks_0_attn1_to_out_0",
        "blocks.0.ffn.0": "blocks_0_ffn_net_0_proj",
        "blocks.1.cross_attn.k": "blocks_1_attn2_to_k",
        "blocks.1.ffn.2": "blocks_1_ffn_net_2",
    }
    content = {}
    for name, delta in c.items():
        module = name.removeprefix("diffusion_model.")
        content[f"transformer/{canonical[module]}"] = (module, None, delta)
    style = {
        f"transformer/{canonical[m]}": (m, None, s[f"lora_unet_{m.replace('.', '_')}"])
        for m in ("blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.0.ffn.0", "blocks.1.ffn.2")
    }
    return {"content": content, "style": style}


@pytest.mark.parametrize("mode", ["reload", "fast", "reload, extra networks off"])
def test_wan22_experts_each_take_their_pair_and_tau_runs_on(nfx, mode):
    """Neo's Refiner switches from the high-noise to the low-noise checkpoint mid-pass: K-LoRA continues there
    with the pair renamed by ``refiner_lora_replacement`` (high_noise → low_noise), its own plan, τ running on
    (i / N over the whole run); the infotext keeps the chosen pair and notes the expert's. Modes: a new model
    loaded (Forge's switch), its weights loaded into the same modules (``refiner_fast_sd``), and a switch the
    extra networks do not announce."""
    from modules.processing_scripts.refiner import ScriptRefiner

    high_pieces, low_pieces = _wan_pair(nfx, "high", 100), _wan_pair(nfx, "low", 300)
    refiner, low = _wan(nfx, 2)
    refiner_title = _register(nfx, refiner, "wan22_low")
    engine, high = _wan(nfx, 1)
    _load(nfx, engine, "wan22_high")
    high0, low0 = copy.deepcopy(high), copy.deepcopy(low)
    before_high, before_low = _state(high), _state(low)
    nfx.shared.opts.refiner_fast_sd = mode == "fast"
    calls: list = []
    steps = 6
    p = _processing(
        nfx,
        nfx.processing.StableDiffusionProcessingTxt2Img,
        _enabled(content="dog_high_noise", style="ink_high_noise"),
        "a dog",
        steps=steps,
        refiner_checkpoint=refiner_title,
        refiner_switch_at=0.5,
    )
    p.disable_extra_networks = mode.endswith("off")
    p.scripts.scripts.append(ScriptRefiner())
    handles = [_observe(dm, _record(nfx, calls, lambda: p)) for dm in (high, low)]
    try:
        nfx.processing.process_images(p)
    finally:
        for handle in handles:
            handle.remove()
    expert = refiner.sd_checkpoint_info.short_title
    assert [c[0] for c in calls] == [i / steps for i in range(steps)]
    assert [c[2] for c in calls] == [None] * 3 + [expert] * 3
    _check_calls(calls, lambda on: (high0, high_pieces) if on is None else (low0, low_pieces))
    field = p.extra_generation_params[infotext.INFOTEXT_KEY]
    assert "content: dog_high_noise, style: ink_high_noise" in field and "Wan default pattern s*" in field
    assert f"on {expert}: content dog_low_noise, style ink_low_noise" in field
    assert infotext.WARNING_KEY not in p.extra_generation_params
    assert nfx.samplers.ORIGINAL_CHECKPOINT is None  # the fast switch was undone by ScriptRefiner.postprocess
    assert _hooks_left(high, low) == 0
    assert _same(before_high, _state(high)) and _same(before_low, _state(low))


def test_a_refiner_of_another_family_ends_klora_with_a_note(nfx):
    """Only Wan's experts continue; on any other refiner K-LoRA stops at the switch (the LoRAs were chosen for
    the base model), as on A1111 and Forge."""
    import backend.operations as operations

    _zimage_pair(nfx)
    refiner, dm2 = _zimage(nfx, operations.ForgeOperations.Linear, seed=5, name="other")
    _, dm = _zimage(nfx, operations.ForgeOperations.Linear)
    applied = []

    def on_call(args, kwargs, out):
        applied.append(_hooks_left(dm, dm2) > 2)  # more than the two observers

    p = _processing(
        nfx,
        nfx.processing.StableDiffusionProcessingTxt2Img,
        _enabled(),
        "a dog",
        steps=4,
        refiner_checkpoint=refiner.sd_checkpoint_info.title,
        refiner_switch_at=0.5,
    )
    handles = [_observe(m, on_call) for m in (dm, dm2)]
    try:
        nfx.processing.process_images(p)
    finally:
        for handle in handles:
            handle.remove()
    assert applied == [True, True, False, False]
    assert (
        f"not applied on {refiner.sd_checkpoint_info.short_title}"
        in p.extra_generation_params[infotext.INFOTEXT_KEY]
    )
    assert _hooks_left(dm, dm2) == 0


@pytest.mark.parametrize("case", ["nunchaku", "anima"])
def test_refused_models_make_the_image_without_klora_and_say_why(nfx, case):
    import backend.operations as operations

    _zimage_pair(nfx)
    if case == "nunchaku":
        engine, dm = _zimage(nfx, operations.ForgeOperations.Linear)
        engine.model_config.nunchaku = (
            True  # backend/diffusion_engine/base.py: BASE pops unet_config["nunchaku"]
        )
        expected = "Nunchaku (SVDQuant)"
    else:
        torch.manual_seed(0)
        dm = NextDiT(
            dim=D, n_heads=2, n_layers=1, n_refiner_layers=1, hidden=32, cap_feat_dim=12, in_channels=4
        )
        _load(nfx, _engine("Anima")(dm, TinyT5(nfx.Linear, dim=12)), "anima")
        expected = "does not support this model on Forge Neo yet (Anima)"
    before = _state(dm)
    hooked = []
    p = _processing(nfx, nfx.processing.StableDiffusionProcessingTxt2Img, _enabled(), "a dog", steps=2)
    handle = _observe(dm, lambda args, kwargs, out: hooked.append(_hooks_left(dm) - 1))  # but the observer
    try:
        nfx.processing.process_images(p)
    finally:
        handle.remove()
    assert hooked == [0, 0] and _same(before, _state(dm))
    assert infotext.INFOTEXT_KEY not in p.extra_generation_params
    warning = p.extra_generation_params[infotext.WARNING_KEY]
    assert expected in warning and "The image was made without K-LoRA." in warning


def test_nunchaku_is_told_by_its_model_class_too(nfx):
    class NunchakuZImage2DModel(nn.Module):  # backend/nn/svdq.py: the class a Nunchaku Z-Image is turned into
        loras: list = []  # noqa: RUF012

    engine = _engine("ZImage")(NunchakuZImage2DModel(), nn.Module())
    assert neo_host.nunchaku(engine) and "Nunchaku" in neo_host.NeoHost().refusal(engine)


def test_refiner_lora_replacement_follows_neos_option():
    assert neo_host.refiner_names("dog_high_noise_v2", "high_noise=low_noise") == "dog_low_noise_v2"
    assert neo_host.refiner_names("dog", "high_noise=low_noise") == "dog"  # one LoRA for both experts
    assert neo_host.refiner_names("HN-dog", "HN=LN\nbad line\n=x\nv1 = v2") == "LN-dog"


def test_warnings_reach_the_console_when_the_root_logger_is_at_error(nfx):
    """Neo sets the root logger to ERROR (modules/logging_config.py): K-LoRA's own logger lets warnings
    through to the root's handlers."""
    import logging

    from klora.webui.extension import make_warnings_visible

    logger = logging.getLogger("klora.test-neo")
    root = logging.getLogger()
    level = root.level
    try:
        root.setLevel(logging.ERROR)
        assert not logger.isEnabledFor(logging.WARNING)
        make_warnings_visible(logger)
        assert logger.isEnabledFor(logging.WARNING)
    finally:
        root.setLevel(level)
        logger.setLevel(logging.NOTSET)
