"""klora.formats.read_lora on real safetensors files in tmp_path: every naming, every kind, every refusal."""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from synth import (
    kohya_name,
    sd15_unet_shapes,
    sdxl_unet_shapes,
    select,
    te_layer_shapes,
    write_diffusers_old,
    write_full,
    write_kohya,
    write_loha,
    write_lokr,
    write_peft,
    write_tensors,
)

from klora.diskcache import FileIndex
from klora.formats import container, read_lora
from klora.keys import layer_order
from klora.layers import LoraFile, LoraFormatError

SD = sd15_unet_shapes()
XL = sdxl_unet_shapes()
# A small SD1.5 table with every module type: linear attention, 1×1 proj conv, 3×3 convs, shortcut, emb.
SD_MIX = {k: SD[k] for k in (
    "unet/down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "unet/down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "unet/down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
    "unet/down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "unet/down_blocks_0_attentions_0_proj_in",
    "unet/down_blocks_0_resnets_0_conv1",
    "unet/down_blocks_0_resnets_0_time_emb_proj",
    "unet/down_blocks_0_downsamplers_0_conv",
    "unet/down_blocks_1_resnets_0_conv_shortcut",
    "unet/mid_block_attentions_0_transformer_blocks_0_attn2_to_v",
    "unet/mid_block_resnets_1_conv2",
    "unet/up_blocks_0_upsamplers_0_conv",
    "unet/up_blocks_1_upsamplers_0_conv",
    "unet/up_blocks_3_attentions_2_proj_out",
)}
TE1 = select(te_layer_shapes("te1"), limit=6)
TE2 = select(te_layer_shapes("te2", 1280, 32, 5120), limit=6)
XL_MIX = {k: XL[k] for k in (
    "unet/down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q",
    "unet/down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_k",
    "unet/mid_block_attentions_0_proj_in",
    "unet/mid_block_resnets_0_conv1",
    "unet/up_blocks_0_upsamplers_0_conv",
    "unet/up_blocks_0_attentions_2_transformer_blocks_3_ff_net_2",
    "unet/up_blocks_2_resnets_2_conv_shortcut",
    "unet/down_blocks_0_downsamplers_0_conv",
)}


def _raw(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


# ---------------------------------------------------------------------------------------------- kohya


def test_kohya_sd15_diffusers_names(tmp_path: Path) -> None:
    shapes = {**SD_MIX, **TE1}
    p = write_kohya(tmp_path / "sd.safetensors", shapes, rank=4, alpha=2, seed=3)
    lf = read_lora(p)
    assert isinstance(lf, LoraFile)
    assert list(lf.layers) == sorted(shapes, key=layer_order)  # forward-pass order, not the file's
    raw = _raw(p)
    for key, layer in lf.layers.items():
        assert layer.kind == "lora"
        assert layer.shape == shapes[key]
        assert layer.rank == 4 and layer.alpha == 2.0 and layer.scale == 0.5
        assert layer.file_key == kohya_name(key)
        assert torch.equal(layer.tensors["down"], raw[layer.file_key + ".lora_down.weight"])
        assert torch.equal(layer.tensors["up"], raw[layer.file_key + ".lora_up.weight"])
    q = lf.layers["unet/down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    assert q.file_key == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert lf.layers["te1/text_model_encoder_layers_0_self_attn_q_proj"].file_key == \
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert lf.layers["unet/down_blocks_0_resnets_0_conv1"].tensors["down"].shape == (4, 320, 3, 3)
    assert lf.name == "sd" and lf.path == str(p)
    assert lf.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert lf.metadata["ss_network_dim"] == "4"


def test_kohya_sdxl_sgm_names_give_the_same_layers(tmp_path: Path) -> None:
    shapes = {**XL_MIX, **TE1, **TE2}
    a = read_lora(write_kohya(tmp_path / "sgm.safetensors", shapes, rank=8, alpha=8, seed=1, naming="sgm"))
    b = read_lora(write_kohya(tmp_path / "dif.safetensors", shapes, rank=8, alpha=8, seed=1))
    assert list(a.layers) == list(b.layers) == sorted(shapes, key=layer_order)
    for key in shapes:
        assert a.layers[key].shape == shapes[key]
        for role in ("down", "up"):
            assert torch.equal(a.layers[key].tensors[role], b.layers[key].tensors[role])
    assert a.layers["unet/down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"].file_key == \
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"
    assert a.layers["unet/up_blocks_0_upsamplers_0_conv"].file_key == "lora_unet_output_blocks_2_2_conv"
    assert a.layers["unet/up_blocks_2_resnets_2_conv_shortcut"].file_key == \
        "lora_unet_output_blocks_8_0_skip_connection"
    assert a.layers["te1/text_model_encoder_layers_0_self_attn_q_proj"].file_key.startswith("lora_te1_")
    assert a.layers["te2/text_model_encoder_layers_0_self_attn_q_proj"].file_key.startswith("lora_te2_")
    assert a.sha256 != b.sha256


def test_sd15_sgm_upsampler_without_attention(tmp_path: Path) -> None:
    keys = ("unet/up_blocks_0_upsamplers_0_conv", "unet/up_blocks_1_upsamplers_0_conv",
            "unet/up_blocks_3_attentions_2_proj_out")
    shapes = {k: SD_MIX[k] for k in keys}
    lf = read_lora(write_kohya(tmp_path / "a.safetensors", shapes, naming="sgm", up_attention={1, 2, 3}))
    assert {k: v.file_key for k, v in lf.layers.items()} == {
        "unet/up_blocks_0_upsamplers_0_conv": "lora_unet_output_blocks_2_1_conv",
        "unet/up_blocks_1_upsamplers_0_conv": "lora_unet_output_blocks_5_2_conv",
        "unet/up_blocks_3_attentions_2_proj_out": "lora_unet_output_blocks_11_1_proj_out",
    }


def test_kohya_alpha_missing_zero_and_per_layer(tmp_path: Path) -> None:
    keys = list(SD_MIX)
    alphas = {keys[0]: None, keys[1]: 0.0, keys[2]: 1.0}
    p = write_kohya(tmp_path / "a.safetensors", {k: SD_MIX[k] for k in keys[:3]}, rank=lambda k: 16,
                    alpha=lambda k: alphas[k])
    lf = read_lora(p)
    assert lf.layers[keys[0]].alpha is None and lf.layers[keys[0]].scale == 1.0
    assert lf.layers[keys[1]].alpha == 0.0 and lf.layers[keys[1]].scale == 1.0  # kohya: alpha 0 = alpha r
    assert lf.layers[keys[2]].scale == 1.0 / 16
    assert all(v.rank == 16 for v in lf.layers.values())


def test_locon_tucker_mid(tmp_path: Path) -> None:
    lf = read_lora(write_kohya(tmp_path / "t.safetensors", SD_MIX, rank=4, tucker=True))
    conv = lf.layers["unet/mid_block_resnets_1_conv2"]
    assert conv.shape == (1280, 1280, 3, 3)
    assert conv.tensors["down"].shape == (4, 1280, 1, 1)
    assert conv.tensors["mid"].shape == (4, 4, 3, 3)
    assert conv.tensors["up"].shape == (1280, 4, 1, 1)
    assert "mid" not in lf.layers["unet/down_blocks_0_attentions_0_proj_in"].tensors  # 1×1: no Tucker


def test_file_dtype_is_kept(tmp_path: Path) -> None:
    lf = read_lora(write_kohya(tmp_path / "h.safetensors", SD_MIX, dtype=torch.float16, alpha=4))
    assert all(t.dtype == torch.float16 for layer in lf.layers.values() for t in layer.tensors.values())
    assert all(layer.alpha == 4.0 for layer in lf.layers.values())


# ------------------------------------------------------------------------------------------ diffusers


@pytest.mark.parametrize("prefix", ["unet.unet.", "unet.", ""])
@pytest.mark.parametrize("processor", [False, True])
def test_diffusers_old_format(tmp_path: Path, prefix: str, processor: bool) -> None:
    shapes = {**SD_MIX, **TE1}
    p = write_diffusers_old(tmp_path / "d.safetensors", shapes, rank=4, prefix=prefix, processor=processor)
    lf = read_lora(p)
    assert set(lf.layers) == set(shapes)
    raw = _raw(p)
    for key, layer in lf.layers.items():
        assert layer.shape == shapes[key] and layer.rank == 4 and layer.alpha is None and layer.scale == 1.0
        names = [layer.file_key + s
                 for s in (".lora.down.weight", ".lora_linear_layer.down.weight", ".down.weight")]
        assert torch.equal(layer.tensors["down"], raw[next(n for n in names if n in raw)])
    q = lf.layers["unet/down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    out = lf.layers["unet/down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"]
    if processor:
        attn = f"{prefix}down_blocks.0.attentions.0.transformer_blocks.0.attn1"
        assert q.file_key == f"{attn}.processor.to_q_lora"
        assert out.file_key.endswith("attn1.processor.to_out_lora")
    else:
        assert q.file_key == f"{prefix}down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert lf.layers["te1/text_model_encoder_layers_0_self_attn_q_proj"].file_key == \
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"


def test_text_encoder_processor_form(tmp_path: Path) -> None:
    t = {"text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.down.weight": torch.randn(2, 8),
         "text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight": torch.randn(8, 2)}
    lf = read_lora(write_tensors(tmp_path / "x.safetensors", t))
    assert list(lf.layers) == ["te1/text_model_encoder_layers_0_self_attn_out_proj"]


def test_peft_without_metadata_alpha_is_rank(tmp_path: Path) -> None:
    shapes = {**SD_MIX, **TE1, **TE2}
    p = write_peft(tmp_path / "p.safetensors", shapes, rank=8)
    lf = read_lora(p)
    assert set(lf.layers) == set(shapes)
    assert all(v.alpha is None and v.scale == 1.0 and v.rank == 8 for v in lf.layers.values())
    raw = _raw(p)
    te2 = lf.layers["te2/text_model_encoder_layers_0_self_attn_q_proj"]
    assert te2.file_key == "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    assert torch.equal(te2.tensors["up"], raw[te2.file_key + ".lora_B.weight"])
    assert lf.layers["unet/down_blocks_0_resnets_0_conv1"].shape == (320, 320, 3, 3)


def test_peft_metadata_alpha_prefixed_per_component(tmp_path: Path) -> None:
    shapes = {**SD_MIX, **TE1}
    meta = {"unet.lora_alpha": 4, "unet.r": 8, "text_encoder.lora_alpha": 16, "text_encoder.r": 8,
            "unet.alpha_pattern": {"down_blocks.0.attentions.0.proj_in": 2, "attn2.to_k": 1}}
    lf = read_lora(write_peft(tmp_path / "p.safetensors", shapes, rank=8, metadata_alpha=meta))
    assert lf.layers["unet/down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].scale == 0.5
    assert lf.layers["unet/down_blocks_0_attentions_0_proj_in"].scale == 2 / 8
    assert lf.layers["unet/down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"].scale == 1 / 8
    assert lf.layers["unet/mid_block_attentions_0_transformer_blocks_0_attn2_to_v"].scale == 0.5
    assert lf.layers["te1/text_model_encoder_layers_0_self_attn_q_proj"].scale == 2.0


def test_peft_metadata_number_unprefixed_and_rslora(tmp_path: Path) -> None:
    shapes = dict(list(SD_MIX.items())[:3])
    lf = read_lora(write_peft(tmp_path / "a.safetensors", shapes, rank=4, metadata_alpha=8))
    assert {v.scale for v in lf.layers.values()} == {2.0}
    lf = read_lora(write_peft(tmp_path / "b.safetensors", shapes, rank=4,
                              metadata_alpha={"lora_alpha": 8, "r": 4, "use_rslora": True}))
    assert all(math.isclose(v.scale, 8 / math.sqrt(4)) for v in lf.layers.values())


@pytest.mark.parametrize("meta", [
    {"unet.lora_alpha": "eight"},
    {"unet.lora_alpha": {"value": 8}},
    {"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_(k": 4}},  # not a regular expression
    {"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": [4]}},
    {"unet.lora_alpha": float("nan")},
])
def test_peft_metadata_bad_values_are_clear_errors(tmp_path: Path, meta: dict) -> None:
    shapes = dict(list(SD_MIX.items())[:3])
    e = _err(write_peft(tmp_path / "m.safetensors", shapes, rank=4, metadata_alpha=meta))
    assert "lora_adapter_metadata" in e.reason


def test_peft_base_model_prefix_and_named_adapter(tmp_path: Path) -> None:
    t = {"base_model.model.down_blocks.1.attentions.0.proj_in.lora_A.weight": torch.randn(2, 640),
         "base_model.model.down_blocks.1.attentions.0.proj_in.lora_B.weight": torch.randn(640, 2),
         "unet.mid_block.attentions.0.proj_out.lora_A.default.weight": torch.randn(2, 1280),
         "unet.mid_block.attentions.0.proj_out.lora_B.default.weight": torch.randn(1280, 2)}
    lf = read_lora(write_tensors(tmp_path / "x.safetensors", t))
    assert set(lf.layers) == {"unet/down_blocks_1_attentions_0_proj_in",
                              "unet/mid_block_attentions_0_proj_out"}


def test_explicit_alpha_tensor_in_diffusers_names(tmp_path: Path) -> None:
    t = {"unet.mid_block.attentions.0.proj_out.lora.down.weight": torch.randn(4, 1280),
         "unet.mid_block.attentions.0.proj_out.lora.up.weight": torch.randn(1280, 4),
         "unet.mid_block.attentions.0.proj_out.alpha": torch.tensor(2.0)}
    lf = read_lora(write_tensors(tmp_path / "x.safetensors", t))
    assert lf.layers["unet/mid_block_attentions_0_proj_out"].scale == 0.5


def test_comfy_style_sgm_dotted_names(tmp_path: Path) -> None:
    t = {"diffusion_model.input_blocks.4.1.proj_in.lora_down.weight": torch.randn(2, 640),
         "diffusion_model.input_blocks.4.1.proj_in.lora_up.weight": torch.randn(640, 2)}
    lf = read_lora(write_tensors(tmp_path / "x.safetensors", t))
    assert list(lf.layers) == ["unet/down_blocks_1_attentions_0_proj_in"]


# ----------------------------------------------------------------------------------------- LyCORIS


@pytest.mark.parametrize("tucker", [False, True])
def test_loha(tmp_path: Path, tucker: bool) -> None:
    lf = read_lora(write_loha(tmp_path / "h.safetensors", {**SD_MIX, **TE1}, rank=4, alpha=2, tucker=tucker))
    for key, layer in lf.layers.items():
        assert layer.kind == "loha" and layer.rank == 4 and layer.scale == 0.5
        # 1×1 convs that LoHa stores flattened keep a 2-D shape with the weight's numel.
        expected = SD_MIX.get(key) or TE1[key]
        if key.endswith(("proj_in", "proj_out")):
            assert layer.shape == expected[:2]
        else:
            assert layer.shape == expected, key
    conv = lf.layers["unet/mid_block_resnets_1_conv2"]
    assert ("t1" in conv.tensors) == tucker
    assert "t1" not in lf.layers["unet/down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"].tensors


@pytest.mark.parametrize(("decompose", "tucker", "rank"), [
    ("w2", False, 4), ("w2", True, 4), ("both", False, 2), ("none", False, None)])
def test_lokr(tmp_path: Path, decompose: str, tucker: bool, rank: int | None) -> None:
    lf = read_lora(write_lokr(tmp_path / "k.safetensors", SD_MIX, rank=rank or 4, alpha=2,
                              decompose=decompose, tucker=tucker))  # type: ignore[arg-type]
    for key, layer in lf.layers.items():
        assert layer.kind == "lokr" and layer.rank == rank
        assert layer.scale == (2 / rank if rank else 1.0)
        if key.endswith(("proj_in", "proj_out")) and decompose != "none":
            assert layer.shape == SD_MIX[key][:2]  # kernel flattened in the file
        else:
            assert layer.shape == SD_MIX[key], key  # full w2 keeps the kernel
    conv = lf.layers["unet/mid_block_resnets_1_conv2"]
    assert ("t2" in conv.tensors) == tucker
    assert ("w1" in conv.tensors) == (decompose != "both")
    assert ("w2" in conv.tensors) == (decompose == "none")


def test_full_diff(tmp_path: Path) -> None:
    shapes = {k: v for k, v in SD_MIX.items() if math.prod(v) <= 320 * 320 * 9}
    lf = read_lora(write_full(tmp_path / "f.safetensors", shapes, bias=True))
    assert set(lf.layers) == set(shapes) and len(shapes) >= 5
    for key, layer in lf.layers.items():
        assert layer.kind == "full" and layer.rank is None and layer.alpha is None and layer.scale == 1.0
        assert layer.shape == shapes[key] and layer.tensors["diff_b"].shape == (shapes[key][0],)


def test_bundled_embeddings_are_ignored(tmp_path: Path) -> None:
    p = write_kohya(tmp_path / "a.safetensors", dict(list(SD_MIX.items())[:2]))
    t = _raw(p)
    t["bundle_emb.mytoken.string_to_param.*"] = torch.randn(2, 768)
    lf = read_lora(write_tensors(tmp_path / "b.safetensors", t))
    assert len(lf.layers) == 2


def test_large_sdxl_file_reads_fast(tmp_path: Path) -> None:
    """560 SDXL attention projections, rank 8, fp16 (23 MB): 0.1–1 s here; the bound only catches blow-ups."""
    att = select(XL, attention=True)
    p = write_kohya(tmp_path / "xl.safetensors", att, rank=8, alpha=4, naming="sgm", dtype=torch.float16)
    t0 = time.perf_counter()
    lf = read_lora(p)
    elapsed = time.perf_counter() - t0
    assert len(lf.layers) == 560 and set(lf.layers) == set(att)
    assert elapsed < 10.0, elapsed


# ----------------------------------------------------------------------------------------- refusals


def _err(path: Path) -> LoraFormatError:
    with pytest.raises(LoraFormatError) as ei:
        read_lora(path)
    e = ei.value
    assert e.path == str(path)
    assert str(e).startswith(str(path))
    return e


def test_missing_file_and_directory(tmp_path: Path) -> None:
    assert "not found" in _err(tmp_path / "nope.safetensors").reason
    assert "not a file" in _err(tmp_path).reason


class _Sentinel:
    """Unpickling this creates a file: proof that a refusal never unpickled anything."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.mark.parametrize("ext", [".pt", ".ckpt", ".pth", ".bin"])
def test_pickles_refused_by_extension(tmp_path: Path, ext: str) -> None:
    sentinel = tmp_path / "unpickled"
    p = tmp_path / f"lora{ext}"
    p.write_bytes(pickle.dumps(_Sentinel(sentinel)))
    e = _err(p)
    assert "pickle" in e.reason and ext in e.reason
    assert not sentinel.exists()


def test_pickles_refused_by_magic_bytes(tmp_path: Path) -> None:
    sentinel = tmp_path / "unpickled"
    p = tmp_path / "renamed.safetensors"
    p.write_bytes(pickle.dumps(_Sentinel(sentinel), protocol=2))
    assert "pickle" in _err(p).reason
    assert not sentinel.exists()
    z = tmp_path / "zip.safetensors"
    torch.save({"a.lora_down.weight": torch.zeros(2, 2)}, z)  # the zip container torch.save writes
    assert z.read_bytes()[:2] == b"PK"
    assert "zip" in _err(z).reason


def test_truncated_and_corrupt_files(tmp_path: Path) -> None:
    good = write_kohya(tmp_path / "good.safetensors", dict(list(SD_MIX.items())[:3]), rank=4)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])

    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-100])
    e = _err(cut)
    assert "truncated" in e.reason and e.key is not None

    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(data[: 8 + n // 2])
    assert "header length" in _err(cut_header).reason

    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(data[:5])
    assert "only 5 bytes" in _err(tiny).reason

    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "only 0 bytes" in _err(empty).reason

    bad_json = tmp_path / "json.safetensors"
    bad_json.write_bytes(data[:8] + b"{]" + data[10:])
    assert "not valid JSON" in _err(bad_json).reason

    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    assert "header length" in _err(huge).reason

    header = json.loads(data[8: 8 + n])
    k = next(k for k in header if k != "__metadata__")
    header[k]["data_offsets"][1] += 10**9
    raw = json.dumps(header).encode()
    past = tmp_path / "past.safetensors"
    past.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])
    e = _err(past)
    assert "truncated" in e.reason and e.key == k


def _kohya_layer(name: str, r: int = 2, out: int = 8, inp: int = 8) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_down.weight": torch.randn(r, inp), f"{name}.lora_up.weight": torch.randn(out, r),
            f"{name}.alpha": torch.tensor(float(r))}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_weights_name_the_key(tmp_path: Path, bad: float, dtype: torch.dtype) -> None:
    t = {**_kohya_layer("lora_unet_a_proj_in"), **_kohya_layer("lora_unet_b_proj_in"),
         **_kohya_layer("lora_unet_c_proj_in")}
    t["lora_unet_b_proj_in.lora_up.weight"][3, 1] = bad
    # weights in `dtype`, alphas in float32: the file has two dtype runs
    t = {k: v if k.endswith(".alpha") else v.to(dtype) for k, v in t.items()}
    e = _err(write_tensors(tmp_path / "n.safetensors", t))
    assert e.key == "lora_unet_b_proj_in.lora_up.weight"
    assert ("NaN" in e.reason) and ("Inf" in e.reason)
    assert ("1 NaN" in e.reason) == math.isnan(bad)


def test_nan_inf_far_into_a_long_half_precision_run(tmp_path: Path) -> None:
    """A run of half floats is checked slice by slice (its float32 copy never grows with the file): a bad
    value in a late slice is still found, and a finite file of several slices passes."""
    t = {**_kohya_layer("lora_unet_a_proj_in", r=128, out=1280, inp=1280),
         **_kohya_layer("lora_unet_b_proj_in", r=128, out=1280, inp=1280)}
    t = {k: v.to(torch.float16) for k, v in t.items()}
    assert sum(v.numel() for v in t.values()) > 2 * container._FINITE_CHUNK  # several slices
    assert len(read_lora(write_tensors(tmp_path / "ok.safetensors", t)).layers) == 2
    t["lora_unet_b_proj_in.lora_up.weight"][-1, -1] = float("inf")
    assert _err(write_tensors(tmp_path / "n.safetensors", t)).key == "lora_unet_b_proj_in.lora_up.weight"


def test_nan_alpha(tmp_path: Path) -> None:
    t = _kohya_layer("lora_unet_a_proj_in")
    t["lora_unet_a_proj_in.alpha"] = torch.tensor(float("nan"))
    assert _err(write_tensors(tmp_path / "n.safetensors", t)).key == "lora_unet_a_proj_in.alpha"


def test_large_finite_values_are_not_mistaken_for_inf(tmp_path: Path) -> None:
    t = _kohya_layer("lora_unet_a_proj_in")
    # The float32 sum of these overflows to inf; every value is finite.
    t["lora_unet_a_proj_in.lora_up.weight"] = torch.full((8, 2), 3e38, dtype=torch.float32)
    assert not torch.isfinite(t["lora_unet_a_proj_in.lora_up.weight"].sum())
    assert len(read_lora(write_tensors(tmp_path / "big.safetensors", t)).layers) == 1


@pytest.mark.parametrize(("tensors", "what"), [
    ({"lora_unet_a.weight": torch.randn(8), "lora_unet_a.on_input": torch.tensor(True)}, "IA3"),
    ({"lora_unet_a.oft_blocks": torch.randn(4, 2, 2), "lora_unet_a.alpha": torch.tensor(1.0)}, "OFT"),
    ({"lora_unet_a.oft_blocks": torch.randn(2, 4, 2, 2), "lora_unet_a.alpha": torch.tensor(1.0)}, "BOFT"),
    ({"lora_unet_a.oft_diag": torch.randn(4, 2, 2)}, "OFT"),
    ({"lora_unet_a.a1.weight": torch.randn(2, 8), "lora_unet_a.a2.weight": torch.randn(8, 2),
      "lora_unet_a.b1.weight": torch.randn(2, 8), "lora_unet_a.b2.weight": torch.randn(8, 2)}, "GLoRA"),
    ({**_kohya_layer("lora_unet_a"), "lora_unet_a.dora_scale": torch.randn(1, 8)}, "DoRA"),
    ({"unet.a.lora_A.weight": torch.randn(2, 8), "unet.a.lora_B.weight": torch.randn(8, 2),
      "unet.a.lora_magnitude_vector": torch.randn(8)}, "DoRA"),
    ({"lora_unet_a.w_norm": torch.randn(8), "lora_unet_a.b_norm": torch.randn(8)}, "norm"),
])
def test_unsupported_kinds(tmp_path: Path, tensors: dict, what: str) -> None:
    e = _err(write_tensors(tmp_path / "u.safetensors", tensors))
    assert "unsupported" in e.reason and what in e.reason and e.key in tensors


def test_no_lora_layers(tmp_path: Path) -> None:
    ckpt = {"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3)}
    e = _err(write_tensors(tmp_path / "c.safetensors", ckpt))
    assert "no LoRA layers" in e.reason and "input_blocks.0.0.weight" in e.reason
    assert "no tensors" in _err(write_tensors(tmp_path / "e.safetensors", {})).reason


def test_mismatched_ranks(tmp_path: Path) -> None:
    t = {"lora_unet_a.lora_down.weight": torch.randn(4, 8), "lora_unet_a.lora_up.weight": torch.randn(8, 3)}
    e = _err(write_tensors(tmp_path / "m.safetensors", t))
    assert "mismatched ranks" in e.reason and e.key == "lora_unet_a"
    t = {"lora_unet_a.hada_w1_a": torch.randn(8, 4), "lora_unet_a.hada_w1_b": torch.randn(3, 8),
         "lora_unet_a.hada_w2_a": torch.randn(8, 4), "lora_unet_a.hada_w2_b": torch.randn(4, 8)}
    assert "mismatched ranks" in _err(write_tensors(tmp_path / "h.safetensors", t)).reason


def test_incomplete_layer_and_unknown_tensor(tmp_path: Path) -> None:
    t = {"lora_unet_a.lora_down.weight": torch.randn(4, 8), **_kohya_layer("lora_unet_b")}
    e = _err(write_tensors(tmp_path / "i.safetensors", t))
    assert "missing up" in e.reason and e.key == "lora_unet_a"
    t = {**_kohya_layer("lora_unet_b"), "lora_unet_b.something_else": torch.randn(3)}
    e = _err(write_tensors(tmp_path / "u.safetensors", t))
    assert "unknown tensor" in e.reason and e.key == "lora_unet_b.something_else"
    e = _err(write_tensors(tmp_path / "a.safetensors", {**_kohya_layer("lora_unet_b"),
                                                         "lora_unet_c.alpha": torch.tensor(1.0)}))
    assert "alpha without" in e.reason


def test_two_names_for_one_layer(tmp_path: Path) -> None:
    t = {**_kohya_layer("lora_unet_input_blocks_1_1_proj_in"),
         **_kohya_layer("lora_unet_down_blocks_0_attentions_0_proj_in")}
    assert "two entries" in _err(write_tensors(tmp_path / "d.safetensors", t)).reason


def test_error_message_format() -> None:
    e = LoraFormatError("x.safetensors", "bad thing", "k.weight")
    assert str(e) == "x.safetensors: k.weight: bad thing"
    assert str(LoraFormatError("x.safetensors", "bad")) == "x.safetensors: bad"


def test_reading_does_not_modify_the_file(tmp_path: Path) -> None:
    p = write_kohya(tmp_path / "a.safetensors", SD_MIX)
    before = p.read_bytes()
    read_lora(p)
    assert p.read_bytes() == before


def test_save_file_roundtrip_of_metadata(tmp_path: Path) -> None:
    p = tmp_path / "m.safetensors"
    save_file(_kohya_layer("lora_unet_a"), str(p), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    assert read_lora(p).metadata == {"ss_base_model_version": "sdxl_base_v1-0"}


def _aged(path: Path, seconds: float = 60.0) -> Path:
    """Set the mtime ``seconds`` back, as a file downloaded earlier has (a just-written one is racy)."""
    then = time.time_ns() - int(seconds * 1e9)
    os.utime(path, ns=(then, then))
    return path


def test_known_files_are_not_hashed_or_checked_again(tmp_path: Path, monkeypatch) -> None:
    """With an index, the first read hashes, checks and records the file; a second read of the unchanged file
    takes the sha256 from the index and neither hashes nor scans the weights; its layers are the same."""
    index = FileIndex(tmp_path / "cache")
    p = _aged(write_kohya(tmp_path / "k.safetensors", SD_MIX, seed=3))
    first = read_lora(p, index)
    assert first.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert index.get(p, p.stat()) == first.sha256

    def forbidden(*args, **kwargs):
        raise AssertionError("hashed or checked again")

    monkeypatch.setattr(container, "sha256", forbidden)
    monkeypatch.setattr(container, "check_finite", forbidden)
    second = read_lora(p, index)
    assert second.sha256 == first.sha256 and second.layers.keys() == first.layers.keys()
    assert all(torch.equal(a.tensors[r], b.tensors[r]) for a, b in zip(first.layers.values(),
               second.layers.values(), strict=True) for r in a.tensors)
    with pytest.raises(AssertionError, match="again"):
        read_lora(p)  # no index: always hashed


def test_a_changed_or_fresh_file_is_hashed_and_checked(tmp_path: Path) -> None:
    """A new mtime or size means new bytes: hashed and checked again (NaN found, not recorded); a file
    written in the last two seconds is read but not recorded (its mtime may not yet tell its bytes apart)."""
    index = FileIndex(tmp_path / "cache")
    t = {**_kohya_layer("lora_unet_a_proj_in"), **_kohya_layer("lora_unet_b_proj_in")}
    p = _aged(write_tensors(tmp_path / "n.safetensors", t))
    good = read_lora(p, index).sha256
    t["lora_unet_b_proj_in.lora_up.weight"][0, 0] = float("nan")  # same size, new bytes
    _aged(write_tensors(p, t), 30)
    with pytest.raises(LoraFormatError, match="NaN"):
        read_lora(p, index)
    assert index.get(p, p.stat()) is None
    t["lora_unet_b_proj_in.lora_up.weight"][0, 0] = 0.5
    write_tensors(p, t)  # fresh: read, hashed, not recorded
    fresh = read_lora(p, index)
    assert fresh.sha256 != good and index.get(p, p.stat()) is None
    _aged(p)
    assert read_lora(p, index).sha256 == fresh.sha256 == index.get(p, p.stat())


def test_a_file_written_while_read_is_not_trusted(tmp_path: Path, monkeypatch) -> None:
    """If the file changes between the index lookup and the end of the read, the index is not believed: the
    bytes read are hashed and checked."""
    index = FileIndex(tmp_path / "cache")
    t = {**_kohya_layer("lora_unet_a_proj_in"), **_kohya_layer("lora_unet_b_proj_in")}
    p = _aged(write_tensors(tmp_path / "n.safetensors", t))
    read_lora(p, index)
    t["lora_unet_b_proj_in.lora_up.weight"][0, 0] = float("inf")
    real_read = container.read_bytes

    def read_while_rewritten(path: Path) -> bytearray:
        write_tensors(p, t)  # a trainer saving over it as we read
        return real_read(path)

    monkeypatch.setattr(container, "read_bytes", read_while_rewritten)
    with pytest.raises(LoraFormatError, match="Inf"):
        read_lora(p, index)
