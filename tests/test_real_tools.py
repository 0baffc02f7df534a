"""Files written by the tools users train with (PEFT through diffusers' ``save_lora_weights``, LyCORIS'
``create_lycoris``/``save_weights``), read by the engine and the CLI.

* A LyCORIS LoHa stores SD1.5's 1×1 ``proj_in`` convs flattened to ``(r, in)``, PEFT stores them 4-D
  ``(r, in, 1, 1)``: one layer, so such a pair is fused, not refused as "different base models".
* transformers 5 has no ``text_model`` level in ``CLIPTextModel``: PEFT adapters of a text encoder are saved
  as ``text_encoder.encoder.layers.N…``, kohya writes ``lora_te_text_model_encoder_layers_N…``: one key, and
  the model's modules get that key too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import diffusers
import pytest
import torch
import transformers
from diffusers import StableDiffusionPipeline
from lycoris import LycorisNetwork, create_lycoris
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from safetensors.torch import save_file

from klora.cli import main
from klora.formats import read_lora
from klora.keys.sd import module_targets

UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
            norm_num_groups=8)
PROJ_IN = "unet/down_blocks_0_attentions_0_proj_in"


def _unet(seed: int) -> diffusers.UNet2DConditionModel:
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(**UNET)
    assert isinstance(unet.down_blocks[0].attentions[0].proj_in, torch.nn.Conv2d)  # SD1.5: a 1×1 conv
    return unet


def _randomize(params) -> None:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _peft_unet_file(folder: Path) -> Path:
    """LoRA on proj_in and the attention projections, saved as diffusers saves a trained pipeline's LoRA."""
    unet = _unet(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["proj_in", "to_q", "to_k", "to_v"]))
    _randomize(p for n, p in unet.named_parameters() if "lora_" in n)
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              weight_name="peft.safetensors")
    return folder / "peft.safetensors"


def _lycoris_loha_file(folder: Path) -> Path:
    unet = _unet(1)
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    LycorisNetwork.apply_preset({"target_name": [".*proj_in", ".*to_q", ".*to_k", ".*to_v"]})
    try:
        net = create_lycoris(unet, 1.0, linear_dim=4, linear_alpha=2, algo="loha")
    finally:
        LycorisNetwork.apply_preset({"target_name": []})
    net.apply_to()
    _randomize(net.parameters())
    path = folder / "loha.safetensors"
    net.save_weights(str(path), torch.float32, None)
    return path


def test_loha_and_lora_of_one_flattened_1x1_conv_are_one_layer(tmp_path: Path, capsys) -> None:
    peft_path, loha_path = _peft_unet_file(tmp_path), _lycoris_loha_file(tmp_path)
    peft_file, loha_file = read_lora(peft_path), read_lora(loha_path)
    a, b = peft_file.layers[PROJ_IN], loha_file.layers[PROJ_IN]
    assert (len(a.shape), len(b.shape)) == (4, 2) and a.layout == b.layout  # (32, 32, 1, 1) and (32, 32)
    out = tmp_path / "plan.json"
    for pair in ((peft_path, loha_path), (loha_path, peft_path)):
        assert main(["inspect", str(pair[0]), str(pair[1]), "--json", str(out)]) == 0, capsys.readouterr().err
        layers = json.loads(out.read_text())["layers"]
        proj_in = next(v for v in layers.values() if v["key"] == PROJ_IN)
        assert proj_in["source"] == "shared" and proj_in["k"] == 16


def test_text_encoder_layers_with_and_without_text_model_get_one_key(tmp_path: Path) -> None:
    config = transformers.CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         max_position_embeddings=16, bos_token_id=0, eos_token_id=1)
    te = transformers.CLIPTextModel(config)
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"]), te)
    _randomize(p for n, p in te.named_parameters() if "lora_" in n)
    StableDiffusionPipeline.save_lora_weights(tmp_path,
                                              text_encoder_lora_layers=get_peft_model_state_dict(te),
                                              weight_name="te_peft.safetensors")
    peft_keys = set(read_lora(tmp_path / "te_peft.safetensors").layers)
    kohya = {}
    for i in range(2):
        for module, (out, inp) in (("self_attn_q_proj", (32, 32)), ("mlp_fc1", (64, 32))):
            name = f"lora_te_text_model_encoder_layers_{i}_{module}"
            kohya[f"{name}.lora_down.weight"] = torch.randn(2, inp)
            kohya[f"{name}.lora_up.weight"] = torch.randn(out, 2)
    save_file(kohya, str(tmp_path / "te_kohya.safetensors"))
    kohya_keys = set(read_lora(tmp_path / "te_kohya.safetensors").layers)
    assert peft_keys == kohya_keys and "te1/text_model_encoder_layers_1_mlp_fc1" in peft_keys
    plain = transformers.CLIPTextModel(config)  # the text encoder as a pipeline holds it
    assert not any(name.startswith("text_model") for name, _ in plain.named_modules())  # transformers 5
    targets = module_targets(plain, "te1", "diffusers")
    assert kohya_keys <= set(targets)


@pytest.mark.parametrize("spelling", ["te1_text_model", "te1_no_text_model"])
def test_canonical_text_encoder_key(spelling: str) -> None:
    from klora.keys import canonical_key

    path = "encoder.layers.0.mlp.fc2"
    if spelling == "te1_text_model":
        path = "text_model." + path
    assert canonical_key("te1", path) == "te1/text_model_encoder_layers_0_mlp_fc2"
    assert canonical_key("te3", "encoder.block.0.layer.0.SelfAttention.q") == \
        "te3/encoder_block_0_layer_0_SelfAttention_q"  # T5 has no text_model level
