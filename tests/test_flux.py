"""Flux: file spellings → canonical layers and fused splits (klora.formats.flux), canonical → BFL module
rows (klora.keys.flux).

Names and shapes come from real models: diffusers' ``FluxTransformer2DModel`` with the FLUX.1-dev config
and a BFL-named tree with Forge's names (tests/doubles/models/flux.py), both on the meta device.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from klora import kinds
from klora.formats import flux as flux_format
from klora.formats import read_lora
from klora.keys import flux
from klora.layers import LoraFormatError, LoraLayer

sys.path.insert(0, str(Path(__file__).parent))
from doubles.models.flux import IntegratedFluxTransformer2DModel

H = 3072
MLP = 12288


def _flux_dev_diffusers() -> nn.Module:
    import diffusers
    with torch.device("meta"):
        return diffusers.FluxTransformer2DModel(
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )


@pytest.fixture(scope="module")
def diffusers_flux() -> nn.Module:
    return _flux_dev_diffusers()


@pytest.fixture(scope="module")
def bfl_flux() -> nn.Module:
    with torch.device("meta"):
        return IntegratedFluxTransformer2DModel()


def read_flux_layers(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     name: str = "x") -> dict[str, LoraLayer]:
    """The layers of ``sd`` written to a .safetensors file and read back by klora.formats.read_lora."""
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.safetensors"
        save_file({k: v.contiguous().clone() for k, v in sd.items()}, str(path), metadata=metadata or None)
        return read_lora(path).layers


def fused_layers(sd: dict[str, torch.Tensor]) -> dict[str, LoraLayer]:
    """The layers of a kohya Flux state dict built as the file stores them, fused modules unsplit (what the
    reader splits)."""
    out = {}
    for name in sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd}):
        tensors = {role: sd[f"{name}.lora_{role}.weight"] for role in ("down", "up")}
        alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else None
        located = flux_format.FluxScheme().locate(name, "")
        key = f"{located.component}/{located.module}"
        out[key] = kinds.KINDS["lora"].build("f", key, name, tensors, {}, alpha, lambda o, i: (o, i))
    return out


def split_fused(layers: dict[str, LoraLayer]) -> dict[str, LoraLayer]:
    out = {}
    for key, layer in layers.items():
        for child in flux_format.split_fused_layer(layer) if flux.is_fused_key(key) else [layer]:
            out[child.key] = child
    return out


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


# ----------------------------------------------------------------------------------------------------
# The canonical → BFL map against the real module trees


def test_every_diffusers_linear_lands_on_bfl_rows_of_the_same_width(diffusers_flux, bfl_flux):
    d_lin, b_lin = _linears(diffusers_flux), _linears(bfl_flux)
    assert len(d_lin) == 504  # 19 × 14 + 38 × 6 + 10 top-level
    covered: dict[str, list[tuple[int, int]]] = {}
    for name, mod in d_lin.items():
        key = "transformer/" + name.replace(".", "_")
        if name == "norm_out.linear":
            assert flux.bfl_target(key) is None  # rows are permuted, see test_norm_out_swaps_halves
            key = "transformer/final_layer_adaLN_modulation_1"
        else:
            assert flux.diffusers_module_name(key) == name
        t = flux.bfl_target(key)
        assert t is not None, key
        target = b_lin[t.module]
        assert target.in_features == mod.in_features, key
        rows = t.rows or slice(0, target.out_features)
        assert rows.stop - rows.start == mod.out_features, key
        assert 0 <= rows.start < rows.stop <= target.out_features
        covered.setdefault(t.module, []).append((rows.start, rows.stop))
    # every BFL Linear is reached, and the row slices of each partition it exactly
    assert set(covered) == set(b_lin)
    for module, spans in covered.items():
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == b_lin[module].out_features, module
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans)), (module, spans)


def test_fused_slices_of_real_modules():
    assert flux.bfl_target("transformer/transformer_blocks_7_attn_to_q") == flux.BflSlice(
        "double_blocks.7.img_attn.qkv", slice(0, 3072)
    )
    assert flux.bfl_target("transformer/transformer_blocks_7_attn_to_k").rows == slice(3072, 6144)
    assert flux.bfl_target("transformer/transformer_blocks_7_attn_to_v").rows == slice(6144, 9216)
    assert flux.bfl_target("transformer/transformer_blocks_0_attn_add_k_proj") == flux.BflSlice(
        "double_blocks.0.txt_attn.qkv", slice(3072, 6144)
    )
    assert flux.bfl_target("transformer/transformer_blocks_0_attn_to_out_0") == flux.BflSlice(
        "double_blocks.0.img_attn.proj"
    )
    assert (
        flux.bfl_target("transformer/transformer_blocks_0_attn_to_add_out").module
        == "double_blocks.0.txt_attn.proj"
    )
    assert (
        flux.bfl_target("transformer/transformer_blocks_2_ff_context_net_2").module
        == "double_blocks.2.txt_mlp.2"
    )
    assert (
        flux.bfl_target("transformer/transformer_blocks_2_norm1_context_linear").module
        == "double_blocks.2.txt_mod.lin"
    )
    assert flux.bfl_target("transformer/single_transformer_blocks_3_proj_mlp") == flux.BflSlice(
        "single_blocks.3.linear1", slice(9216, 21504)
    )
    assert flux.bfl_target("transformer/single_transformer_blocks_3_attn_to_v").rows == slice(6144, 9216)
    assert flux.bfl_target("transformer/single_transformer_blocks_3_proj_out") == flux.BflSlice(
        "single_blocks.3.linear2"
    )
    assert (
        flux.bfl_target("transformer/single_transformer_blocks_3_norm_linear").module
        == "single_blocks.3.modulation.lin"
    )
    assert flux.bfl_target("transformer/double_blocks_4_img_attn_qkv") == flux.BflSlice(
        "double_blocks.4.img_attn.qkv"
    )
    assert flux.bfl_target("transformer/double_blocks_4_txt_attn_qkv") == flux.BflSlice(
        "double_blocks.4.txt_attn.qkv"
    )
    assert flux.bfl_target("transformer/single_blocks_9_linear1") == flux.BflSlice("single_blocks.9.linear1")
    # other hidden sizes (for example a small test model) scale the slices
    assert flux.bfl_target("transformer/single_transformer_blocks_0_proj_mlp", 64, 256).rows == slice(
        192, 448
    )
    for bad in (
        "unet/transformer_blocks_0_attn_to_q",
        "transformer/transformer_blocks_0_attn_to_x",
        "transformer/double_blocks_0_img_attn_proj",
        "transformer/norm_out_linear",
        "transformer/nothing",
    ):
        assert flux.bfl_target(bad) is None, bad


# ----------------------------------------------------------------------------------------------------
# Key sets in every spelling, with real shapes (rank 1 keeps them small)


def _kohya_key_set(bfl: nn.Module, rank: int = 1) -> dict[str, torch.Tensor]:
    """kohya/sd-scripts lora_flux: every Linear of the double and single blocks, fused qkv/linear1."""
    sd: dict[str, torch.Tensor] = {}
    for name, mod in _linears(bfl).items():
        if not name.startswith(("double_blocks.", "single_blocks.")):
            continue
        k = "lora_unet_" + name.replace(".", "_")
        sd[k + ".lora_down.weight"] = torch.zeros(rank, mod.in_features)
        sd[k + ".lora_up.weight"] = torch.zeros(mod.out_features, rank)
        sd[k + ".alpha"] = torch.tensor(float(rank))
    return sd


def test_kohya_key_set_reads_split_to_diffusers_modules(bfl_flux, diffusers_flux):
    sd = _kohya_key_set(bfl_flux)
    assert len(sd) == 912  # 304 modules × 3 tensors (ecosystem D.4)
    layers = read_flux_layers(sd, {}, "kohya")
    assert layers is not None
    d_lin = _linears(diffusers_flux)
    b_lin = _linears(bfl_flux)
    # 19 × (3 + 3 + 8 other) + 38 × (4 + 2) diffusers modules
    assert len(layers) == 19 * 14 + 38 * 6
    for key, layer in layers.items():
        name = flux.diffusers_module_name(key)
        assert name in d_lin, key
        assert layer.shape == (d_lin[name].out_features, d_lin[name].in_features), key
        t = flux.bfl_target(key)
        rows = t.rows or slice(0, b_lin[t.module].out_features)
        assert layer.shape == (rows.stop - rows.start, b_lin[t.module].in_features)
    q = layers["transformer/transformer_blocks_5_attn_to_q"]
    assert q.file_key == "lora_unet_double_blocks_5_img_attn_qkv[0:3072]"
    assert layers["transformer/single_transformer_blocks_1_proj_mlp"].shape == (MLP, H)
    # unsplit: the fused modules keep their BFL keys and shapes
    fused = fused_layers(sd)
    assert fused["transformer/double_blocks_5_img_attn_qkv"].shape == (3 * H, H)
    assert fused["transformer/single_blocks_0_linear1"].shape == (3 * H + MLP, H)
    assert fused["transformer/transformer_blocks_5_ff_net_2"].shape == (H, MLP)
    assert len(fused) == 304


def test_read_lora_dispatches_flux_files_to_the_flux_reader(bfl_flux, tmp_path):
    """A kohya Flux file read through klora.formats.read_lora lands on the same canonical layers."""
    from safetensors.torch import save_file

    from klora.formats import read_lora

    g = torch.Generator().manual_seed(0)
    sd = {
        k: torch.randn(v.shape, generator=g) if v.dim() == 2 else v
        for k, v in _kohya_key_set(bfl_flux).items()
        if k.startswith(("lora_unet_double_blocks_0_", "lora_unet_single_blocks_0_"))
    }
    path = tmp_path / "flux_kohya.safetensors"
    save_file(sd, str(path))
    file = read_lora(path)
    expected = read_flux_layers(sd, {}, "expected")
    assert sorted(file.layers) == sorted(expected)
    assert all(k.startswith("transformer/") for k in file.layers)
    q = file.layers["transformer/transformer_blocks_0_attn_to_q"]
    assert torch.equal(q.tensors["up"], expected["transformer/transformer_blocks_0_attn_to_q"].tensors["up"])


def test_diffusers_peft_key_set_from_the_real_model(diffusers_flux):
    sd = {}
    for name, mod in _linears(diffusers_flux).items():
        if name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            sd[f"transformer.{name}.lora_A.weight"] = torch.zeros(2, mod.in_features)
            sd[f"transformer.{name}.lora_B.weight"] = torch.zeros(mod.out_features, 2)
    layers = read_flux_layers(sd, {}, "peft")
    assert len(layers) == 494  # the "full" count the official code accepts (ecosystem D.4)
    assert all(layer.alpha is None and layer.scale == 1.0 and layer.rank == 2 for layer in layers.values())
    assert (
        layers["transformer/transformer_blocks_0_attn_to_out_0"].file_key
        == "transformer.transformer_blocks.0.attn.to_out.0"
    )


# ----------------------------------------------------------------------------------------------------
# Numbers: small hidden size, random factors


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _delta(layer) -> torch.Tensor:
    return layer.scale * (layer.tensors["up"].float() @ layer.tensors["down"].float())


def test_split_children_are_the_rows_of_the_fused_delta():
    h, mlp, r = 16, 64, 3
    sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": _rand(r, h, seed=1),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": _rand(3 * h, r, seed=2),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.5),
        "lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight": _rand(r, h, seed=3),
        "lora_unet_double_blocks_0_txt_attn_qkv.lora_up.weight": _rand(3 * h, r, seed=4),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": _rand(r, h, seed=5),
        "lora_unet_single_blocks_0_linear1.lora_up.weight": _rand(3 * h + mlp, r, seed=6),
        "lora_unet_single_blocks_0_linear1.alpha": torch.tensor(6.0),
    }
    fused = fused_layers(sd)
    split = read_flux_layers(sd, {}, "f")
    resplit = split_fused(fused)
    assert sorted(split) == sorted(resplit)
    for key, layer in split.items():
        other = resplit[key]
        assert (layer.file_key, layer.shape, layer.alpha, layer.rank) == (
            other.file_key,
            other.shape,
            other.alpha,
            other.rank,
        )
        assert all(torch.equal(layer.tensors[n], other.tensors[n]) for n in ("down", "up"))
    groups = {
        "transformer/double_blocks_0_img_attn_qkv": [
            "transformer_blocks_0_attn_to_q",
            "transformer_blocks_0_attn_to_k",
            "transformer_blocks_0_attn_to_v",
        ],
        "transformer/double_blocks_0_txt_attn_qkv": [
            "transformer_blocks_0_attn_add_q_proj",
            "transformer_blocks_0_attn_add_k_proj",
            "transformer_blocks_0_attn_add_v_proj",
        ],
        "transformer/single_blocks_0_linear1": [
            "single_transformer_blocks_0_attn_to_q",
            "single_transformer_blocks_0_attn_to_k",
            "single_transformer_blocks_0_attn_to_v",
            "single_transformer_blocks_0_proj_mlp",
        ],
    }
    for fused_key, children in groups.items():
        parent = fused[fused_key]
        kids = [split["transformer/" + c] for c in children]
        assert torch.equal(torch.cat([_delta(k) for k in kids]), _delta(parent))
        for k in kids:
            assert (k.alpha, k.rank, k.scale) == (parent.alpha, parent.rank, parent.scale)
            assert k.tensors["down"] is kids[0].tensors["down"]  # one down for the children, not copies
            t = flux.bfl_target(k.key, h, mlp)
            assert t.rows.stop - t.rows.start == k.shape[0]
            assert torch.equal(_delta(parent)[t.rows], _delta(k))
    assert fused["transformer/single_blocks_0_linear1"].scale == 2.0


def test_kohya_bfl_and_diffusers_spellings_of_one_lora_agree():
    """One LoRA written as kohya (fused), BFL-native and diffusers/PEFT (split) reads to equal deltas."""
    h, r = 16, 4
    down, up = _rand(r, h, seed=7), _rand(3 * h, r, seed=8)
    s_down, s_up = _rand(r, h, seed=9), _rand(7 * h, r, seed=10)
    kohya = {
        "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight": down,
        "lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight": up,
        "lora_unet_double_blocks_1_img_attn_qkv.alpha": torch.tensor(2.0),
        "lora_unet_single_blocks_2_linear1.lora_down.weight": s_down,
        "lora_unet_single_blocks_2_linear1.lora_up.weight": s_up,
        "lora_unet_single_blocks_2_linear1.alpha": torch.tensor(2.0),
    }
    bfl = {
        "diffusion_model.double_blocks.1.img_attn.qkv.lora_A.weight": down,
        "diffusion_model.double_blocks.1.img_attn.qkv.lora_B.weight": up,
        "diffusion_model.double_blocks.1.img_attn.qkv.alpha": torch.tensor(2.0),
        "diffusion_model.single_blocks.2.linear1.lora_A.weight": s_down,
        "diffusion_model.single_blocks.2.linear1.lora_B.weight": s_up,
        "diffusion_model.single_blocks.2.linear1.alpha": torch.tensor(2.0),
    }
    # diffusers: alpha 2 of rank 4 from the PEFT config in the header
    peft = {}
    for i, n in enumerate(("to_q", "to_k", "to_v")):
        peft[f"transformer.transformer_blocks.1.attn.{n}.lora_A.weight"] = down
        peft[f"transformer.transformer_blocks.1.attn.{n}.lora_B.weight"] = up[i * h : (i + 1) * h]
    for i, n in enumerate(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")):
        peft[f"transformer.single_transformer_blocks.2.{n}.lora_A.weight"] = s_down
        peft[f"transformer.single_transformer_blocks.2.{n}.lora_B.weight"] = (
            s_up[i * h : (i + 1) * h] if i < 3 else s_up[3 * h :]
        )
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": r, "transformer.lora_alpha": 2})}
    read = [read_flux_layers(sd, m, "x") for sd, m in ((kohya, {}), (bfl, {}), (peft, meta))]
    assert set(read[0]) == set(read[1]) == set(read[2])
    assert len(read[0]) == 7
    for key in read[0]:
        d = [_delta(layers[key]) for layers in read]
        assert torch.allclose(d[0], d[1]) and torch.allclose(d[0], d[2]), key
        assert math.isclose(read[2][key].scale, 0.5)


def test_peft_alpha_pattern_and_rslora_and_alpha_tensors():
    h = 3072  # diffusers names alone need the Flux width as evidence
    sd = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, h),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(h, 4),
        "transformer.transformer_blocks.0.attn.to_k.lora_A.weight": torch.zeros(4, h),
        "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": torch.zeros(h, 4),
    }
    cfg = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"attn.to_k": 2}}
    layers = read_flux_layers(sd, {"lora_adapter_metadata": json.dumps(cfg)}, "p")
    assert layers["transformer/transformer_blocks_0_attn_to_q"].scale == 2.0
    assert layers["transformer/transformer_blocks_0_attn_to_k"].scale == 0.5
    cfg = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.use_rslora": True}
    layers = read_flux_layers(sd, {"lora_adapter_metadata": json.dumps(cfg)}, "p")
    assert math.isclose(layers["transformer/transformer_blocks_0_attn_to_q"].scale, 8 / math.sqrt(4))
    # an alpha tensor wins over the metadata
    sd2 = dict(sd, **{"transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(1.0)})
    layers = read_flux_layers(sd2, {"lora_adapter_metadata": json.dumps({"lora_alpha": 8})}, "p")
    assert layers["transformer/transformer_blocks_0_attn_to_q"].scale == 0.25
    assert layers["transformer/transformer_blocks_0_attn_to_k"].scale == 2.0
    # the same reader as SD files: an unprefixed lora_alpha applies to the transformer too (alpha 8, r 4:
    # scale 2), and bad metadata is refused, never ignored (it would weigh the LoRA wrong)
    layers = read_flux_layers(sd, {"lora_adapter_metadata": json.dumps({"r": 4, "lora_alpha": 8})}, "p")
    assert layers["transformer/transformer_blocks_0_attn_to_q"].scale == 2.0
    for bad, message in (("{not json", "not valid JSON"),
                         (json.dumps({"lora_alpha": "abc"}), "not a finite number"),
                         (json.dumps({"lora_alpha": 8, "alpha_pattern": {"attn.to_[k": 2}}),
                          "not a valid pattern")):
        with pytest.raises(LoraFormatError, match=message):
            read_flux_layers(sd, {"lora_adapter_metadata": bad}, "p")


def test_xlabs_is_converted_down_shared_up_split():
    h, r = 16, 2
    t = {
        "double_blocks.0.processor.qkv_lora1.down.weight": _rand(r, h, seed=1),
        "double_blocks.0.processor.qkv_lora1.up.weight": _rand(3 * h, r, seed=2),
        "double_blocks.0.processor.qkv_lora2.down.weight": _rand(r, h, seed=3),
        "double_blocks.0.processor.qkv_lora2.up.weight": _rand(3 * h, r, seed=4),
        "double_blocks.0.processor.proj_lora1.down.weight": _rand(r, h, seed=5),
        "double_blocks.0.processor.proj_lora1.up.weight": _rand(h, r, seed=6),
        "double_blocks.0.processor.proj_lora2.down.weight": _rand(r, h, seed=7),
        "double_blocks.0.processor.proj_lora2.up.weight": _rand(h, r, seed=8),
        "single_blocks.1.processor.qkv_lora.down.weight": _rand(r, h, seed=9),
        "single_blocks.1.processor.qkv_lora.up.weight": _rand(3 * h, r, seed=10),
        "single_blocks.1.processor.proj_lora.down.weight": _rand(r, 5 * h, seed=11),
        "single_blocks.1.processor.proj_lora.up.weight": _rand(h, r, seed=12),
    }
    layers = read_flux_layers(t, {}, "xlabs")
    assert sorted(layers) == sorted(
        "transformer/" + k
        for k in (
            "transformer_blocks_0_attn_to_q",
            "transformer_blocks_0_attn_to_k",
            "transformer_blocks_0_attn_to_v",
            "transformer_blocks_0_attn_add_q_proj",
            "transformer_blocks_0_attn_add_k_proj",
            "transformer_blocks_0_attn_add_v_proj",
            "transformer_blocks_0_attn_to_out_0",
            "transformer_blocks_0_attn_to_add_out",
            "single_transformer_blocks_1_attn_to_q",
            "single_transformer_blocks_1_attn_to_k",
            "single_transformer_blocks_1_attn_to_v",
            "single_transformer_blocks_1_proj_out",
        )
    )
    assert all(layer.scale == 1.0 for layer in layers.values())  # XLabs files carry no alpha
    k = layers["transformer/transformer_blocks_0_attn_to_k"]
    assert torch.equal(k.tensors["down"], t["double_blocks.0.processor.qkv_lora1.down.weight"])
    assert torch.equal(k.tensors["up"], t["double_blocks.0.processor.qkv_lora1.up.weight"][h : 2 * h])
    v = layers["transformer/single_transformer_blocks_1_attn_to_v"]
    assert torch.equal(v.tensors["up"], t["single_blocks.1.processor.qkv_lora.up.weight"][2 * h :])
    assert layers["transformer/single_transformer_blocks_1_proj_out"].shape == (h, 5 * h)
    assert torch.equal(layers["transformer/transformer_blocks_0_attn_to_add_out"].tensors["up"],
                       t["double_blocks.0.processor.proj_lora2.up.weight"])
    # the diffusion_model. prefix some XLabs exports carry
    prefixed = {"diffusion_model." + k: v for k, v in t.items()}
    assert set(read_flux_layers(prefixed, {}, "x")) == set(layers)


def test_norm_out_swaps_halves_and_top_level_names():
    h = 8
    down, up = _rand(2, h, seed=1), _rand(2 * h, 2, seed=2)
    sd = {
        "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": _rand(2, 5 * h, seed=3),
        "transformer.single_transformer_blocks.0.proj_out.lora_B.weight": _rand(h, 2, seed=4),
        "transformer.norm_out.linear.lora_A.weight": down,
        "transformer.norm_out.linear.lora_B.weight": up,
        "transformer.x_embedder.lora_A.weight": _rand(2, 64, seed=5),
        "transformer.x_embedder.lora_B.weight": _rand(h, 2, seed=6),
    }
    layers = read_flux_layers(sd, {}, "d")
    fin = layers["transformer/final_layer_adaLN_modulation_1"]
    assert torch.equal(fin.tensors["up"], torch.cat([up[h:], up[:h]]))  # (scale, shift) → (shift, scale)
    assert flux.bfl_target(fin.key).module == "final_layer.adaLN_modulation.1"
    assert flux.bfl_target("transformer/x_embedder").module == "img_in"
    # kohya spelling of the same BFL modules
    kohya = {
        "lora_unet_single_blocks_0_linear2.lora_down.weight": _rand(2, 5 * h, seed=3),
        "lora_unet_single_blocks_0_linear2.lora_up.weight": _rand(h, 2, seed=4),
        "lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down,
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up,
        "lora_unet_img_in.lora_down.weight": _rand(2, 64, seed=5),
        "lora_unet_img_in.lora_up.weight": _rand(h, 2, seed=6),
    }
    k_layers = read_flux_layers(kohya, {}, "k")
    assert set(k_layers) == set(layers)
    assert torch.equal(k_layers["transformer/final_layer_adaLN_modulation_1"].tensors["up"], up)


def test_text_encoder_layers_of_flux_files():
    sd = _kohya_small()
    sd["bundle_emb.mytoken.clip_l"] = torch.zeros(2, 768)  # kohya's bundled embedding: not a layer
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.zeros(2, 768)
    sd["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.zeros(768, 2)
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.zeros(2, 4096)
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.zeros(4096, 2)
    sd["text_encoder_2.encoder.block.1.layer.0.SelfAttention.k.lora_A.weight"] = torch.zeros(2, 4096)
    sd["text_encoder_2.encoder.block.1.layer.0.SelfAttention.k.lora_B.weight"] = torch.zeros(4096, 2)
    layers = read_flux_layers(sd, {}, "te")
    assert "te1/text_model_encoder_layers_0_self_attn_q_proj" in layers
    assert "te3/encoder_block_0_layer_0_SelfAttention_q" in layers
    assert "te3/encoder_block_1_layer_0_SelfAttention_k" in layers
    assert not flux.is_flux_key_set(["te1/text_model_encoder_layers_0_self_attn_q_proj"])
    assert flux.is_flux_key_set(layers)


def _kohya_small(h: int = 16) -> dict[str, torch.Tensor]:
    return {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, h),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(3 * h, 2),
    }


# ----------------------------------------------------------------------------------------------------
# Not Flux, and refusals


def test_other_models_are_not_claimed():
    sd15 = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(
            2, 320
        ),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(
            320, 2
        ),
    }
    sdxl = {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 640),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(640, 2),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(768, 2),
    }
    # SD3 shares diffusers' joint-block names (to_q, add_q_proj) but is 1536 wide, without single blocks
    sd3 = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 1536),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(1536, 2),
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": torch.zeros(2, 1536),
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": torch.zeros(1536, 2),
    }
    for sd in (sd15, sdxl, sd3, {}):
        assert not flux_format.looks_like_flux(_shapes(sd))


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def test_header_check_agrees_with_the_reader(bfl_flux):
    assert flux_format.looks_like_flux(_shapes(_kohya_key_set(bfl_flux)))
    q = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (4, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 4),
    }
    assert flux_format.looks_like_flux(q)
    assert not flux_format.looks_like_flux({k: (4, 1536) if k.endswith("A.weight") else (1536, 4) for k in q})
    assert flux_format.looks_like_flux({"double_blocks.0.processor.qkv_lora1.down.weight": (4, 3072)})
    assert flux_format.looks_like_flux({"lora_unet_single_blocks_0_linear1.hada_w1_a": (4, 4)})



def test_a_file_with_blocks_flux_lacks_is_not_flux_even_at_flux_width(tmp_path):
    """Qwen-Image's blocks are ``transformer_blocks.N`` with Flux's attention names and width (3072) and also
    modules Flux lacks (``img_mlp``, ``txt_mod``): such a file is another DiT's, read by the Qwen-Image scheme
    (:mod:`klora.formats.dit`; diffusers names, the keys the diffusers pipeline's transformer has) rather than
    refused as a Flux file with unknown modules."""
    shapes = {"transformer_blocks.0.attn.to_q": (3072, 3072),
              "transformer_blocks.0.img_mlp.net.2": (3072, 12288)}
    tensors = {}
    for module, (out, inp) in shapes.items():
        tensors[f"transformer.{module}.lora_A.weight"] = torch.randn(4, inp)
        tensors[f"transformer.{module}.lora_B.weight"] = torch.randn(out, 4)
    assert not flux_format.looks_like_flux(_shapes(tensors))
    path = tmp_path / "qwen.safetensors"
    save_file(tensors, str(path))
    assert set(read_lora(path).layers) == {"transformer/transformer_blocks_0_attn_to_q",
                                           "transformer/transformer_blocks_0_img_mlp_net_2"}
    attention_only = {k: v for k, v in tensors.items() if "img_mlp" not in k}
    assert flux_format.looks_like_flux(_shapes(attention_only))  # indistinguishable from Flux: still Flux

@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"lora_unet_double_blocks_0_img_attn_qkv.dora_scale": torch.ones(48, 1)}, "DoRA"),
        ({"lora_unet_double_blocks_0_img_mlp_0.hada_w1_a": torch.ones(4, 2)}, "LoHa"),
        ({"img_in.lora_B.bias": torch.ones(16)}, "control"),
        ({"single_blocks.0.norm.key_norm.scale": torch.ones(16)}, "control"),
        ({"lora_unet_double_blocks_0_img_attn_qkv.weird": torch.ones(1)}, "unknown tensor"),
        (
            {
                "lora_unet_double_blocks_0_img_attn_nope.lora_down.weight": torch.ones(2, 16),
                "lora_unet_double_blocks_0_img_attn_nope.lora_up.weight": torch.ones(16, 2),
            },
            "names no module",
        ),
        ({"lora_unet_double_blocks_1_img_mlp_0.lora_down.weight": torch.ones(2, 16)}, "missing up"),
        (
            {
                "lora_unet_double_blocks_1_img_mlp_0.lora_down.weight": torch.ones(2, 16),
                "lora_unet_double_blocks_1_img_mlp_0.lora_up.weight": torch.ones(64, 3),
            },
            "mismatched ranks",
        ),
        (
            {
                "lora_unet_double_blocks_1_img_mlp_0.lora_down.weight": torch.full((2, 16), float("nan")),
                "lora_unet_double_blocks_1_img_mlp_0.lora_up.weight": torch.ones(64, 2),
            },
            "NaN",
        ),
        (
            {
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.ones(2, 16),
                "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.ones(48, 2),
            },
            "two entries for the same layer",
        ),
    ],
)
def test_refusals_are_clear(extra, message):
    with pytest.raises(LoraFormatError, match=message) as info:
        read_flux_layers({**_kohya_small(), **extra}, {}, "bad")
    assert "bad.safetensors" in str(info.value)


def test_fused_rows_must_match_the_fused_module():
    bad = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 16),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(40, 2),
    }
    with pytest.raises(LoraFormatError, match="expected 48"):
        read_flux_layers(bad, {}, "b")
    xl = {
        "single_blocks.0.processor.qkv_lora.down.weight": torch.zeros(2, 16),
        "single_blocks.0.processor.qkv_lora.up.weight": torch.zeros(47, 2),
    }
    with pytest.raises(LoraFormatError, match="XLabs"):
        read_flux_layers(xl, {}, "b")
    with pytest.raises(ValueError, match="not a fused"):
        flux_format.split_fused_layer(
            read_flux_layers(_kohya_small(), {}, "k")["transformer/transformer_blocks_0_attn_to_q"]
        )


# ----------------------------------------------------------------------------------------------------
# Row-slice hooks on a real fused Linear equal the split deltas merged into their rows


def test_row_slice_hooks_on_a_fused_qkv_equal_merged_rows():
    from klora.apply import StepClock, Target, attached
    from klora.fusion import make_plan
    from klora.layers import LoraFile
    from klora.options import FusionOptions

    h, r = 64, 4
    qkv = nn.Linear(h, 3 * h)
    with torch.no_grad():
        qkv.weight.copy_(_rand(3 * h, h, seed=20) * 0.05)
        qkv.bias.copy_(_rand(3 * h, seed=21) * 0.05)
    w0, b0 = qkv.weight.detach().clone(), qkv.bias.detach().clone()
    # content: kohya, fused qkv (down shared); style: XLabs qkv_lora1 (converted, down shared too);
    # per-row scales so that q, k and v flip at different steps
    rows_scale = torch.cat([torch.full((h, 1), 3.0), torch.full((h, 1), 1.0), torch.full((h, 1), 0.4)])
    content_sd = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": _rand(r, h, seed=22),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": _rand(3 * h, r, seed=23) * rows_scale,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(2.0),
    }
    style_sd = {
        "double_blocks.0.processor.qkv_lora1.down.weight": _rand(r, h, seed=24),
        "double_blocks.0.processor.qkv_lora1.up.weight": _rand(3 * h, r, seed=25) * 0.5,
    }
    content = LoraFile("c.safetensors", "c", "c" * 64, read_flux_layers(content_sd, {}, "c"))
    style = LoraFile("s.safetensors", "s", "s" * 64, read_flux_layers(style_sd, {}, "s"))
    keys = [f"transformer/transformer_blocks_0_attn_to_{n}" for n in "qkv"]
    assert list(content.layers) == list(style.layers) == keys
    targets = {}
    for key in keys:
        t = flux.bfl_target(key, h, 4 * h)
        assert t.module == "double_blocks.0.img_attn.qkv"
        targets[key] = Target(qkv, t.rows)

    x = _rand(2, 5, h, seed=26)
    for options in (FusionOptions(), FusionOptions(mode="merge"), FusionOptions(pattern="s*")):
        plan = make_plan(content, style, options)
        clock = StepClock()
        seen = set()
        with attached(plan, content, style, targets, clock):
            for step in range(10):
                clock.set_step(step, 10)
                merged = w0.clone()
                for i, key in enumerate(keys):  # Flux's fused layout: q, k, v rows in this order
                    choice = plan.choose(key, clock.tau)
                    rows = slice(i * h, (i + 1) * h)
                    if choice in ("content", "both"):
                        merged[rows] += _delta(content.layers[key])
                    if choice in ("style", "both"):
                        merged[rows] += _delta(style.layers[key])
                seen.add(tuple(plan.choose(k, clock.tau) for k in keys))
                with torch.no_grad():
                    got = qkv(x)
                want = torch.nn.functional.linear(x, merged, b0)
                assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (options, step)
        if options.mode == "klora":
            # the rows really are chosen independently: some step has q, k, v on different sides
            assert any(len(set(c)) > 1 for c in seen), seen
        with torch.no_grad():
            assert torch.equal(qkv(x), torch.nn.functional.linear(x, w0, b0))  # hooks gone
        assert torch.equal(qkv.weight, w0) and torch.equal(qkv.bias, b0)
