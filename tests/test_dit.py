"""The DiT families named by a table (Z-Image / Lumina 2, Qwen-Image, Wan; :mod:`klora.keys.dit`) and their
file spellings (:mod:`klora.formats.dit`): every spelling Forge Neo's loader maps reads into the same
canonical keys, fused native layers split exactly into their projections, files are claimed by the right
scheme, and the canonical keys come back to the native modules and rows.

Widths are small here; the exact Neo module trees (names and shapes at full size) are built in
``tests/test_neo.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from synth import write_tensors

from klora import formats, keys
from klora.delta import dense_delta
from klora.formats import read_lora
from klora.keys import flux as flux_keys
from klora.keys.dit import NativeSite
from klora.keys.qwen import QWEN_IMAGE
from klora.keys.wan import WAN
from klora.keys.zimage import NEXTDIT
from klora.layers import LoraFormatError

# the LoRA tensor forms: kohya/ComfyUI (lora_down/lora_up/alpha), PEFT, PEFT with a named adapter
FORMS = {
    "kohya": (".lora_down.weight", ".lora_up.weight"),
    "peft": (".lora_A.weight", ".lora_B.weight"),
    "peft_default": (".lora_A.default.weight", ".lora_B.default.weight"),
}


def _write(path: Path, modules: dict[str, tuple[int, int]], form: str = "kohya", rank: int = 2,
           seed: int = 0, alpha: float | None = 1.0) -> Path:
    """One LoRA layer per file module name (its spelling exactly as given), shape (out, in)."""
    gen = torch.Generator().manual_seed(seed)
    down_suffix, up_suffix = FORMS[form]
    tensors: dict[str, torch.Tensor] = {}
    for name, (out, inp) in modules.items():
        tensors[name + down_suffix] = torch.randn(rank, inp, generator=gen)
        tensors[name + up_suffix] = torch.randn(out, rank, generator=gen)
        if alpha is not None and form == "kohya":
            tensors[name + ".alpha"] = torch.tensor(alpha)
    return write_tensors(path, tensors)


def _scheme_of(path: Path) -> str:
    from klora.formats import container

    header, _, _ = container.parse_header(str(path), container.read_bytes(path))
    shapes = {k: v["shape"] for k, v in header.items()}
    return next(s for s in formats.SCHEMES if s.claims(shapes)).name


# ----------------------------------------------------------------------------------------------------
# Z-Image / Lumina 2

D = 8  # dim; Z-Image: q, k, v of D rows each in the fused qkv

ZIMAGE_SPELLINGS = {
    # name → (file module names, the canonical keys they give)
    "kohya native": ("lora_unet_layers_0_attention_qkv", "lora_unet_layers_0_attention_out"),
    "ComfyUI native": ("diffusion_model.layers.0.attention.qkv", "diffusion_model.layers.0.attention.out"),
    "bare native": ("layers.0.attention.qkv", "layers.0.attention.out"),
    "kohya double underscore": ("lora_unet__layers_0_attention_qkv", "lora_unet__layers_0_attention_out"),
}
ZIMAGE_DIFFUSERS = {
    "diffusion_model. diffusers": "diffusion_model.layers.0.attention.{}",
    "transformer. diffusers": "transformer.layers.0.attention.{}",
    "bare diffusers": "layers.0.attention.{}",
    "lycoris": "lycoris_layers_0_attention_{}",
    "peft base_model": "base_model.model.layers.0.attention.{}",
}
ZIMAGE_KEYS = ["transformer/layers_0_attention_to_q", "transformer/layers_0_attention_to_k",
               "transformer/layers_0_attention_to_v", "transformer/layers_0_attention_to_out_0"]


@pytest.mark.parametrize("spelling", ZIMAGE_SPELLINGS)
def test_zimage_native_spellings_split_the_fused_qkv_exactly(tmp_path, spelling):
    qkv, out = ZIMAGE_SPELLINGS[spelling]
    path = _write(tmp_path / "z.safetensors", {qkv: (3 * D, D), out: (D, D)}, seed=3)
    assert _scheme_of(path) == "zimage"
    lora = read_lora(path)
    assert list(lora.layers) == ZIMAGE_KEYS  # forward order: q, k, v, out
    fused = read_lora(_write(tmp_path / "ref.safetensors", {"x.qkv": (3 * D, D)}, seed=3))  # same tensors
    whole = dense_delta(fused.layers["unet/x_qkv"], 1.0)
    for i, key in enumerate(ZIMAGE_KEYS[:3]):
        layer = lora.layers[key]
        assert layer.shape == (D, D) and layer.rank == 2 and layer.alpha == 1.0
        torch.testing.assert_close(dense_delta(layer, 1.0), whole[i * D:(i + 1) * D], rtol=0, atol=0)


@pytest.mark.parametrize("spelling", ZIMAGE_DIFFUSERS)
@pytest.mark.parametrize("form", FORMS)
def test_zimage_diffusers_spellings(tmp_path, spelling, form):
    pattern = ZIMAGE_DIFFUSERS[spelling]
    names = {pattern.format(p): (D, D) for p in ("to_q", "to_k", "to_v")}
    names[pattern.format("to_out.0" if "." in pattern else "to_out_0")] = (D, D)
    path = _write(tmp_path / "z.safetensors", names, form)
    assert _scheme_of(path) == "zimage"
    assert list(read_lora(path).layers) == ZIMAGE_KEYS


def test_zimage_blocks_top_level_and_order(tmp_path):
    names = {
        "diffusion_model.layers.1.feed_forward.w2": (D, 4 * D),
        "diffusion_model.layers.1.feed_forward.w1": (4 * D, D),
        "diffusion_model.layers.1.adaLN_modulation.0": (4 * D, 4),
        "diffusion_model.noise_refiner.0.attention.out": (D, D),
        "diffusion_model.context_refiner.1.feed_forward.w3": (4 * D, D),
        "diffusion_model.x_embedder": (D, 16),
        "diffusion_model.final_layer.linear": (16, D),
        "diffusion_model.cap_embedder.1": (D, 12),
    }
    lora = read_lora(_write(tmp_path / "z.safetensors", names))
    assert list(lora.layers) == [
        "transformer/cap_embedder_1", "transformer/all_x_embedder_2-1",
        "transformer/context_refiner_1_feed_forward_w3", "transformer/noise_refiner_0_attention_to_out_0",
        "transformer/layers_1_adaLN_modulation_0", "transformer/layers_1_feed_forward_w1",
        "transformer/layers_1_feed_forward_w2", "transformer/all_final_layer_2-1_linear"]


def test_lumina2_gqa_rows_follow_the_module_not_the_width():
    """Lumina 2: dim 2304, 24 heads, 8 kv heads of 96 → qkv 3840 rows = 2304 | 768 | 768 (Neo's own map gives
    k and v 2304 rows each, past the end of the weight)."""
    assert NEXTDIT.children("layers_3_attention_qkv", 3840, 2304) == [
        ("layers_3_attention_to_q", 2304), ("layers_3_attention_to_k", 768), ("layers_3_attention_to_v", 768)]
    assert [NEXTDIT.rows(i, 3840, 2304) for i in range(3)] == [slice(0, 2304), slice(2304, 3072),
                                                               slice(3072, 3840)]
    assert [NEXTDIT.rows(i, 11520, 3840) for i in range(3)] == [slice(0, 3840), slice(3840, 7680),
                                                                slice(7680, 11520)]
    with pytest.raises(ValueError, match="does not split"):
        NEXTDIT.children("layers_0_attention_qkv", 3 * D + 1, D)


def test_a_fused_qkv_that_does_not_split_is_refused_with_the_file(tmp_path):
    path = _write(tmp_path / "z.safetensors", {"diffusion_model.layers.0.attention.qkv": (3 * D + 1, D)})
    with pytest.raises(LoraFormatError, match="does not split"):
        read_lora(path)


def test_native_sites_of_canonical_keys():
    assert NEXTDIT.native("layers_0_attention_to_k") == NativeSite("layers_0_attention_qkv", 1)
    assert NEXTDIT.native("context_refiner_1_attention_to_out_0") == NativeSite(
        "context_refiner_1_attention_out")
    assert NEXTDIT.native("all_x_embedder_2-1") == NativeSite("x_embedder")
    assert NEXTDIT.native("layers_0_attention_q_norm") is None
    assert WAN.native("blocks_7_attn2_add_v_proj") == NativeSite("blocks_7_cross_attn_v_img")
    assert WAN.native("blocks_7_ffn_net_0_proj") == NativeSite("blocks_7_ffn_0")
    assert WAN.native("proj_out") == NativeSite("head_head")
    assert QWEN_IMAGE.native("transformer_blocks_59_img_mlp_net_2") == NativeSite(
        "transformer_blocks_59_img_mlp_net_2")


# ----------------------------------------------------------------------------------------------------
# Wan

WAN_SPELLINGS = {
    "musubi kohya": "lora_unet_blocks_{i}_{sub}",
    "ComfyUI": "diffusion_model.blocks.{i}.{dotted}",
    "ComfyUI full prefix": "model.diffusion_model.blocks.{i}.{dotted}",
    "bare": "blocks.{i}.{dotted}",
}
WAN_NATIVE = {"self_attn_q": "attn1_to_q", "self_attn_o": "attn1_to_out_0", "cross_attn_k": "attn2_to_k",
              "cross_attn_k_img": "attn2_add_k_proj", "ffn_0": "ffn_net_0_proj", "ffn_2": "ffn_net_2"}


def _dotted_wan(sub: str) -> str:
    for head in ("self_attn_", "cross_attn_", "ffn_"):
        if sub.startswith(head):
            return head[:-1] + "." + sub[len(head):]
    raise AssertionError(sub)


@pytest.mark.parametrize("spelling", WAN_SPELLINGS)
def test_wan_native_spellings(tmp_path, spelling):
    pattern = WAN_SPELLINGS[spelling]
    names = {pattern.format(i=2, sub=sub, dotted=_dotted_wan(sub)): (D, D) for sub in WAN_NATIVE}
    path = _write(tmp_path / "w.safetensors", names)
    assert _scheme_of(path) == "wan"
    assert set(read_lora(path).layers) == {f"transformer/blocks_2_{c}" for c in WAN_NATIVE.values()}


@pytest.mark.parametrize("form", ["peft", "peft_default"])
def test_wan_diffusers_spelling_and_order(tmp_path, form):
    modules = ("ffn.net.2", "attn2.to_out.0", "attn1.to_q", "attn2.add_v_proj", "attn1.to_out.0")
    names = {f"transformer.blocks.0.{m}": (D, D) for m in modules}
    names["transformer.condition_embedder.time_proj"] = (6 * D, D)
    names["transformer.proj_out"] = (4, D)
    lora = read_lora(_write(tmp_path / "w.safetensors", names, form))
    assert list(lora.layers) == [
        "transformer/condition_embedder_time_proj", "transformer/blocks_0_attn1_to_q",
        "transformer/blocks_0_attn1_to_out_0", "transformer/blocks_0_attn2_add_v_proj",
        "transformer/blocks_0_attn2_to_out_0", "transformer/blocks_0_ffn_net_2", "transformer/proj_out"]


def test_unknown_module_of_a_claimed_family_is_refused_with_its_name(tmp_path):
    names = {"diffusion_model.blocks.0.self_attn.q": (D, D), "diffusion_model.blocks.0.norm3": (D, D)}
    with pytest.raises(LoraFormatError, match="norm3"):
        read_lora(_write(tmp_path / "w.safetensors", names))


# ----------------------------------------------------------------------------------------------------
# Qwen-Image (diffusers names = Neo's names) and the overlap with Flux

QWEN_SPELLINGS = {
    "diffusers": "transformer.transformer_blocks.{i}.{m}",
    "bare": "transformer_blocks.{i}.{m}",
    "ComfyUI": "diffusion_model.transformer_blocks.{i}.{m}",
    "kohya": "lora_unet_transformer_blocks_{i}_{flat}",
    "lycoris": "lycoris_transformer_blocks_{i}_{flat}",
}
QWEN_MODULES = ("attn.to_q", "attn.add_k_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
                "txt_mod.1")


@pytest.mark.parametrize("spelling", QWEN_SPELLINGS)
@pytest.mark.parametrize("form", FORMS)
def test_qwen_image_spellings(tmp_path, spelling, form):
    pattern = QWEN_SPELLINGS[spelling]
    names = {pattern.format(i=40, m=m, flat=m.replace(".", "_")): (D, D) for m in QWEN_MODULES}
    path = _write(tmp_path / "q.safetensors", names, form)
    assert _scheme_of(path) == "qwen-image"
    assert list(read_lora(path).layers) == [
        "transformer/transformer_blocks_40_txt_mod_1", "transformer/transformer_blocks_40_attn_to_q",
        "transformer/transformer_blocks_40_attn_add_k_proj",
        "transformer/transformer_blocks_40_attn_to_out_0",
        "transformer/transformer_blocks_40_attn_to_add_out",
        "transformer/transformer_blocks_40_img_mlp_net_0_proj"]


def test_an_attention_only_qwen_image_file_reads_as_flux_with_the_same_keys(tmp_path):
    """Qwen-Image's attention names are diffusers' Flux names: without MLP/modulation layers the Flux scheme
    reads the file (width 3072 is its evidence), and the keys are the ones the Qwen scheme would give."""
    names = {f"transformer.transformer_blocks.30.attn.{p}": (3072, 3072) for p in ("to_q", "to_k", "to_v")}
    path = _write(tmp_path / "q.safetensors", names, "peft", rank=1)
    assert _scheme_of(path) == "flux"
    assert list(read_lora(path).layers) == [f"transformer/transformer_blocks_30_attn_{p}"
                                            for p in ("to_q", "to_k", "to_v")]
    mixed = dict(names, **{"transformer.transformer_blocks.30.img_mlp.net.2": (3072, 64)})
    path = _write(tmp_path / "q2.safetensors", mixed, "peft", rank=1)
    assert _scheme_of(path) == "qwen-image"
    assert set(read_lora(path).layers) >= {f"transformer/transformer_blocks_30_attn_{p}"
                                           for p in ("to_q", "to_k", "to_v")}


@pytest.mark.parametrize("names", [
    {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (D, D)},  # SD kohya
    {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (D, D)},  # SDXL kohya (SGM)
    {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (D, D)},  # SD PEFT
    {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (D, D)},  # SD text encoder
    {"transformer.single_transformer_blocks.0.attn.to_q": (D, D)},  # Flux diffusers
    {"lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D)},  # Flux kohya
    {"transformer.transformer_blocks.0.ff.net.0.proj": (4 * D, D)},  # Flux diffusers MLP
])
def test_no_dit_scheme_claims_sd_or_flux_files(tmp_path, names):
    assert _scheme_of(_write(tmp_path / "f.safetensors", names)) in ("sd", "flux")


# ----------------------------------------------------------------------------------------------------
# Text encoders in ComfyUI's / Neo's spelling, and the Flux spellings Neo adds


def test_comfyui_text_encoder_spelling(tmp_path):
    names = {
        "diffusion_model.layers.0.attention.out": (D, D),
        "text_encoders.qwen3.model.layers.1.self_attn.q_proj": (D, D),
        "text_encoders.qwen3.model.layers.0.mlp.down_proj": (D, 3 * D),
    }
    lora = read_lora(_write(tmp_path / "z.safetensors", names))
    assert list(lora.layers) == ["te_qwen3/model_layers_0_mlp_down_proj",
                                 "te_qwen3/model_layers_1_self_attn_q_proj",
                                 "transformer/layers_0_attention_to_out_0"]
    assert all(keys.is_text_encoder(k) for k in list(lora.layers)[:2])
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in": (D, D),
          "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": (D, D)}
    sd_lora = read_lora(_write(tmp_path / "s.safetensors", sd))
    assert "te1/text_model_encoder_layers_0_self_attn_q_proj" in sd_lora.layers
    wan = {"diffusion_model.blocks.0.self_attn.q": (D, D),
           "text_encoders.umt5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q": (D, D)}
    wan_lora = read_lora(_write(tmp_path / "w.safetensors", wan))
    assert "te3/encoder_block_0_layer_0_SelfAttention_q" in wan_lora.layers


def test_neo_flux_spellings(tmp_path):
    """``single_blocks.N.linear1_qkv`` (the q, k, v rows of linear1 only) and Chroma's T5 under ``lora_te1_``
    (Neo numbers Chroma's only text encoder first)."""
    h = 16
    names = {"diffusion_model.single_blocks.0.linear1_qkv": (3 * h, h),
             "lora_te1_encoder_block_0_layer_0_SelfAttention_q": (D, D),
             "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (D, D)}
    lora = read_lora(_write(tmp_path / "f.safetensors", names))
    assert set(lora.layers) == {f"transformer/single_transformer_blocks_0_attn_to_{p}" for p in "qkv"} | {
        "te3/encoder_block_0_layer_0_SelfAttention_q", "te1/text_model_encoder_layers_0_self_attn_q_proj"}
    assert flux_keys.bfl_target("transformer/single_transformer_blocks_0_attn_to_v", h, 4 * h).rows == slice(
        2 * h, 3 * h)


def test_attention_scope_names_every_family():
    for key in ("transformer/layers_0_attention_to_q", "transformer/noise_refiner_1_attention_to_out_0",
                "transformer/blocks_3_attn1_to_v", "transformer/blocks_3_attn2_to_out_0",
                "transformer/transformer_blocks_9_attn_to_k"):
        assert keys.is_attention(key), key
    for key in ("transformer/layers_0_feed_forward_w1", "transformer/blocks_3_attn2_add_k_proj",
                "transformer/transformer_blocks_9_attn_add_q_proj", "transformer/blocks_3_ffn_net_0_proj",
                "te_qwen3/model_layers_0_self_attn_q_proj"):
        assert not keys.is_attention(key), key


def test_the_map_names_the_dit_blocks():
    from klora import viz

    assert [viz.block_of("transformer/" + k) for k in (
        "context_refiner_0_attention_to_q", "noise_refiner_1_feed_forward_w1", "layers_29_attention_to_out_0",
        "all_final_layer_2-1_linear", "all_x_embedder_2-1", "blocks_3_attn2_to_k", "proj_out",
        "transformer_blocks_40_img_mlp_net_2")] == [
        "context refiner", "noise refiner", "layers", "out", "in", "blocks", "out", "double"]
