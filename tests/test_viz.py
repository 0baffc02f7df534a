"""klora.viz: model order of layers, the selection map's cells and geometry, the text summary."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageFont
from synth import (
    block_magnitude,
    build_unet,
    te_layer_shapes,
    tiny_unet_config,
    tiny_unet_shapes,
    write_kohya,
    write_peft,
)

from klora import viz
from klora.formats import read_lora
from klora.fusion import Plan, make_plan
from klora.keys import layer_order
from klora.layers import LoraFile
from klora.options import FusionOptions

LETTER = {"content": "C", "style": "S", "both": "B", "none": "-"}
TINY = tiny_unet_shapes()
TE = te_layer_shapes("te1", hidden=32, layers=2, intermediate=64)
# content-only and style-only UNet layers: each file leaves out one block's resnet convs
CONTENT_ONLY = {k for k in TINY if k.startswith("unet/down_blocks_0_resnets_0_")}
STYLE_ONLY = {k for k in TINY if k.startswith("unet/up_blocks_1_resnets_2_")}


def write_pair(d: Path) -> tuple[Path, Path]:
    """An informative pair on the tiny UNet's real key set: content strong in the down blocks (kohya, ranks
    8/4, alpha 4), style strong in the up blocks (PEFT names, rank 4, alpha 8 from metadata)."""
    content = {k: s for k, s in {**TINY, **TE}.items() if k not in STYLE_ONLY}
    style = {k: s for k, s in {**TINY, **TE}.items() if k not in CONTENT_ONLY}
    c = write_kohya(d / "content.safetensors", content, rank=lambda k: 8 if "down_blocks" in k else 4,
                    alpha=4, seed=1, scale_by=block_magnitude(down=1.8, mid=1.0, up=0.7))
    s = write_peft(d / "style.safetensors", style, rank=4, metadata_alpha=8, seed=2,
                   scale_by=block_magnitude(down=0.7, mid=1.0, up=1.8))
    return c, s


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoraFile, LoraFile]:
    c, s = write_pair(tmp_path_factory.mktemp("viz"))
    return read_lora(c), read_lora(s)


def expected_row(plan: Plan, key: str, steps: int) -> str:
    return "".join(LETTER[plan.choose(key, i / steps)] for i in range(steps))


# --------------------------------------------------------------------------------------------- order


def test_layer_order_is_the_forward_pass_order() -> None:
    """Sorting canonical keys gives the order a real UNet calls its Linear/Conv2d modules in."""
    unet = build_unet(tiny_unet_config(), seed=0)
    calls: list[str] = []
    for name, m in unet.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            key = "unet/" + name.replace(".", "_")
            m.register_forward_hook(lambda *_, key=key: calls.append(key))
    with torch.no_grad():
        unet(torch.zeros(1, 4, 32, 32), 10, encoder_hidden_states=torch.zeros(1, 4, 32))
    assert len(calls) == len(set(calls)) == len(TINY)  # every module once
    assert sorted(reversed(list(TINY)), key=layer_order) == calls
    te1 = list(TE)  # HF CLIP layer: q, k, v, out_proj, fc1, fc2
    assert sorted(reversed(te1), key=layer_order) == te1
    te2 = ["te2/" + k.partition("/")[2] for k in te1]
    assert sorted(te2 + calls + te1, key=layer_order) == te1 + te2 + calls  # the prompt is encoded first
    # the map shows the denoiser's rows first, the text encoders' (constant over the steps) after
    plan = SimpleNamespace(layers=dict.fromkeys(te2 + calls + te1))
    assert viz.ordered_keys(plan) == calls + te1 + te2


def test_flux_layer_order_is_the_forward_pass_order() -> None:
    """The same for a tiny diffusers Flux transformer (two double and two single blocks, guidance)."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
        guidance_embeds=True).eval()
    calls: list[str] = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            key = "transformer/" + name.replace(".", "_")
            m.register_forward_hook(lambda *_, key=key: calls.append(key))
    with torch.no_grad():
        model(hidden_states=torch.randn(1, 16, 4), encoder_hidden_states=torch.randn(1, 8, 32),
              pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3),
              txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))
    assert len(calls) == len(set(calls)) > 40
    assert sorted(reversed(calls), key=layer_order) == calls
    blocks = [b for b, _ in itertools.groupby(viz.block_of(k) for k in calls)]
    assert blocks == ["in", "double", "single", "out"]


@pytest.mark.parametrize(("key", "block"), [
    ("unet/down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", "down 1"),
    ("unet/down_blocks_0_downsamplers_0_conv", "down 0"),
    ("unet/mid_block_resnets_1_conv2", "mid"),
    ("unet/up_blocks_2_attentions_1_proj_out", "up 2"),
    ("unet/conv_in", "in"),
    ("unet/time_embedding_linear_1", "in"),
    ("unet/conv_out", "out"),
    ("te1/text_model_encoder_layers_3_mlp_fc1", "TE1"),
    ("te2/text_model_encoder_layers_31_self_attn_k_proj", "TE2"),
    ("te3/encoder_block_0_layer_0_SelfAttention_q", "TE3"),
    ("transformer/transformer_blocks_3_attn_to_q", "double"),
    ("transformer/double_blocks_3_img_attn_qkv", "double"),
    ("transformer/single_transformer_blocks_30_proj_mlp", "single"),
    ("transformer/final_layer_adaLN_modulation_1", "out"),
    ("transformer/x_embedder", "in"),
])
def test_block_of(key: str, block: str) -> None:
    assert viz.block_of(key) == block


# ----------------------------------------------------------------------------------------------- map


def _grid_colour_counts(image: Image.Image, layout: viz.MapLayout, steps: int) -> dict[tuple, int]:
    box = (layout.grid_x, layout.grid_top, layout.grid_x + steps * layout.cell_w, layout.grid_bottom)
    region = image.crop(box)
    return {colour: n for n, colour in region.getcolors(region.width * region.height)}


@pytest.mark.parametrize(("options", "letters"), [
    (FusionOptions(), "CSB"),
    (FusionOptions(pattern="s*", te="none", scope="attention"), "CSB-"),
    (FusionOptions(mode="random", seed=3, te="style"), "CS"),
])
def test_map_cells_show_the_choices(files, options: FusionOptions, letters: str) -> None:
    plan = make_plan(*files, options)
    steps = 12
    image = viz.render_selection_map(plan, steps, title="test")
    layout = viz.map_layout(plan, steps, title="test")
    assert image.size == (layout.width, layout.height)
    rows = {key: expected_row(plan, key, steps) for key in plan.layers}
    assert set(letters) <= set("".join(rows.values())), "the case must show these choices"
    px = image.load()
    for key, row in rows.items():
        for i, letter in enumerate(row):
            assert px[layout.cell_center(key, i)] == viz.COLORS[letter], (key, i)
    # nothing else inside the grid's box is drawn in a choice colour: every cell is exactly cell_w × row_h
    counts = _grid_colour_counts(image, layout, steps)
    area = layout.cell_w * layout.row_h
    for letter, colour in viz.COLORS.items():
        assert counts.get(colour, 0) == area * sum(r.count(letter) for r in rows.values()), letter
    assert len(set(viz.COLORS.values())) == 4


def test_map_rows_follow_model_order_in_labelled_blocks(files) -> None:
    plan = make_plan(*files, FusionOptions())
    layout = viz.map_layout(plan, 30)
    order = sorted(plan.layers, key=lambda k: layout.row_y[k])
    assert order == viz.ordered_keys(plan)
    assert order[0].startswith("unet/") and order[-1].startswith("te1/")
    ys = [layout.row_y[k] for k in order]
    assert all(b - a >= layout.row_h for a, b in itertools.pairwise(ys))
    spans = layout.block_spans
    assert [name for name, *_ in spans] == ["in", "down 0", "down 1", "mid", "up 0", "up 1", "out", "TE1"]
    assert all(prev[2] < nxt[1] for prev, nxt in itertools.pairwise(spans))  # a gap between blocks
    for name, top, bottom in spans:
        keys = [k for k in order if viz.block_of(k) == name]
        assert (top, bottom) == (layout.row_y[keys[0]], layout.row_y[keys[-1]] + layout.row_h)


@pytest.mark.parametrize("steps", [1, 7, 30, 50, 200, 1000])
def test_map_size_grows_with_steps_and_layers(files, steps: int) -> None:
    plan = make_plan(*files, FusionOptions())
    image = viz.render_selection_map(plan, steps)
    layout = viz.map_layout(plan, steps)
    n = len(plan.layers)
    assert image.width >= 600
    assert layout.cell_w >= 1 and steps * layout.cell_w >= 600
    assert layout.grid_x + steps * layout.cell_w <= image.width
    gaps = layout.grid_bottom - layout.grid_top - n * layout.row_h
    assert 0 < gaps <= 12 * len(layout.block_spans)
    assert layout.row_h > 1  # 141 layers: taller rows
    assert layout.grid_bottom < image.height


def test_map_of_many_layers_uses_one_pixel_rows(tmp_path: Path) -> None:
    """780 text-encoder layers (real key names, tiny shapes): one row per layer, each 1 px."""
    big = te_layer_shapes("te2", hidden=8, layers=130, intermediate=16)
    c = read_lora(write_kohya(tmp_path / "c.safetensors", {**TINY, **big}, rank=2, seed=1))
    s = read_lora(write_kohya(tmp_path / "s.safetensors", {**TINY, **big}, rank=2, seed=2))
    plan = make_plan(c, s, FusionOptions())
    steps = 25
    image = viz.render_selection_map(plan, steps)
    layout = viz.map_layout(plan, steps)
    assert layout.row_h == 1 and len(plan.layers) == len(TINY) + 780
    assert len(set(layout.row_y.values())) == len(plan.layers)
    assert image.height >= len(plan.layers)
    px = image.load()
    for key in list(plan.layers)[::7]:
        for i in range(0, steps, 4):
            assert px[layout.cell_center(key, i)] == viz.COLORS[LETTER[plan.choose(key, i / steps)]]


def test_title_changes_only_the_header(files) -> None:
    plan = make_plan(*files, FusionOptions())
    a = viz.render_selection_map(plan, 10, title="first title")
    b = viz.render_selection_map(plan, 10, title="another, longer title: γ → 日本")  # not Latin-1: replaced
    layout = viz.map_layout(plan, 10)
    assert a.size == b.size
    pa, pb = a.load(), b.load()
    diff = [(x, y) for y in range(a.height) for x in range(a.width) if pa[x, y] != pb[x, y]]
    assert diff and max(y for _, y in diff) < layout.grid_top


def test_map_with_pillow_without_font_sizes(files, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow < 10.1 (A1111 ships 9.5): ``load_default()`` takes no size; the bitmap font is used."""
    bitmap = getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)

    def old_load_default():  # the signature of Pillow 9.5's ImageFont.load_default: no size
        return bitmap()

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    plan = make_plan(*files, FusionOptions())
    image = viz.render_selection_map(plan, 9, title="K-LoRA γ")
    layout = viz.map_layout(plan, 9)
    key = viz.ordered_keys(plan)[-1]
    assert image.getpixel(layout.cell_center(key, 8)) == viz.COLORS[LETTER[plan.choose(key, 8 / 9)]]


def test_render_rejects_no_steps(files) -> None:
    plan = make_plan(*files, FusionOptions())
    with pytest.raises(ValueError):
        viz.render_selection_map(plan, 0)
    with pytest.raises(ValueError):
        viz.summarize(plan, 0)


# ------------------------------------------------------------------------------------------- summary


def _block_lines(text: str) -> dict[str, str]:
    lines = text.split("flips by block", 1)[1].splitlines()[1:]
    return {m.group(1): m.group(2) for m in (re.match(r"  (.+?): (.*)$", line) for line in lines) if m}


@pytest.mark.parametrize("options", [FusionOptions(), FusionOptions(pattern="s*", gamma="paper"),
                                     FusionOptions(gamma=0.5, te="content")])
def test_summary_reports_the_plan(files, options: FusionOptions) -> None:
    content, style = files
    plan = make_plan(content, style, options)
    steps = 24
    text = viz.summarize(plan, steps)
    shared = set(content.layers) & set(style.layers)
    assert re.search(rf"\b{len(shared)} shared\b", text)
    assert f"{len(CONTENT_ONLY)} content only" in text and f"{len(STYLE_ONLY)} style only" in text
    ks = [min(content.layers[k].rank * style.layers[k].rank, math.prod(content.layers[k].shape))
          for k in shared if k.startswith("unet/")]
    assert f"K {min(ks)}–{max(ks)}" in text
    assert f"gamma {plan.gamma:.4g} ({plan.gamma_method}" in text
    assert plan.gamma_method == {"auto": "auto", "paper": "paper"}.get(str(options.gamma), "manual")
    beta = 1.275 if options.pattern == "s*" else 0.5
    assert f"= 1.5·tau + {beta:g}" in text and (("mod 1.5" in text) == (options.pattern == "s*"))
    assert f"te {options.te}" in text

    # content share at step 0 and the last step, over the UNet layers both files have
    decided = [k for k in shared if k.startswith("unet/")]
    for i in (0, steps - 1):
        share = sum(plan.choose(k, i / steps) == "content" for k in decided) / len(decided)
        assert f"{i}:{share:.0%}" in text

    # every block: layer count, each kind of flip with its first/last step and layer count
    blocks = _block_lines(text)
    assert list(blocks) == [name for name, _ in viz.blocks(plan)]
    flipped_somewhere = False
    for name, line in blocks.items():
        keys = [k for k in plan.layers if viz.block_of(k) == name]
        assert line.startswith(f"{len(keys)} layer")
        seen: dict[tuple[str, str], list[int]] = {}
        for k in keys:
            row = expected_row(plan, k, steps)
            for i in range(1, steps):
                if row[i] != row[i - 1]:
                    seen.setdefault((row[i - 1], row[i]), []).append(i)
        reported = re.findall(r"(\S)→(\S) at steps? (\d+)(?:–(\d+))? \((\d+) layers?\)", line)
        got = {(a, b): (int(lo), int(hi or lo), int(n)) for a, b, lo, hi, n in reported}
        assert got == {ab: (min(v), max(v), len(v)) for ab, v in seen.items()}, name
        flipped_somewhere |= bool(seen)
    assert flipped_somewhere, "the pair must make some layer flip"
    if options.pattern == "s":
        assert all(ab == ("C", "S") for line in blocks.values()
                   for ab in re.findall(r"(\S)→(\S)", line))


# ---------------------------------------------------------------------------------------------- fonts


def test_map_text_is_scalable_on_old_pillow_with_the_webui_font(monkeypatch, tmp_path) -> None:
    """A1111 1.10 pins Pillow 9.5, whose load_default() takes no size (a tiny bitmap font): the map then draws
    with the webui's TrueType font, at the map's sizes, with τ and γ; without any TrueType font it still
    draws, spelling the symbols out."""
    from PIL import ImageFont

    def old_load_default(*args, **kwargs):  # Pillow < 10.1: PIL/ImageFont.py load_default(): bitmap only
        if args or kwargs:
            raise TypeError("load_default() got an unexpected keyword argument 'size'")
        return ImageFont.load_default_imagefont()

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)
    monkeypatch.setattr(viz, "_SYSTEM_FONTS", ())
    monkeypatch.setattr(viz, "_WEBUI_FONT", tmp_path / "none.ttf")
    monkeypatch.setattr(viz, "_font_files", [])
    viz._font.cache_clear()
    try:
        bitmap = viz._font(16)
        assert not isinstance(bitmap, ImageFont.FreeTypeFont)
        assert viz._drawable("τ = i/8, γ 1.2", bitmap) == "tau = i/8, gamma 1.2"
        dejavu = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
        if not Path(dejavu).exists():
            pytest.skip("no DejaVu font on this machine to stand in for the webui's Roboto")
        viz.use_font(dejavu)
        font = viz._font(16)
        assert isinstance(font, ImageFont.FreeTypeFont) and font.size == 16
        assert viz._drawable("τ = i/8, γ 1.2", font) == "τ = i/8, γ 1.2"
        assert font.getbbox("Ag")[3] >= 14  # readable: about 16 px, not the bitmap's 11
    finally:
        viz._font.cache_clear()

