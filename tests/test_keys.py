"""klora.keys and klora.keys.sd: SGM ↔ diffusers UNet names and module_targets, against the real diffusers
module trees."""

from __future__ import annotations

import random

import pytest
import torch
from synth import (
    build_unet,
    module_path,
    sd15_unet_config,
    sd15_unet_shapes,
    sdxl_unet_config,
    sdxl_unet_shapes,
    te_layer_shapes,
    tiny_sdxl_unet_config,
    tiny_unet_config,
    tiny_unet_shapes,
)
from torch import nn

from klora.keys import canonical_key, is_attention, layer_order
from klora.keys.sd import (
    diffusers_to_sgm,
    is_sgm_name,
    module_targets,
    sgm_renumbering,
    sgm_to_diffusers,
    up_blocks_with_attention,
)

SD15_UP_ATTN = frozenset({1, 2, 3})
SDXL_UP_ATTN = frozenset({0, 1})

# SGM name → diffusers name, written out by hand from the ldm/SGM UNet layout.
_SGM_TABLE = """
input_blocks_0_0 conv_in
time_embed_0 time_embedding_linear_1
time_embed_2 time_embedding_linear_2
label_emb_0_0 add_embedding_linear_1
label_emb_0_2 add_embedding_linear_2
out_2 conv_out
input_blocks_1_0_in_layers_2 down_blocks_0_resnets_0_conv1
input_blocks_1_0_emb_layers_1 down_blocks_0_resnets_0_time_emb_proj
input_blocks_2_0_out_layers_3 down_blocks_0_resnets_1_conv2
input_blocks_1_1_proj_in down_blocks_0_attentions_0_proj_in
input_blocks_3_0_op down_blocks_0_downsamplers_0_conv
input_blocks_4_0_skip_connection down_blocks_1_resnets_0_conv_shortcut
input_blocks_4_1_transformer_blocks_0_attn1_to_q down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q
input_blocks_5_1_proj_out down_blocks_1_attentions_1_proj_out
middle_block_1_transformer_blocks_0_attn2_to_out_0 mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0
input_blocks_6_0_op down_blocks_1_downsamplers_0_conv
input_blocks_8_1_transformer_blocks_9_attn1_to_v down_blocks_2_attentions_1_transformer_blocks_9_attn1_to_v
middle_block_1_transformer_blocks_2_ff_net_0_proj mid_block_attentions_0_transformer_blocks_2_ff_net_0_proj
input_blocks_11_0_in_layers_2 down_blocks_3_resnets_1_conv1
middle_block_0_in_layers_2 mid_block_resnets_0_conv1
middle_block_1_proj_in mid_block_attentions_0_proj_in
middle_block_1_transformer_blocks_0_attn2_to_k mid_block_attentions_0_transformer_blocks_0_attn2_to_k
middle_block_2_out_layers_3 mid_block_resnets_1_conv2
output_blocks_0_0_skip_connection up_blocks_0_resnets_0_conv_shortcut
output_blocks_2_1_conv up_blocks_0_upsamplers_0_conv  # SD1.5: up block 0 has no attention
output_blocks_2_2_conv up_blocks_0_upsamplers_0_conv  # SDXL: up block 0 has attention
output_blocks_2_1_proj_out up_blocks_0_attentions_2_proj_out
output_blocks_5_2_conv up_blocks_1_upsamplers_0_conv
output_blocks_4_1_transformer_blocks_0_ff_net_2 up_blocks_1_attentions_1_transformer_blocks_0_ff_net_2
output_blocks_8_0_emb_layers_1 up_blocks_2_resnets_2_time_emb_proj
output_blocks_11_1_transformer_blocks_0_attn2_to_v up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v
"""
SGM_TABLE = [tuple(line.split("#")[0].split()) for line in _SGM_TABLE.strip().splitlines()]


@pytest.mark.parametrize(("sgm", "diffusers"), SGM_TABLE)
def test_sgm_table(sgm: str, diffusers: str) -> None:
    assert is_sgm_name(sgm)
    assert not is_sgm_name(diffusers)
    assert sgm_to_diffusers(sgm) == diffusers
    assert canonical_key("unet", sgm) == "unet/" + diffusers
    assert canonical_key("unet", module_path(sgm)) == "unet/" + diffusers  # dotted form too


def test_upsampler_index_depends_on_the_model() -> None:
    assert diffusers_to_sgm("up_blocks_0_upsamplers_0_conv", SD15_UP_ATTN) == "output_blocks_2_1_conv"
    assert diffusers_to_sgm("up_blocks_1_upsamplers_0_conv", SD15_UP_ATTN) == "output_blocks_5_2_conv"
    assert diffusers_to_sgm("up_blocks_0_upsamplers_0_conv", SDXL_UP_ATTN) == "output_blocks_2_2_conv"
    assert diffusers_to_sgm("up_blocks_1_upsamplers_0_conv", SDXL_UP_ATTN) == "output_blocks_5_2_conv"


def test_diffusers_names_pass_through_unchanged() -> None:
    for name in ("down_blocks_1_attentions_0_proj_in", "mid_block_resnets_1_conv2", "conv_out", "other_x"):
        assert sgm_to_diffusers(name) == name


@pytest.mark.parametrize(("which", "cfg", "up_attn", "n_in", "n_out"), [
    ("sd15", sd15_unet_config, SD15_UP_ATTN, 12, 12),
    ("sdxl", sdxl_unet_config, SDXL_UP_ATTN, 9, 9),
])
def test_round_trip_every_module_of_real_unets(which, cfg, up_attn, n_in, n_out) -> None:
    model = build_unet(cfg(), meta=True)
    assert up_blocks_with_attention(model) == up_attn
    names = [n.replace(".", "_") for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    sgm = [diffusers_to_sgm(n, up_attn) for n in names]
    assert len(set(sgm)) == len(names)  # injective
    assert all(is_sgm_name(s) for s in sgm), [s for s in sgm if not is_sgm_name(s)][:5]
    assert [sgm_to_diffusers(s) for s in sgm] == names
    # The SGM block indices span exactly the ldm layout (input_blocks 0..n_in-1, output_blocks 0..n_out-1).
    ins = {int(s.split("_")[2]) for s in sgm if s.startswith("input_blocks_")}
    outs = {int(s.split("_")[2]) for s in sgm if s.startswith("output_blocks_")}
    assert ins == set(range(n_in)) and outs == set(range(n_out))


def test_known_sgm_shapes() -> None:
    """Weight shapes of real SGM checkpoints, looked up through the conversion."""
    sd, xl = sd15_unet_shapes(), sdxl_unet_shapes()
    assert sd[canonical_key("unet", "input_blocks.1.1.proj_in")] == (320, 320, 1, 1)
    assert sd[canonical_key("unet", "output_blocks.11.1.transformer_blocks.0.attn2.to_k")] == (320, 768)
    assert sd[canonical_key("unet", "output_blocks.2.1.conv")] == (1280, 1280, 3, 3)
    assert sd[canonical_key("unet", "input_blocks.9.0.op")] == (1280, 1280, 3, 3)
    assert xl[canonical_key("unet", "input_blocks.4.1.transformer_blocks.0.attn2.to_k")] == (640, 2048)
    assert xl[canonical_key("unet", "middle_block.1.transformer_blocks.9.attn1.to_q")] == (1280, 1280)
    assert xl[canonical_key("unet", "output_blocks.8.0.skip_connection")] == (320, 640, 1, 1)
    assert xl[canonical_key("unet", "input_blocks.3.0.op")] == (320, 320, 3, 3)
    assert xl[canonical_key("unet", "label_emb.0.0")] == (1280, 2816)
    att = [k for k in xl if is_attention(k)]
    assert len(att) == 560
    assert len([k for k in sd if is_attention(k)]) == 128


def test_module_path_inverts_flattening() -> None:
    for shapes in (sd15_unet_shapes(), sdxl_unet_shapes(), tiny_unet_shapes()):
        for key in shapes:
            name = key.split("/", 1)[1]
            assert module_path(name).replace(".", "_") == name
    assert module_path("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0") == \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"


def test_module_targets_diffusers_naming() -> None:
    model = build_unet(tiny_unet_config(), meta=True)
    targets = module_targets(model, "unet", "diffusers")
    assert list(targets) == list(tiny_unet_shapes())
    modules = dict(model.named_modules())
    key = "unet/up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k"
    assert targets[key] is modules["up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k"]
    assert all(isinstance(m, (nn.Linear, nn.Conv2d)) for m in targets.values())


def _tree(names: dict[str, nn.Module]) -> nn.Module:
    """A module tree with the given dotted names (containers are plain Modules)."""
    root = nn.Module()
    for name, mod in names.items():
        node = root
        parts = name.split(".")
        for p in parts[:-1]:
            if not hasattr(node, p):
                node.add_module(p, nn.Module())
            node = getattr(node, p)
        node.add_module(parts[-1], mod)
    return root


def test_module_targets_sgm_naming_matches_diffusers_keys() -> None:
    """An ldm-named tree (the names A1111's sd_model.model.diffusion_model has) maps to the diffusers keys."""
    shapes = sd15_unet_shapes()
    names = {
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q": nn.Linear(640, 640, bias=False),
        "diffusion_model.input_blocks.4.1.proj_in": nn.Conv2d(640, 640, 1, device="meta"),
        "diffusion_model.input_blocks.6.0.op": nn.Conv2d(640, 640, 3, device="meta"),
        "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2": nn.Linear(5120, 1280, device="meta"),
        "diffusion_model.middle_block.0.emb_layers.1": nn.Linear(1280, 1280, device="meta"),
        "diffusion_model.output_blocks.2.1.conv": nn.Conv2d(1280, 1280, 3, device="meta"),
        "diffusion_model.output_blocks.5.2.conv": nn.Conv2d(1280, 1280, 3, device="meta"),
        "diffusion_model.output_blocks.5.1.norm": nn.GroupNorm(32, 1280, device="meta"),
    }
    names["first_stage_model.decoder.conv_in"] = nn.Conv2d(4, 8, 3, device="meta")  # a wrapper's VAE
    targets = module_targets(_tree(names), "unet", "sgm")
    assert set(targets) == {
        "unet/down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
        "unet/down_blocks_1_attentions_0_proj_in",
        "unet/down_blocks_1_downsamplers_0_conv",
        "unet/mid_block_attentions_0_transformer_blocks_0_ff_net_2",
        "unet/mid_block_resnets_0_time_emb_proj",
        "unet/up_blocks_0_upsamplers_0_conv",
        "unet/up_blocks_1_upsamplers_0_conv",
    }
    for key, mod in targets.items():
        assert tuple(mod.weight.shape) == shapes[key], key


def _ldm_unet(num_res_blocks: list[int], channels: int = 32, channel_mult: tuple[int, ...] = (1, 2),
              attention_levels: frozenset[int] = frozenset({1}), context_dim: int = 32) -> nn.Module:
    """An ldm/SGM ``UNetModel`` module tree (meta device, Linear/Conv2d leaves only), from the facts of its
    layout: ``input_blocks``: the input conv, then per level ``num_res_blocks[level]`` blocks (ResBlock
    [+ SpatialTransformer]) and, except at the last level, a Downsample (``op``); ``middle_block``: ResBlock,
    SpatialTransformer, ResBlock; ``output_blocks``: per level, deepest first, ``num_res_blocks[level] + 1``
    blocks whose ResBlock takes the popped skip channels too, the last one (except at level 0) ending in an
    Upsample (``conv``). ResBlock: ``in_layers.2``, ``emb_layers.1``, ``out_layers.3`` and a 1x1
    ``skip_connection`` when the channels change."""
    meta = {"device": "meta"}
    emb = 4 * channels

    def node(**children: nn.Module) -> nn.Module:
        m = nn.Module()
        for name, child in children.items():
            m.add_module(name, child)
        return m

    def seq(modules: dict[int, nn.Module]) -> nn.Module:
        return node(**{str(i): m for i, m in modules.items()})

    def res(cin: int, cout: int) -> nn.Module:
        m = node(in_layers=seq({2: nn.Conv2d(cin, cout, 3, padding=1, **meta)}),
                 emb_layers=seq({1: nn.Linear(emb, cout, **meta)}),
                 out_layers=seq({3: nn.Conv2d(cout, cout, 3, padding=1, **meta)}))
        if cin != cout:
            m.skip_connection = nn.Conv2d(cin, cout, 1, **meta)
        return m

    def attention(c: int, kv: int) -> nn.Module:
        return node(to_q=nn.Linear(c, c, bias=False, **meta), to_k=nn.Linear(kv, c, bias=False, **meta),
                    to_v=nn.Linear(kv, c, bias=False, **meta), to_out=seq({0: nn.Linear(c, c, **meta)}))

    def transformer(c: int) -> nn.Module:
        ff = node(net=seq({0: node(proj=nn.Linear(c, 8 * c, **meta)), 2: nn.Linear(4 * c, c, **meta)}))
        block = node(attn1=attention(c, c), attn2=attention(c, context_dim), ff=ff)
        return node(proj_in=nn.Conv2d(c, c, 1, **meta), transformer_blocks=seq({0: block}),
                    proj_out=nn.Conv2d(c, c, 1, **meta))

    levels = len(channel_mult)
    ch = channels
    inputs = [seq({0: nn.Conv2d(4, ch, 3, padding=1, **meta)})]
    skips = [ch]
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks[level]):
            parts = {0: res(ch, mult * channels)}
            ch = mult * channels
            if level in attention_levels:
                parts[1] = transformer(ch)
            inputs.append(seq(parts))
            skips.append(ch)
        if level < levels - 1:
            inputs.append(seq({0: node(op=nn.Conv2d(ch, ch, 3, stride=2, padding=1, **meta))}))
            skips.append(ch)
    middle = seq({0: res(ch, ch), 1: transformer(ch), 2: res(ch, ch)})
    outputs = []
    for level in reversed(range(levels)):
        for i in range(num_res_blocks[level] + 1):
            parts = {0: res(ch + skips.pop(), channel_mult[level] * channels)}
            ch = channel_mult[level] * channels
            if level in attention_levels:
                parts[1] = transformer(ch)
            if level and i == num_res_blocks[level]:
                parts[len(parts)] = node(conv=nn.Conv2d(ch, ch, 3, padding=1, **meta))
            outputs.append(seq(parts))
    unet = node(time_embed=seq({0: nn.Linear(channels, emb, **meta), 2: nn.Linear(emb, emb, **meta)}),
                input_blocks=seq(dict(enumerate(inputs))), middle_block=middle,
                output_blocks=seq(dict(enumerate(outputs))),
                out=seq({2: nn.Conv2d(channels, 4, 3, padding=1, **meta)}))
    unet.num_res_blocks = list(num_res_blocks)
    unet.channel_mult = list(channel_mult)
    return unet


def _shapes(targets: dict[str, nn.Module]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(m.weight.shape) for k, m in targets.items()}


@pytest.mark.parametrize("per_level", [1, 2])
def test_ldm_unet_maps_like_the_diffusers_unet_with_its_blocks_per_level(per_level: int) -> None:
    """The ldm tree numbered by its own ``num_res_blocks`` gives exactly the keys (and weight shapes) of the
    diffusers UNet built with the same ``layers_per_block``."""
    ldm = _ldm_unet([per_level, per_level])
    diffusers = build_unet({**tiny_unet_config(), "layers_per_block": per_level}, meta=True)
    want = _shapes(module_targets(diffusers, "unet", "diffusers"))
    assert _shapes(module_targets(ldm, "unet", "sgm")) == want
    assert (sgm_renumbering(ldm) is None) == (per_level == 2)


def test_sgm_renumbering_one_block_per_level() -> None:
    renumber = sgm_renumbering(_ldm_unet([1, 1]))
    assert renumber is not None
    assert renumber("input_blocks_2_0_op") == "input_blocks_3_0_op"
    assert renumber("input_blocks_3_1_proj_in") == "input_blocks_4_1_proj_in"
    assert renumber("output_blocks_1_2_conv") == "output_blocks_2_2_conv"  # the upsampler
    assert renumber("output_blocks_1_1_proj_in") == "output_blocks_1_1_proj_in"
    assert renumber("output_blocks_2_0_skip_connection") == "output_blocks_3_0_skip_connection"
    assert renumber("middle_block_1_proj_in") == "middle_block_1_proj_in"
    # A level's third block has no number in the two-block layout.
    three = sgm_renumbering(_ldm_unet([3, 3]))
    assert three is not None and three("input_blocks_3_0_in_layers_2") is None
    assert three("input_blocks_2_0_in_layers_2") == "input_blocks_2_0_in_layers_2"


def test_module_targets_a1111_wrapper_with_one_block_per_level() -> None:
    """A1111 passes ``sd_model.model.diffusion_model``; given the whole wrapper, the ``num_res_blocks`` of its
    ``diffusion_model`` still decides the numbering, and each key lands on the ldm module of its layer."""
    dm = _ldm_unet([1, 1])
    sd_model = nn.Module()
    sd_model.model = nn.Module()
    sd_model.model.diffusion_model = dm
    sd_model.first_stage_model = nn.Module()
    sd_model.first_stage_model.conv_in = nn.Conv2d(4, 8, 3, device="meta")
    targets = module_targets(sd_model, "unet", "sgm")
    diffusers = build_unet({**tiny_unet_config(), "layers_per_block": 1}, meta=True)
    assert _shapes(targets) == _shapes(module_targets(diffusers, "unet", "diffusers"))
    ib, ob = dm.input_blocks, dm.output_blocks
    tb = "transformer_blocks_0"
    assert targets["unet/down_blocks_0_downsamplers_0_conv"] is getattr(ib, "2").get_submodule("0.op")
    assert targets["unet/down_blocks_1_resnets_0_conv1"] is getattr(ib, "3").get_submodule("0.in_layers.2")
    assert targets[f"unet/down_blocks_1_attentions_0_{tb}_attn2_to_k"] is \
        getattr(ib, "3").get_submodule("1.transformer_blocks.0.attn2.to_k")
    assert targets["unet/up_blocks_0_upsamplers_0_conv"] is getattr(ob, "1").get_submodule("2.conv")
    assert targets[f"unet/up_blocks_0_attentions_1_{tb}_attn1_to_v"] is \
        getattr(ob, "1").get_submodule("1.transformer_blocks.0.attn1.to_v")
    assert targets["unet/up_blocks_1_resnets_1_conv2"] is getattr(ob, "3").get_submodule("0.out_layers.3")
    assert "unet/down_blocks_1_resnets_1_conv1" not in targets


def test_module_targets_text_encoders() -> None:
    hf = {  # HF CLIPTextModel names, here under a host wrapper's prefix
        "transformer.text_model.encoder.layers.0.self_attn.q_proj": nn.Linear(8, 8),
        "transformer.text_model.encoder.layers.0.mlp.fc1": nn.Linear(8, 16),
        "transformer.text_model.embeddings.token_embedding": nn.Embedding(10, 8),
    }
    assert set(module_targets(_tree(hf), "te1", "diffusers")) == {
        "te1/text_model_encoder_layers_0_self_attn_q_proj", "te1/text_model_encoder_layers_0_mlp_fc1"}
    openclip = {  # open_clip names (A1111's SDXL te2); attention is an nn.MultiheadAttention
        "model.transformer.resblocks.3.attn": nn.MultiheadAttention(8, 2),
        "model.transformer.resblocks.3.mlp.c_fc": nn.Linear(8, 32),
        "model.transformer.resblocks.3.mlp.c_proj": nn.Linear(32, 8),
    }
    assert set(module_targets(_tree(openclip), "te2", "sgm")) == {
        "te2/text_model_encoder_layers_3_mlp_fc1", "te2/text_model_encoder_layers_3_mlp_fc2"}
    assert module_targets(_tree(openclip), "te2", "diffusers") == {}




@pytest.mark.parametrize("cfg", [tiny_unet_config, tiny_sdxl_unet_config])
def test_layer_order_is_the_forward_order(cfg) -> None:
    """Sorting canonical keys with layer_order gives the order in which a real forward pass calls them."""
    model = build_unet(cfg(), seed=0)
    calls: list[str] = []
    handles = [m.register_forward_hook(lambda *_a, n=n: calls.append(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Conv2d))]
    c = cfg()
    kwargs = {}
    if c.get("addition_embed_type") == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    with torch.no_grad():
        context = torch.randn(1, 7, c["cross_attention_dim"])
        model(torch.randn(1, 4, 32, 32), 10, encoder_hidden_states=context, **kwargs)
    for h in handles:
        h.remove()
    forward = ["unet/" + n.replace(".", "_") for n in dict.fromkeys(calls)]
    assert len(forward) == len(tiny_unet_shapes()) if cfg is tiny_unet_config else len(forward) > 100
    shuffled = forward[:]
    random.Random(0).shuffle(shuffled)
    assert sorted(shuffled, key=layer_order) == forward


def test_layer_order_text_encoders_first() -> None:
    keys = [*te_layer_shapes("te2", layers=2), "unet/conv_in", *te_layer_shapes("te1", layers=11)]
    ordered = sorted(keys, key=layer_order)
    assert ordered[0] == "te1/text_model_encoder_layers_0_self_attn_q_proj"
    assert ordered[5] == "te1/text_model_encoder_layers_0_mlp_fc2"
    assert ordered[6] == "te1/text_model_encoder_layers_1_self_attn_q_proj"
    assert ordered[-1] == "unet/conv_in"
    assert ordered.index("te1/text_model_encoder_layers_10_mlp_fc2") < ordered.index(
        "te2/text_model_encoder_layers_0_self_attn_q_proj")
