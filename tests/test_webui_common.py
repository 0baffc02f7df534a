"""The host-neutral webui layer: argument model, API list/dict args, <klora> tag, infotext, paste, XYZ, UI.

No webui and no gradio here. Where the code meets the webui, small doubles stand in, each kept to the real
A1111 1.10.1 (commit 82a973c0) signature and citing the file and function it mirrors.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import types
from copy import copy
from dataclasses import fields, replace
from pathlib import Path

import pytest

from klora import options
from klora.webui import api, infotext, panel, xyz
from klora.webui import args as args_mod
from klora.webui import tag as tag_mod
from klora.webui.args import ARG_NAMES, KLoraArgs, KLoraArgsError
from klora.webui.infotext import INFOTEXT_HASHES_KEY, INFOTEXT_KEY
from klora.webui.tag import TagError

# ----------------------------------------------------------------------------------------------------------
# the A1111 double's tag parsing and infotext (tests/doubles/a1111)

DOUBLE = Path(__file__).resolve().parent / "doubles" / "a1111"


def _a1111_text_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """``modules.extra_networks`` and ``modules.infotext_utils`` of the A1111 double, imported with the double
    on ``sys.path`` for the moment; ``sys.modules`` is restored, so the host tests still import the double
    afresh."""
    saved = {k: sys.modules.pop(k) for k in list(sys.modules) if k.split(".")[0] == "modules"}
    sys.path.insert(0, str(DOUBLE))
    try:
        import modules.extra_networks
        import modules.infotext_utils

        return modules.extra_networks, modules.infotext_utils
    finally:
        sys.path.remove(str(DOUBLE))
        for k in [k for k in sys.modules if k.split(".")[0] == "modules"]:
            del sys.modules[k]
        sys.modules.update(saved)


extra_networks, infotext_utils = _a1111_text_modules()


def tags_in(prompt: str, name: str = "klora") -> list:
    """The params of every <name:...> tag, as the webui's ``parse_prompt`` gives them to the extra network."""
    return extra_networks.parse_prompt(prompt)[1].get(name, [])


def a1111_create_infotext(prompt: str, generation_params: dict) -> str:
    """The text assembly of modules/processing.py ``create_infotext`` (None values dropped, values quoted)."""
    text = ", ".join([k if k == v else f"{k}: {infotext_utils.quote(v)}" for k, v in generation_params.items()
                      if v is not None])
    return f"{prompt}\n{text}".strip()


def through_a1111(value: str | None, hashes: str | None = None) -> dict:
    params = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7, "Seed": 1234, "Size": "512x512",
              INFOTEXT_KEY: value, INFOTEXT_HASHES_KEY: hashes, "Version": "v1.10.1"}
    return infotext_utils.parse_generation_parameters(a1111_create_infotext("a dog, <klora:dog:wc>", params))


# ----------------------------------------------------------------------------------------------------------
# argument model


def test_arg_names_are_the_fields_in_order():
    assert tuple(f.name for f in fields(KLoraArgs) if f.name != "given") == ARG_NAMES
    # the API's positional list: the first release's 14 in their order, later options after them
    assert ARG_NAMES[:14] == ("enabled", "content", "style", "content_strength", "style_strength", "pattern",
                              "alpha", "beta", "gamma", "gamma_value", "mode", "scope", "te", "show_map")
    assert len(KLoraArgs().to_ui_values()) == len(ARG_NAMES)


def test_pattern_defaults_resolve():
    assert (KLoraArgs().resolved_alpha, KLoraArgs().resolved_beta) == (1.5, 0.5)
    star = KLoraArgs(pattern="s*")
    assert (star.resolved_alpha, star.resolved_beta) == (1.5, 1.275)
    assert KLoraArgs(pattern="s*", beta=0.9).resolved_beta == 0.9
    assert KLoraArgs(alpha=2.0).resolved() == KLoraArgs(alpha=2.0, beta=0.5)


def test_ints_become_floats():
    args = KLoraArgs(content_strength=1, alpha=2, gamma_value=3)
    assert isinstance(args.content_strength, float) and isinstance(args.alpha, float)
    assert isinstance(args.gamma_value, float)


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"enabled": "yes"}, "enabled"),
    ({"show_map": 1}, "show_map"),
    ({"content": 3}, "content"),
    ({"pattern": "s (paper)"}, "pattern"),  # the constructor wants codes; labels go through from_script_args
    ({"mode": "K-LoRA"}, "mode"),
    ({"scope": "attn"}, "scope"),
    ({"te": "all"}, "te"),
    ({"gamma": 2.0}, "gamma"),
    ({"content_strength": float("nan")}, "content_strength"),
    ({"style_strength": float("inf")}, "style_strength"),
    ({"alpha": True}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"beta": -1.0}, "beta"),
    ({"gamma_value": 0.0}, "gamma_value"),
    ({"gamma_value": -2.0}, "gamma_value"),
    ({"pattern": "s*", "alpha": 0.0}, "alpha"),
])
def test_constructor_rejects(kwargs, field):
    with pytest.raises(KLoraArgsError) as err:
        KLoraArgs(**kwargs)
    assert err.value.field == field
    assert field in str(err.value)


def test_alpha_zero_is_fine_for_pattern_s():
    assert KLoraArgs(alpha=0.0).resolved_alpha == 0.0


@pytest.mark.parametrize(("content", "style", "missing"), [
    ("", "wc", "content"), ("dog", "", "style"), ("", "", "content"),
])
def test_require_pair(content, style, missing):
    with pytest.raises(KLoraArgsError) as err:
        KLoraArgs(enabled=True, content=content, style=style).require_pair()
    assert err.value.field == missing
    assert f"{missing} LoRA" in str(err.value)
    if not content and not style:
        assert "no content LoRA and no style LoRA" in str(err.value)


def test_require_pair_returns_args():
    args = KLoraArgs(enabled=True, content="dog", style="wc")
    assert args.require_pair() is args


def test_fusion_options_fields():
    args = KLoraArgs(content="a", style="b", pattern="s*", gamma="manual", gamma_value=2.5, mode="topk",
                     scope="attention", te="style", content_strength=0.8, style_strength=1.2)
    assert args.to_fusion_options(seed=42) == options.FusionOptions(
        pattern="s*", alpha=1.5, beta=1.275, gamma=2.5, mode="topk", scope="attention", te="style",
        content_strength=0.8, style_strength=1.2, seed=42)
    assert KLoraArgs(gamma="paper").to_fusion_options(0).gamma == "paper"
    assert KLoraArgs().to_fusion_options(0).gamma == "auto"


def test_to_fusion_options():
    from klora import options as fusion
    args = KLoraArgs(content="a", style="b", pattern="s*", beta=1.0, gamma="manual", gamma_value=2.0,
                     mode="random", te="none")
    options = args.to_fusion_options(seed=7)
    assert isinstance(options, fusion.FusionOptions)
    assert (options.pattern, options.alpha, options.beta, options.gamma) == ("s*", 1.5, 1.0, 2.0)
    assert (options.mode, options.scope, options.te, options.seed) == ("random", "all", "none", 7)
    assert (options.content_strength, options.style_strength) == (1.0, 1.0)


def test_module_imports_without_webui_or_gradio():
    code = ("import sys, klora.webui.args, klora.webui.tag, klora.webui.infotext, klora.webui.xyz, "
            "klora.webui.api, klora.webui.panel; "
            "bad = [m for m in ('gradio', 'modules', 'torch') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------------------
# script args: positional list and dict


def test_full_positional_list_of_panel_values():
    values = [True, "dog", "watercolor", 0.8, 1.1, "s* (official)", 1.5, 1.0, "manual", 2.5, "Top-K only",
              "Attention only", "Content", True, -0.25, 64]
    args = args_mod.from_script_args(tuple(values))
    assert args == KLoraArgs(True, "dog", "watercolor", 0.8, 1.1, "s*", 1.5, 1.0, "manual", 2.5, "topk",
                             "attention", "content", True, -0.25, 64)
    assert args.to_ui_values() == values
    # the first release's 14 values still mean what they meant (balance 0, K from the ranks)
    assert args_mod.from_script_args(values[:14]) == replace(args, balance=0.0, k=None)


def test_positional_codes_are_accepted_too():
    args = args_mod.from_script_args([True, "a", "b", 1, 1, "s*", None, None, "paper", 1, "merge", "all",
                                      "none"])
    assert (args.pattern, args.alpha, args.beta, args.gamma, args.mode, args.te) == \
        ("s*", None, None, "paper", "merge", "none")
    assert args.resolved_beta == 1.275


def test_short_positional_list_takes_defaults():
    assert args_mod.from_script_args([True, "dog", "wc"]) == KLoraArgs(enabled=True, content="dog",
                                                                         style="wc")
    assert args_mod.from_script_args([]) == KLoraArgs()
    assert args_mod.from_script_args([False]) == KLoraArgs()


def test_none_in_the_list_means_default():
    args = args_mod.from_script_args([True, "dog", "wc", None, 0.5, None])
    assert (args.content_strength, args.style_strength, args.pattern) == (1.0, 0.5, "s")


def test_default_panel_values_round_trip():
    assert args_mod.from_script_args(KLoraArgs().to_ui_values()) == KLoraArgs().resolved()
    star = KLoraArgs(pattern="s*")
    assert args_mod.from_script_args(star.to_ui_values()) == star.resolved()


def test_none_dropdown_value_is_no_lora():
    args = args_mod.from_script_args([True, "None", " None "])
    assert (args.content, args.style) == ("", "")


def test_gamma_number_at_gamma_position_beats_gamma_value_position():
    args = args_mod.from_script_args([True, "a", "b", 1, 1, "s", 1.5, 0.5, 3.0, 1.0])
    assert (args.gamma, args.gamma_value) == ("manual", 3.0)


def test_too_long_list():
    with pytest.raises(KLoraArgsError, match=f"at most {len(ARG_NAMES)}"):
        args_mod.from_script_args([False] * (len(ARG_NAMES) + 1))


@pytest.mark.parametrize("bad", ["dog", b"x", 3, None])
def test_not_a_list_or_dict(bad):
    with pytest.raises(KLoraArgsError, match="list or a dict"):
        args_mod.from_script_args(bad)


def test_api_form_list_holding_one_dict():
    defaults = KLoraArgs().to_ui_values()
    payload = [{"content": "dog", "style": "watercolor"}, *defaults[1:]]
    args = args_mod.from_script_args(payload)
    assert args == KLoraArgs(enabled=True, content="dog", style="watercolor")
    assert args_mod.from_script_args([{"content": "dog", "style": "watercolor"}]) == args
    assert args_mod.from_script_args({"content": "dog", "style": "watercolor"}) == args


def test_dict_every_field_and_alias():
    args = args_mod.from_script_args([{
        "enable": True, "content_lora": "dog", "style_lora": "wc", "cw": 0.7, "sw": "1.3", "pattern": "s*",
        "alpha": "2", "beta": 1, "gamma": "paper", "mode": "Fixed schedule", "scope": "attn",
        "text_encoder": "style only", "map": "yes"}])
    assert args == KLoraArgs(True, "dog", "wc", 0.7, 1.3, "s*", 2.0, 1.0, "paper", 1.0, "fixed", "attention",
                             "style", True)
    assert args_mod.from_dict({"content_weight": 2, "style_weight": 3}).content_strength == 2.0


def test_dict_enabled_false_and_null_alpha():
    args = args_mod.from_dict({"enabled": False, "content": "a", "style": "b", "pattern": "s*", "alpha": None,
                        "beta": None})
    assert not args.enabled and args.alpha is None and args.resolved_beta == 1.275


def test_dict_pattern_without_beta_uses_pattern_default():
    assert args_mod.from_dict({"content": "a", "style": "b", "pattern": "s*"}).resolved_beta == 1.275


def test_dict_gamma_number_and_manual():
    assert args_mod.from_dict({"gamma": 2.5}).gamma_option == 2.5
    assert args_mod.from_dict({"gamma": "2.5"}).gamma_option == 2.5
    assert args_mod.from_dict({"gamma": "manual", "gamma_value": 4}).gamma_option == 4.0
    assert args_mod.from_dict({"gamma_value": 4, "gamma": "manual"}).gamma_option == 4.0
    for data in ({"gamma": 2.0, "gamma_value": 3.0}, {"gamma_value": 3.0, "gamma": 2.0}):
        with pytest.raises(KLoraArgsError, match="give one"):
            args_mod.from_dict(data)


def test_dict_unknown_key_names_it_and_the_known_ones():
    with pytest.raises(KLoraArgsError) as err:
        args_mod.from_script_args([{"content": "a", "colour": "red"}])
    message = str(err.value)
    assert "'colour'" in message and "content_strength" in message and "cw" in message


def test_dict_key_given_twice_through_an_alias():
    with pytest.raises(KLoraArgsError, match="given twice"):
        args_mod.from_dict({"cw": 1, "content_strength": 2})


def test_dict_non_string_key():
    with pytest.raises(KLoraArgsError, match="unknown"):
        args_mod.from_dict({1: "a"})


@pytest.mark.parametrize(("key", "value", "expect"), [
    ("enabled", "maybe", "true or false"),
    ("enabled", 2, "true or false"),
    ("show_map", [], "true or false"),
    ("content", 5, "LoRA name"),
    ("style", ["a"], "LoRA name"),
    ("content_strength", "strong", "finite number"),
    ("style_strength", float("nan"), "finite number"),
    ("style_strength", True, "finite number"),
    ("alpha", "fast", "finite number"),
    ("alpha", -1, "≥ 0"),
    ("beta", "inf", "finite number"),
    ("beta", -0.5, "≥ 0"),
    ("pattern", "z", "s, s*"),
    ("pattern", 1, "s, s*"),
    ("gamma", "sometimes", "auto, paper, manual or a number"),
    ("gamma", 0, "> 0"),
    ("gamma", "-1", "> 0"),
    ("gamma", True, "auto, paper, manual or a number"),
    ("gamma_value", 0, "> 0"),
    ("gamma_value", "x", "finite number"),
    ("mode", "best", "klora, topk, fixed, random, merge"),
    ("scope", "everything", "all, attention"),
    ("te", "clip", "both, content, style, none"),
])
def test_bad_values_name_the_field_and_the_allowed_values(key, value, expect):
    for payload in ([{key: value}], _positional(key, value)):
        with pytest.raises(KLoraArgsError) as err:
            args_mod.from_script_args(payload)
        assert expect in str(err.value)
        assert key in str(err.value)


def _positional(key, value):
    values = KLoraArgs().to_ui_values()
    values[ARG_NAMES.index(key)] = value
    return values


def test_choice_errors_list_panel_labels_too():
    with pytest.raises(KLoraArgsError) as err:
        args_mod.from_dict({"mode": "best"})
    assert "'Top-K only'" in str(err.value) and "'Direct merge'" in str(err.value)


@pytest.mark.parametrize(("field", "text", "code"), [
    ("mode", "k-lora", "klora"), ("mode", "TOP-K", "topk"), ("mode", "top_k only", "topk"),
    ("mode", "direct", "merge"), ("mode", "Direct merge", "merge"), ("mode", "fixed", "fixed"),
    ("pattern", "S*", "s*"), ("pattern", "s* (official)", "s*"), ("pattern", "s", "s"),
    ("scope", "Attention only", "attention"), ("scope", "all layers", "all"),
    ("te", "content only", "content"), ("te", "NONE", "none"), ("te", "Neither", "none"),
    ("gamma", "Paper (eq. 9)", "paper"), ("gamma", "AUTO", "auto"),
])
def test_choice_spellings(field, text, code):
    assert getattr(args_mod.from_dict({field: text}), field) == code


def test_to_dict_round_trip():
    args = KLoraArgs(True, "dog", "wc", 0.5, 1.5, "s*", None, 2.0, "manual", 3.0, "random", "attention",
                     "none", True)
    assert args_mod.from_script_args([args.to_dict()]) == args


# ----------------------------------------------------------------------------------------------------------
# the tag


def test_tag_basic():
    args = tag_mod.parse_tag(tags_in("a dog <klora:dog:watercolor> in a park"))
    assert args == KLoraArgs(enabled=True, content="dog", style="watercolor")
    assert args.given == {"enabled", "content", "style"}


def test_no_tag():
    assert tag_mod.parse_tag([]) is None
    assert tag_mod.parse_tag(None) is None


def test_tag_every_option():
    prompt = ("<klora:dog:wc:cw=0.8:sw=1.2:alpha=2:beta=0.75:pattern=s*:gamma=paper:mode=topk:"
              "scope=attention:te=content:map=yes>")
    args = tag_mod.parse_tag(tags_in(prompt))
    assert args == KLoraArgs(True, "dog", "wc", 0.8, 1.2, "s*", 2.0, 0.75, "paper", 1.0, "topk", "attention",
                             "content", True)


def test_tag_long_names_and_gamma_number():
    args = tag_mod.parse_tag(tags_in("<klora:dog:wc:content_strength=0.5:style_strength=2:gamma=2.25>"))
    assert (args.content_strength, args.style_strength, args.gamma, args.gamma_value) == \
        (0.5, 2.0, "manual", 2.25)
    assert {"gamma", "gamma_value"} <= args.given


def test_tag_positional_strengths():
    args = tag_mod.parse_tag(tags_in("<klora:dog:wc:0.6>"))
    assert (args.content_strength, args.style_strength) == (0.6, 1.0)
    args = tag_mod.parse_tag(tags_in("<klora:dog:wc:0.6:1.4:mode=merge>"))
    assert (args.content_strength, args.style_strength, args.mode) == (0.6, 1.4, "merge")


def test_tag_spaces_are_trimmed():
    args = tag_mod.parse_tag(tags_in("<klora: my dog : water color : alpha = 2 >"))
    assert (args.content, args.style, args.alpha) == ("my dog", "water color", 2.0)


def test_tag_without_named_attributes_is_read_from_items():
    params = types.SimpleNamespace(items=["dog", "wc", "beta=1"])
    assert tag_mod.parse_tag([params]).beta == 1.0
    params = types.SimpleNamespace(positional=["dog", "wc"], named={"beta": "1"})
    assert tag_mod.parse_tag([params]).beta == 1.0


@pytest.mark.parametrize(("prompt", "expect"), [
    ("<klora:dog>", "needs two LoRA names"),
    ("<klora:dog:alpha=2>", "needs two LoRA names"),
    ("<klora::wc>", "content LoRA name is empty"),
    ("<klora:dog: >", "style LoRA name is empty"),
    ("<klora:None:wc>", "content LoRA name is empty"),
    ("<klora:dog:wc:1:1:1>", "too many items"),
    ("<klora:dog:wc:strong>", "content_strength"),
    ("<klora:dog:wc:1:weak>", "style_strength"),
    ("<klora:dog:wc:0.5:cw=1>", "given twice"),
    ("<klora:dog:wc:alpha=1:alpha=2>", "given twice"),
    ("<klora:dog:wc:cw=1:content_strength=2>", "given twice"),
    ("<klora:dog:wc:colour=red>", "unknown option 'colour'"),
    ("<klora:dog:wc:enabled=no>", "unknown option 'enabled'"),
    ("<klora:dog:wc:content=cat>", "unknown option 'content'"),
    ("<klora:a=b:wc>", "one '='"),
    ("<klora:dog:wc:alpha=fast>", "alpha"),
    ("<klora:dog:wc:alpha=-1>", "≥ 0"),
    ("<klora:dog:wc:beta=nan>", "beta"),
    ("<klora:dog:wc:pattern=q>", "s, s*"),
    ("<klora:dog:wc:gamma=-2>", "> 0"),
    ("<klora:dog:wc:gamma=often>", "auto, paper, manual or a number"),
    ("<klora:dog:wc:mode=best>", "klora, topk"),
    ("<klora:dog:wc:scope=most>", "all, attention"),
    ("<klora:dog:wc:te=clip>", "both, content, style, none"),
    ("<klora:dog:wc:map=perhaps>", "true or false"),
    ("<klora:dog:wc:pattern=s*:alpha=0>", "> 0"),
])
def test_tag_errors(prompt, expect):
    with pytest.raises(TagError) as err:
        tag_mod.parse_tag(tags_in(prompt))
    assert expect in str(err.value)
    assert isinstance(err.value, KLoraArgsError)
    if "needs two" not in expect:
        assert prompt.replace(" >", ">").split(":")[0] in str(err.value)


def test_two_tags_is_an_error_naming_both():
    with pytest.raises(TagError) as err:
        tag_mod.parse_tag(tags_in("<klora:dog:wc> and <klora:cat:oil:alpha=2>"))
    message = str(err.value)
    assert "2 <klora> tags" in message and "<klora:dog:wc>" in message
    assert "<klora:cat:oil:alpha=2>" in message
    # the host adds "The image was made without K-LoRA." to every tag error: not said here a second time
    assert "without K-LoRA" not in message and message.endswith("use only one.")


def test_format_tag_round_trip():
    for args in (KLoraArgs(True, "dog", "wc"),
                 KLoraArgs(True, "dog", "wc", 0.5, 1.5, "s*", 2.0, 0.25, "manual", 3.0, "random", "attention",
                           "none"),
                 KLoraArgs(True, "dog", "wc", pattern="s*", gamma="paper", mode="merge")):
        text = tag_mod.format_tag(args)
        merged = tag_mod.merge_tag_over_panel(KLoraArgs(), tag_mod.parse_tag(tags_in(text)))
        assert merged.resolved() == args.resolved(), text
    assert tag_mod.format_tag(KLoraArgs(True, "dog", "wc")) == "<klora:dog:wc>"
    for bad in ("a:b", "a>b", "a=b", ""):
        with pytest.raises(KLoraArgsError):
            tag_mod.format_tag(KLoraArgs(content=bad, style="wc"))


# ----------------------------------------------------------------------------------------------------------
# tag over panel, XYZ on top


PANEL = KLoraArgs(enabled=False, content="panel_c", style="panel_s", content_strength=0.9, style_strength=1.1,
                  pattern="s", alpha=1.25, beta=0.7, gamma="manual", gamma_value=2.0, mode="klora",
                  scope="attention", te="content", show_map=True)


def test_tag_names_win_and_panel_options_stay():
    merged = tag_mod.merge_tag_over_panel(PANEL, tag_mod.parse_tag(tags_in("<klora:dog:wc:alpha=3>")))
    assert merged == replace(PANEL, enabled=True, content="dog", style="wc", alpha=3.0)
    assert merged.given == {"enabled", "content", "style", "alpha"}  # what the tag chose


def test_no_tag_keeps_panel():
    assert tag_mod.merge_tag_over_panel(PANEL, None) is PANEL


def test_tag_pattern_switch_moves_alpha_beta_to_its_defaults():
    merged = tag_mod.merge_tag_over_panel(PANEL, tag_mod.parse_tag(tags_in("<klora:dog:wc:pattern=s*>")))
    assert (merged.pattern, merged.resolved_alpha, merged.resolved_beta) == ("s*", 1.5, 1.275)
    tag = tag_mod.parse_tag(tags_in("<klora:dog:wc:pattern=s*:beta=1>"))
    merged = tag_mod.merge_tag_over_panel(PANEL, tag)
    assert (merged.resolved_alpha, merged.resolved_beta) == (1.5, 1.0)
    # same pattern as the panel: the panel's α/β stay
    merged = tag_mod.merge_tag_over_panel(PANEL, tag_mod.parse_tag(tags_in("<klora:dog:wc:pattern=s>")))
    assert (merged.alpha, merged.beta) == (1.25, 0.7)


def test_tag_gamma_over_panel_manual():
    merged = tag_mod.merge_tag_over_panel(PANEL, tag_mod.parse_tag(tags_in("<klora:dog:wc:gamma=auto>")))
    assert merged.gamma_option == "auto"
    merged = tag_mod.merge_tag_over_panel(KLoraArgs(), tag_mod.parse_tag(tags_in("<klora:dog:wc:gamma=4>")))
    assert merged.gamma_option == 4.0


def test_tag_without_given_replaces_whole_panel():
    tag = KLoraArgs(enabled=True, content="dog", style="wc")
    assert tag_mod.merge_tag_over_panel(PANEL, tag) == replace(tag, enabled=True)


class P:
    """Stands in for a StableDiffusionProcessing object (only attributes are set on it)."""


def xyz_run(axis: xyz.XyzAxis, p, raw_values: list[str]):
    """What scripts/xyz_grid.py ``Script.run`` does with one axis: ``process_axis`` converts each value with
    ``opt.type`` and calls ``opt.confirm(p, valslist)``; ``cell`` makes ``pc = copy(p)`` and calls
    ``opt.apply(pc, x, xs)`` before ``process_images(pc)``."""
    values = [axis.type(v) for v in raw_values]
    if axis.confirm:
        axis.confirm(p, values)
    cells = []
    for x in values:
        pc = copy(p)
        axis.apply(pc, x, values)
        cells.append(pc)
    return cells


def axis(label: str, lora_names=None) -> xyz.XyzAxis:
    return next(a for a in xyz.axes(lora_names) if a.label == f"[K-LoRA] {label}")


def test_xyz_axes_labels_and_choices():
    labels = [a.label for a in xyz.axes(lambda: ["dog", "wc"])]
    for name in ("Content LoRA", "Style LoRA", "Alpha", "Beta", "Pattern", "Mode", "Gamma",
                 "Content strength", "Style strength", "Enabled", "Scope", "Text encoder"):
        assert f"[K-LoRA] {name}" in labels
    assert len(labels) == len(set(labels))
    assert axis("Content LoRA", lambda: ["dog", "wc"]).choices() == ["dog", "wc"]
    assert axis("Content LoRA").choices is None
    assert axis("Mode").choices() == list(options.option('mode').choices.values())
    assert axis("Pattern").choices() == ["s (paper)", "s* (official)"]


def test_xyz_apply_stores_a_fresh_dict_per_cell():
    p = P()
    p._klora_xyz = {"alpha": 2.0}  # e.g. set by another axis before the copy
    cells = xyz_run(axis("Beta"), p, ["0.5", "1.0"])
    assert [cell._klora_xyz for cell in cells] == [{"alpha": 2.0, "beta": 0.5}, {"alpha": 2.0, "beta": 1.0}]
    assert p._klora_xyz == {"alpha": 2.0}


def test_xyz_two_axes_compose():
    p = P()
    pc = copy(p)
    axis("Mode").apply(pc, "Top-K only", [])
    axis("Content LoRA").apply(pc, "cat", [])
    assert xyz.overrides(pc) == {"mode": "topk", "content": "cat"}
    assert xyz.overrides(P()) == {}


def test_xyz_every_axis_applies():
    cases = {
        "Enabled": ("False", {"enabled": False}),
        "Content LoRA": ("cat", {"content": "cat"}),
        "Style LoRA": ("oil", {"style": "oil"}),
        "Content strength": ("0.5", {"content_strength": 0.5}),
        "Style strength": ("2", {"style_strength": 2.0}),
        "Pattern": ("s* (official)", {"pattern": "s*"}),
        "Alpha": ("3", {"alpha": 3.0}),
        "Beta": ("1.275", {"beta": 1.275}),
        "Gamma": ("2.5", {"gamma": "manual", "gamma_value": 2.5}),
        "Mode": ("Random", {"mode": "random"}),
        "Scope": ("Attention only", {"scope": "attention"}),
        "Text encoder": ("None", {"te": "none"}),
        "Balance": ("-0.5", {"balance": -0.5}),
        "K": ("128", {"k": 128}),
    }
    assert set(cases) == {a.label.removeprefix("[K-LoRA] ") for a in xyz.axes()}
    for label, (raw, expected) in cases.items():
        (cell,) = xyz_run(axis(label), P(), [raw])
        assert cell._klora_xyz == expected, label
    (cell,) = xyz_run(axis("Gamma"), P(), ["paper"])
    assert cell._klora_xyz == {"gamma": "paper"}


@pytest.mark.parametrize(("label", "raw"), [
    ("Alpha", "-1"), ("Beta", "nan"), ("Gamma", "0"), ("Gamma", "often"), ("Mode", "best"),
    ("Pattern", "x"), ("Scope", "some"), ("Text encoder", "clip"), ("Enabled", "maybe"),
    ("Content LoRA", "None"), ("Style LoRA", ""), ("Content strength", "inf"), ("Balance", "1.5"),
    ("K", "-1"), ("K", "2.5"),
])
def test_xyz_confirm_rejects_before_any_image(label, raw):
    a = axis(label)
    with pytest.raises((RuntimeError, ValueError)) as err:
        xyz_run(a, P(), ["1", raw] if a.type is float else [raw])
    assert "K-LoRA" in str(err.value)


def test_apply_xyz_overrides():
    p = P()
    assert xyz.apply_overrides(PANEL, p) is PANEL
    p._klora_xyz = {"mode": "merge"}
    assert xyz.apply_overrides(PANEL, p) == replace(PANEL, enabled=True, mode="merge")
    p._klora_xyz = {"enabled": False, "mode": "merge"}
    assert not xyz.apply_overrides(replace(PANEL, enabled=True), p).enabled
    p._klora_xyz = {"pattern": "s*"}
    result = xyz.apply_overrides(PANEL, p)
    assert (result.resolved_alpha, result.resolved_beta) == (1.5, 1.275)
    p._klora_xyz = {"pattern": "s*", "beta": 2.0}
    assert xyz.apply_overrides(PANEL, p).resolved_beta == 2.0
    p._klora_xyz = "not a dict"
    assert xyz.apply_overrides(PANEL, p) is PANEL


def test_effective_args_precedence_panel_tag_xyz():
    tag = tag_mod.parse_tag(tags_in("<klora:dog:wc:alpha=3:mode=topk>"))
    p = P()
    p._klora_xyz = {"alpha": 4.0}
    result = xyz.effective_args(PANEL, tag, p)
    assert (result.content, result.alpha, result.mode, result.beta, result.enabled) == \
        ("dog", 4.0, "topk", 0.7, True)
    assert xyz.effective_args(PANEL, None, None) is PANEL


class AxisOption:
    """Mirror of scripts/xyz_grid.py ``AxisOption.__init__``."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None,
                 prepare=None):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.prepare, self.choices = confirm, cost, prepare, choices


def fake_webui_scripts(monkeypatch, with_xyz=True):
    """``modules.scripts.scripts_data``: ScriptClassData(script_class, path, basedir, module) tuples
    (modules/scripts.py); script modules are named by file basename (modules/script_loading.py
    ``load_module``)."""
    xyz = types.ModuleType("xyz_grid.py")
    xyz.AxisOption = AxisOption
    xyz.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None), AxisOption("Seed", int, None)]
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    other_class = type("Other", (), {"__module__": "other.py"})
    data = [types.SimpleNamespace(script_class=other_class, path="o.py", basedir="", module=None)]
    if with_xyz:
        data.append(types.SimpleNamespace(script_class=script_class, path="scripts/xyz_grid.py", basedir="",
                                          module=xyz))
    modules_pkg = types.ModuleType("modules")
    scripts_mod = types.ModuleType("modules.scripts")
    scripts_mod.scripts_data = data
    modules_pkg.scripts = scripts_mod
    monkeypatch.setitem(sys.modules, "modules", modules_pkg)
    monkeypatch.setitem(sys.modules, "modules.scripts", scripts_mod)
    return xyz


def test_register_xyz_axes_once(monkeypatch):
    grid = fake_webui_scripts(monkeypatch)
    assert xyz.register_axes(lambda: ["dog"]) == len(xyz.axes())
    assert xyz.register_axes(lambda: ["dog"]) == 0  # before_ui runs again on UI reload
    labels = [o.label for o in grid.axis_options]
    assert labels[:2] == ["Nothing", "Seed"] and len(labels) == 2 + len(xyz.axes())
    content = next(o for o in grid.axis_options if o.label == "[K-LoRA] Content LoRA")
    assert content.choices() == ["dog"] and content.cost == 0.5 and content.format_value is None
    p = P()
    content.apply(p, "dog", ["dog"])
    assert p._klora_xyz == {"content": "dog"}


def test_register_xyz_axes_without_xyz_script(monkeypatch):
    fake_webui_scripts(monkeypatch, with_xyz=False)
    assert xyz.register_axes() == 0


# ----------------------------------------------------------------------------------------------------------
# infotext


def test_format_infotext_states_everything():
    args = KLoraArgs(enabled=True, content="dog", style="watercolor")
    assert infotext.format_infotext(args, 2.2912) == (
        "content: dog, style: watercolor, cw: 1, sw: 1, pattern: s, alpha: 1.5, beta: 0.5, "
        "gamma: auto 2.291, mode: klora, scope: all, te: both")
    star = KLoraArgs(True, "dog", "wc", 0.8, 1.25, "s*", gamma="manual", gamma_value=3.5, mode="fixed",
                     scope="attention", te="none")
    assert infotext.format_infotext(star, 9.9, note="refiner segment without K-LoRA") == (
        "content: dog, style: wc, cw: 0.8, sw: 1.25, pattern: s*, alpha: 1.5, beta: 1.275, gamma: 3.5, "
        "mode: fixed, scope: attention, te: none, note: refiner segment without K-LoRA")
    assert "gamma: paper, " in infotext.format_infotext(replace(args, gamma="paper"), None)
    assert "gamma: auto, " in infotext.format_infotext(args, float("nan"))
    # only mode klora uses γ: the others do not claim a value
    assert "gamma: auto, mode: topk" in infotext.format_infotext(replace(args, mode="topk"), 2.0)
    assert infotext.format_infotext(args, None, from_tag=True).endswith("te: both, source: tag")


NAMES = ["dog", "my dog v2", "a,b", "x: y", 'quote"d', "back\\slash", "ünïcödé 犬", "a=b", " padded ",
         "'single'", "new\nline", "trailing,", "k-lora: style, 2"]


@pytest.mark.parametrize("name", NAMES)
def test_infotext_round_trip_through_a1111_parse(name):
    args = KLoraArgs(True, name, "style " + name, 0.85, 1.1, "s*", 1.75, 1.2, "manual", 2.125, "random",
                     "attention", "style", False)
    value = infotext.format_infotext(args, None, note=f"note about {name}")
    params = through_a1111(value, infotext.format_hashes("0123abcd", "fedc9876"))
    assert params[INFOTEXT_KEY] == value
    assert params["Steps"] == "20" and params["Size-1"] == "512" and params["Version"] == "v1.10.1"
    assert infotext.parse_infotext(params[INFOTEXT_KEY]) == args
    assert infotext.parse_hashes(params[INFOTEXT_HASHES_KEY]) == {"content": "0123abcd", "style": "fedc9876"}


@pytest.mark.parametrize("args", [
    KLoraArgs(True, "dog", "wc"),
    KLoraArgs(True, "dog", "wc", pattern="s*"),
    KLoraArgs(True, "dog", "wc", 0.1 + 0.2, 1 / 3, "s", 0.0, 0.0, "paper", 1.0, "merge", "all", "content"),
    KLoraArgs(True, "dog", "wc", -1.5, 3.0, "s*", 4.0, 2.5, "auto", 7.0, "topk", "attention", "both"),
])
def test_infotext_round_trip_restores_the_panel(args):
    value = infotext.format_infotext(args, 1.2345)
    restored = infotext.parse_infotext(through_a1111(value)[INFOTEXT_KEY])
    # α/β are written as the values used; auto/paper γ restore as auto/paper (the value is recomputed)
    expected = args.resolved()
    if args.gamma != "manual":
        expected = replace(expected, gamma_value=1.0)
    assert restored == expected
    assert restored.to_ui_values()[:-1] == expected.to_ui_values()[:-1]


def test_infotext_from_tag_restores_with_the_box_unticked():
    args = KLoraArgs(True, "dog", "wc", mode="topk")
    restored = infotext.parse_infotext(infotext.format_infotext(args, 2.0, from_tag=True))
    assert restored == replace(args.resolved(), enabled=False)


def test_parse_infotext_ignores_unknown_keys_and_fills_defaults():
    args = infotext.parse_infotext("content: dog, style: wc, future: 3, gamma: paper 1.5")
    assert args == KLoraArgs(True, "dog", "wc", gamma="paper")
    assert infotext.parse_infotext("content: dog, style: wc, gamma: manual 2").gamma_option == 2.0


@pytest.mark.parametrize(("value", "expect"), [
    ("style: wc", "does not name"),
    ("content: dog", "does not name"),
    ('content: "", style: wc', "does not name"),
    ("content: dog, style: wc, alpha: fast", "alpha"),
    ("content: dog, style: wc, mode: best", "mode"),
    ("content: dog, style: wc, gamma: ", "gamma"),
    ("content: dog, style: wc, gamma: sometimes 2", "gamma"),
    ('content: "unterminated\\", style: wc', "cannot read"),
])
def test_parse_infotext_errors(value, expect):
    with pytest.raises(KLoraArgsError, match=expect):
        infotext.parse_infotext(value)
    with pytest.raises(KLoraArgsError):
        infotext.parse_infotext(3)


def test_hashes_helpers():
    assert infotext.format_hashes("abc", "def") == "content: abc, style: def"
    assert infotext.format_hashes(None, "def") == "style: def"
    assert infotext.format_hashes(None, "") is None
    assert infotext.parse_hashes("content: abc, style: def, other: x") == {"content": "abc", "style": "def"}
    assert infotext.parse_hashes(None) == {}


# ----------------------------------------------------------------------------------------------------------
# paste


def paste_like_a1111(getter, params, component_value):
    """modules/infotext_utils.py ``connect_paste.paste_func``: a callable key's result is converted with the
    type of the component's current value (bool: "False" → False; int → float); None leaves the field."""
    v = getter(params)
    if v is None:
        return None
    valtype = type(component_value)
    if valtype is bool and v == "False":
        return False
    if valtype is int:
        return float(v)
    return valtype(v)


def test_paste_values_restore_every_panel_field():
    args = KLoraArgs(True, "dog, v2", "wc", 0.8, 1.2, "s*", 1.5, 1.0, "manual", 2.5, "fixed", "attention",
                     "style", False)
    params = through_a1111(infotext.format_infotext(args, None))
    values = infotext.infotext_paste_values(params)
    assert set(values) == set(ARG_NAMES) - {"show_map"}
    expected = dict(zip(ARG_NAMES, args.to_ui_values(), strict=True))
    defaults = dict(zip(ARG_NAMES, KLoraArgs().to_ui_values(), strict=True))
    getters = infotext.paste_getters()
    for name in ARG_NAMES:
        pasted = paste_like_a1111(getters[name], params, defaults[name])
        if name == "show_map":
            assert pasted is None
        else:
            assert pasted == expected[name], name
            assert values[name] == expected[name]
    assert args_mod.from_script_args([values.get(n, False) for n in ARG_NAMES]) == args


def test_paste_without_klora_unticks_only_the_box():
    params = through_a1111(None)
    assert INFOTEXT_KEY not in params
    assert infotext.infotext_paste_values(params) == {"enabled": False}
    getters = infotext.paste_getters()
    assert getters["enabled"](params) is False
    assert getters["content"](params) is None


def test_paste_with_only_a_warning_unticks_the_box():
    """An image made without K-LoRA because of bad input has a ``K-LoRA warning`` field and no ``K-LoRA``
    field: pasting it must not turn K-LoRA on."""
    warning = ("K-LoRA: the prompt has 2 <klora> tags (<klora:dog:wc>, <klora:wc:dog>); use only one. "
               "The image was made without K-LoRA.")
    text = a1111_create_infotext("a dog", {"Steps": 20, "Seed": 1, infotext.WARNING_KEY: warning,
                                           "Version": "v1"})
    params = infotext_utils.parse_generation_parameters(text)
    assert params[infotext.WARNING_KEY] == warning and INFOTEXT_KEY not in params
    assert infotext.infotext_paste_values(params) == {"enabled": False}
    getters = infotext.paste_getters().items()
    assert all(getter(params) is None for name, getter in getters if name != "enabled")


def test_paste_bad_field_changes_nothing():
    assert infotext.infotext_paste_values({INFOTEXT_KEY: "content: dog"}) == {}


def test_paste_resolves_names_by_hash():
    args = KLoraArgs(True, "dog_remote", "wc_remote")
    params = through_a1111(infotext.format_infotext(args, 1.0),
                           infotext.format_hashes("aaaa1111", "bbbb2222"))
    local = {"aaaa1111": "dog_local"}
    calls = []

    def resolve(name, shorthash):
        calls.append((name, shorthash))
        return local.get(shorthash)

    values = infotext.infotext_paste_values(params, resolve)
    assert (values["content"], values["style"]) == ("dog_local", "wc_remote")
    assert calls == [("dog_remote", "aaaa1111"), ("wc_remote", "bbbb2222")]

    def broken(name, shorthash):
        raise OSError("disk gone")

    assert infotext.infotext_paste_values(params, broken)["content"] == "dog_remote"
    assert infotext.paste_getters(resolve)["content"](params) == "dog_local"


# ----------------------------------------------------------------------------------------------------------
# panel callbacks and the builder


def test_pattern_input_moves_alpha_beta():
    assert panel.pattern_defaults("s* (official)") == (1.5, 1.275)
    assert panel.pattern_defaults("s (paper)") == (1.5, 0.5)


def test_run_analyze_passes_args_and_steps():
    seen = []

    def analyze(args, steps):
        seen.append((args, steps))
        return "IMAGE", "summary"

    values = KLoraArgs(True, "dog", "wc", mode="topk").to_ui_values()
    assert panel.run_analyze(analyze, values, 30.0) == ("IMAGE", "summary")
    assert seen == [(KLoraArgs(True, "dog", "wc", mode="topk").resolved(), 30)]


def test_run_analyze_reports_errors_as_text():
    def analyze(args, steps):
        raise ValueError("no shared layers: content is SD1.5, style is SDXL")

    image, text = panel.run_analyze(analyze, KLoraArgs(False, "dog", "wc").to_ui_values(), 20)
    assert image is None and "no shared layers" in text and text.startswith("**K-LoRA analysis failed:**")
    image, text = panel.run_analyze(analyze, KLoraArgs().to_ui_values(), 20)
    assert image is None and "no content LoRA and no style LoRA" in text
    assert text.startswith("**Cannot analyze:**") and "K-LoRA:" not in text  # the prefix is said once
    image, text = panel.run_analyze(analyze, KLoraArgs(False, "a_b*", "c").to_ui_values(), 0)
    assert image is None and "at least 1" in text
    image, text = panel.run_analyze(lambda a, s: (_ for _ in ()).throw(RuntimeError("bad <b>x</b>")),
                                KLoraArgs(False, "a", "c").to_ui_values(), 5)
    assert "\\<b\\>" in text


class _Component:
    """Records a gradio component's constructor arguments and event wiring (gradio.components.*)."""

    def __init__(self, *args, **kwargs):
        if args:
            kwargs.setdefault("value", args[0])
        self.kwargs = kwargs
        self.value = kwargs.get("value")
        self.elem_id = kwargs.get("elem_id")
        self.events = []
        _Component.created.append(self)

    def _event(name):
        def register(self, fn=None, inputs=None, outputs=None, **kwargs):
            self.events.append((name, fn, inputs, outputs))
        return register

    change = _event("change")
    input = _event("input")
    click = _event("click")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


_Component.created = []


def fake_gradio_and_webui(monkeypatch):
    gr = types.ModuleType("gradio")
    for name in ("Dropdown", "Slider", "Radio", "Number", "Checkbox", "Button", "Image", "Markdown", "Row",
                 "Column", "Accordion", "Textbox"):
        setattr(gr, name, type(name, (_Component,), {}))
    gr.update = lambda **kwargs: {"__type__": "update", **kwargs}
    gr.__version__ = "3.41.2"

    class InputAccordion(gr.Checkbox):
        """modules/ui_components.py ``InputAccordion(value, **kwargs)``: a Checkbox and a context manager."""

        def __init__(self, value, **kwargs):
            super().__init__(value=value, **kwargs)

    refresh_buttons = []

    def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
        """modules/ui_common.py ``create_refresh_button``: calls refresh_method() then refreshed_args()."""
        refresh_buttons.append((refresh_component, refresh_method, refreshed_args, elem_id))
        return gr.Button(value="🔄", elem_id=elem_id)

    class PasteField(tuple):
        """modules/infotext_utils.py ``PasteField(component, target, *, api=None)``."""

        def __new__(cls, component, target, *, api=None):
            return super().__new__(cls, (component, target))

    modules_pkg = types.ModuleType("modules")
    ui_components = types.ModuleType("modules.ui_components")
    ui_components.InputAccordion = InputAccordion
    ui_common = types.ModuleType("modules.ui_common")
    ui_common.create_refresh_button = create_refresh_button
    infotext_utils = types.ModuleType("modules.infotext_utils")
    infotext_utils.PasteField = PasteField
    for name, module in (("gradio", gr), ("modules", modules_pkg), ("modules.ui_components", ui_components),
                         ("modules.ui_common", ui_common), ("modules.infotext_utils", infotext_utils)):
        monkeypatch.setitem(sys.modules, name, module)
    _Component.created = []
    return gr, refresh_buttons


class FakeScript:
    """modules/scripts.py ``Script.elem_id`` for an AlwaysVisible script titled "K-LoRA"."""

    infotext_fields = None

    def __init__(self, is_img2img=False):
        self.is_img2img = is_img2img

    def elem_id(self, item_id):
        tab = "img2img_" if self.is_img2img else "txt2img_"
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", "K-LoRA".lower()))
        return f"script_{tab}{title}_{item_id}"


def test_build_ui_returns_arg_components_in_order(monkeypatch):
    _, refresh_buttons = fake_gradio_and_webui(monkeypatch)
    script = FakeScript()
    names_calls = []

    def lora_names():
        names_calls.append(1)
        return ["dog", "wc"]

    components = panel.build_ui(script, False, lora_names, lambda: None, lambda a, s: (None, ""))
    assert len(components) == len(ARG_NAMES)
    assert [comp.elem_id for comp in components] == [
        f"script_txt2img_klora_{'enable' if n == 'enabled' else n}" for n in ARG_NAMES]
    # the components' default values are valid script args meaning the default settings
    values = [comp.value for comp in components]
    assert values == KLoraArgs().to_ui_values()
    assert args_mod.from_script_args(values) == KLoraArgs().resolved()
    assert components[1].kwargs["choices"] == ["None", "dog", "wc"]
    assert components[1].kwargs["allow_custom_value"] is True
    assert components[0].kwargs["label"] == "K-LoRA" and components[0].value is False
    # refresh convention: one button per dropdown, refreshed choices from lora_names
    assert [b[3] for b in refresh_buttons] == ["script_txt2img_klora_content_refresh",
                                               "script_txt2img_klora_style_refresh"]
    assert refresh_buttons[0][2]() == {"choices": ["None", "dog", "wc"]}
    # paste fields: one getter per argument except show_map
    pasted = [n for n in ARG_NAMES if n != "show_map"]
    assert [field[0] for field in script.infotext_fields] == [c for n, c in zip(ARG_NAMES, components,
                                                                                 strict=True) if n in pasted]
    args = KLoraArgs(True, "dog", "wc", pattern="s*", balance=0.5, k=300)
    params = through_a1111(infotext.format_infotext(args, 1.0))
    assert [field[1](params) for field in script.infotext_fields] == \
        [v for n, v in zip(ARG_NAMES, args.to_ui_values(), strict=True) if n in pasted]


def test_build_ui_puts_the_rule_in_an_advanced_fold(monkeypatch):
    """The pair, the strengths and the balance first; the rule's parameters folded away (closed)."""
    gr, _ = fake_gradio_and_webui(monkeypatch)
    panel.build_ui(FakeScript(), False, lambda: [], lambda: None, lambda a, s: (None, ""))
    ids = [c.elem_id for c in _Component.created]
    fold = ids.index("script_txt2img_klora_advanced")
    advanced = _Component.created[fold]
    assert isinstance(advanced, gr.Accordion) and advanced.kwargs["open"] is False
    inside = {f"script_txt2img_klora_{n}" for n in ("pattern", "alpha", "beta", "gamma", "gamma_value", "k",
                                                     "mode", "scope", "te")}
    first = {f"script_txt2img_klora_{n}" for n in ("content", "style", "content_strength", "style_strength",
                                                    "balance")}
    assert all(ids.index(i) > fold for i in inside) and all(ids.index(i) < fold for i in first)
    balance = _Component.created[ids.index("script_txt2img_klora_balance")]
    assert (balance.kwargs["minimum"], balance.kwargs["maximum"], balance.value) == (-1.0, 1.0, 0.0)
    # K: 0 means rank × rank (gradio 3.41's Number sends 0 for an empty box: found in a real browser)
    assert _Component.created[ids.index("script_txt2img_klora_k")].value == 0
    assert args_mod.from_script_args([True, "a", "b", *([None] * 12), 0]).k is None


def test_build_ui_follows_the_tab_steps_and_copies_the_tag_into_the_prompt(monkeypatch):
    gr, _ = fake_gradio_and_webui(monkeypatch)
    steps = gr.Slider(value=28, elem_id="txt2img_steps")
    prompt = gr.Textbox(value="", elem_id="txt2img_prompt")
    components = panel.build_ui(FakeScript(), False, lambda: [], lambda: None, lambda a, s: (None, ""),
                                tab=panel.TabComponents(steps=steps, prompt=prompt))
    by_id = {comp.elem_id: comp for comp in _Component.created}
    analyze_steps = by_id["script_txt2img_klora_analyze_steps"]
    assert analyze_steps.value == 28  # the tab's steps, not a fixed 20
    (name, fn, inputs, outputs), = steps.events
    assert (name, inputs, outputs, fn(12)) == ("change", [steps], [analyze_steps], 12)
    (_, fn, inputs, outputs), = by_id["script_txt2img_klora_copy_tag"].events
    assert inputs == [prompt, *components] and outputs == [prompt, by_id["script_txt2img_klora_summary"]]
    values = KLoraArgs(True, "dog", "wc", pattern="s*", balance=-0.5).to_ui_values()
    new_prompt, note = fn("a dog <klora:old:pair:mode=merge>, on grass", *values)
    assert new_prompt == "a dog, on grass <klora:dog:wc:pattern=s*:balance=-0.5>" and "balance=-0.5" in note
    assert tag_mod.parse_tag(tags_in(new_prompt)) == tag_mod.parse_tag(tags_in(
        "<klora:dog:wc:pattern=s*:balance=-0.5>"))
    unchanged, note = fn("a dog", *KLoraArgs(True, "dog:2", "wc").to_ui_values())
    assert unchanged == "a dog" and "cannot be written in a tag" in note
    # without the tab's prompt (a host without one) the tag is shown instead
    _Component.created = []
    panel.build_ui(FakeScript(), False, lambda: [], lambda: None, lambda a, s: (None, ""))
    button = next(c for c in _Component.created if c.elem_id == "script_txt2img_klora_copy_tag")
    (_, fn, _, outputs), = button.events
    assert "<klora:dog:wc>" in fn(*KLoraArgs(True, "dog", "wc").to_ui_values())


def test_build_ui_events(monkeypatch):
    fake_gradio_and_webui(monkeypatch)
    analyzed = []
    components = panel.build_ui(FakeScript(True), True, lambda: ["dog"], lambda: None,
                            lambda a, s: (analyzed.append((a, s)) or "IMG", "text"))
    by_id = {comp.elem_id: comp for comp in _Component.created}
    pattern = by_id["script_img2img_klora_pattern"]
    (name, fn, inputs, outputs), = pattern.events
    assert name == "input"  # not change: pasting pattern + β together must not reset β
    assert fn("s* (official)") == (1.5, 1.275)
    assert outputs == [by_id["script_img2img_klora_alpha"], by_id["script_img2img_klora_beta"]]
    (_, fn, _, outputs), = by_id["script_img2img_klora_gamma"].events
    assert fn("manual") == {"__type__": "update", "visible": True}
    assert fn("auto")["visible"] is False
    assert outputs == [by_id["script_img2img_klora_gamma_value"]]
    assert by_id["script_img2img_klora_gamma_value"].kwargs["visible"] is False
    (_, fn, inputs, outputs), = by_id["script_img2img_klora_analyze"].events
    assert inputs[:-1] == components and inputs[-1] is by_id["script_img2img_klora_analyze_steps"]
    image_update, text = fn(*KLoraArgs(False, "dog", "wc").to_ui_values(), 12)
    assert image_update == {"__type__": "update", "value": "IMG", "visible": True} and text == "text"
    assert analyzed == [(KLoraArgs(False, "dog", "wc").resolved(), 12)]
    image_update, text = fn(*KLoraArgs().to_ui_values(), 12)
    assert image_update["visible"] is False and "no content LoRA" in text


def test_build_ui_is_idempotent_and_takes_defaults(monkeypatch):
    fake_gradio_and_webui(monkeypatch)
    script = FakeScript()
    first = [(comp.elem_id, comp.value) for comp in panel.build_ui(script, False, lambda: [], lambda: None,
                                                                lambda a, s: (None, ""))]
    second = [(comp.elem_id, comp.value) for comp in panel.build_ui(script, False, lambda: [], lambda: None,
                                                                 lambda a, s: (None, ""))]
    assert first == second
    assert len(script.infotext_fields) == len(ARG_NAMES) - 1
    star = panel.build_ui(script, False, lambda: [], lambda: None, lambda a, s: (None, ""),
                      defaults=KLoraArgs(pattern="s*", mode="merge"))
    assert [comp.value for comp in star] == KLoraArgs(pattern="s*", mode="merge").to_ui_values()


def test_build_ui_map_image_format_per_gradio_version(monkeypatch):
    gr, _ = fake_gradio_and_webui(monkeypatch)
    panel.build_ui(FakeScript(), False, lambda: [], lambda: None, lambda a, s: (None, ""))
    image = next(x for x in _Component.created if x.elem_id == "script_txt2img_klora_map_image")
    assert "format" not in image.kwargs  # Gradio 3.41's Image has no such argument
    gr.__version__ = "4.40.0"
    _Component.created = []
    panel.build_ui(FakeScript(), False, lambda: [], lambda: None, lambda a, s: (None, ""))
    image = next(x for x in _Component.created if x.elem_id == "script_txt2img_klora_map_image")
    assert image.kwargs["format"] == "png"


def test_build_ui_survives_a_failing_lora_list(monkeypatch):
    fake_gradio_and_webui(monkeypatch)

    def broken():
        raise OSError("models/Lora unreadable")

    components = panel.build_ui(FakeScript(), False, broken, lambda: None, lambda a, s: (None, ""))
    assert components[1].kwargs["choices"] == ["None"]


def test_floats_print_shortest_and_read_back():
    for x in (1.0, 0.5, 1.275, 0.1 + 0.2, 1 / 3, 1e-7, 12345.678):
        assert float(args_mod.number_text(x)) == x
        assert not args_mod.number_text(x).endswith(".0")
    assert math.isclose(float(args_mod.number_text(2.0)), 2.0) and args_mod.number_text(2.0) == "2"


# ----------------------------------------------------------------------------------------------------------
# HTTP API validation


def test_validate_api_payload():
    ok = {"prompt": "a dog", "alwayson_scripts": {"k-lora": {"args": [{"content": "dog", "style": "wc"}]}}}
    assert api.validate_api_payload(ok) == KLoraArgs(True, "dog", "wc")
    assert api.validate_api_payload({"prompt": "x"}) is None
    assert api.validate_api_payload({"alwayson_scripts": {"Other": {"args": [1]}}}) is None
    assert api.validate_api_payload({"alwayson_scripts": {"K-LoRA": {}}}) is None
    positional = {"alwayson_scripts": {"K-LoRA": {"args": [True, "dog", "wc", 0.5]}}}
    assert api.validate_api_payload(positional).content_strength == 0.5
    disabled = {"alwayson_scripts": {"K-LoRA": {"args": [False]}}}
    assert api.validate_api_payload(disabled) == KLoraArgs()
    # names may come from a tag in the prompt
    tagged = {"prompt": "<klora:dog:wc>", "alwayson_scripts": {"K-LoRA": {"args": [{"mode": "topk"}]}}}
    assert api.validate_api_payload(tagged).mode == "topk"
    # the tag's names replace the entry's: the entry's are not looked up (the tag's are, with the image)
    tagged = {"prompt": "a <klora:dog:wc>", "alwayson_scripts": {"K-LoRA": {"args": [True, "ghost", "wc"]}}}
    assert api.validate_api_payload(tagged, lambda n: False).content == "ghost"
    # a bare dict of named fields is taken as the one-dict list
    bare = {"alwayson_scripts": {"K-LoRA": {"args": {"content": "dog", "style": "wc", "mode": "topk"}}}}
    assert api.validate_api_payload(bare) == KLoraArgs(True, "dog", "wc", mode="topk")


def test_normalize_api_args():
    assert api.normalize_api_args({"content": "dog"}) == [{"content": "dog"}]
    # pattern given, β not: α/β padded with None (= the pattern's defaults) so the webui does not pad them
    # with the panel's values
    assert api.normalize_api_args([True, "d", "w", 1, 1, "s*"]) == [True, "d", "w", 1, 1, "s*", None, None]
    assert api.normalize_api_args([True, "d", "w", 1, 1, "s*", 2]) == [True, "d", "w", 1, 1, "s*", 2, None]
    padded = api.normalize_api_args([True, "d", "w", 1, 1, "s*"])
    assert args_mod.from_script_args(padded).resolved_beta == 1.275
    for unchanged in ([True, "dog", "wc"], [True, "dog", "wc", 1, 1], [True, "d", "w", 1, 1, "s*", 2, 0.3],
                      [{"content": "dog"}, 1, 2, 3, 4, 5], [], "text", 3):
        assert api.normalize_api_args(unchanged) is unchanged


def test_prepare_api_payload_rewrites_in_place():
    payload = {"alwayson_scripts": {"k-lora": {"args": {"content": "dog", "style": "wc"}}}}
    assert api.prepare_api_payload(payload)
    assert payload["alwayson_scripts"]["k-lora"]["args"] == [{"content": "dog", "style": "wc"}]
    assert not api.prepare_api_payload(payload)  # now as the webui wants it
    with pytest.raises(KLoraArgsError, match="no LoRA named 'wc'"):
        api.prepare_api_payload({"alwayson_scripts": {"K-LoRA": {"args": {"content": "dog", "style": "wc"}}}},
                              lambda n: n == "dog")


@pytest.mark.parametrize(("scripts", "expect"), [
    ({"K-LoRA": {"args": "dog, wc"}}, "must be a list"),
    ({"K-LoRA": {"args": {"content": "dog"}}}, "no style LoRA"),
    ({"K-LoRA": {"args": [True, "dog", "wc", *([1.0] * 20)]}}, f"at most {len(ARG_NAMES)} positional"),
    ({"K-LoRA": {"args": [True, "dog", "wc", 1.0, 1.0, "zzz"]}}, "'pattern'"),
    ({"K-LoRA": {"args": [{"content": "dog"}]}}, "no style LoRA"),
    ({"K-LoRA": {"args": [{"content": "dog", "style": "wc", "alpha": "x"}]}}, "alpha"),
    ({"K-LoRA": {"args": [{"content": "dog", "style": "wc", "colour": 1}]}}, "unknown K-LoRA argument"),
    ({"K-LoRA": {"args": [True, "dog", "wc", "strong"]}}, "content_strength"),
    ({"K-LoRA": {"args": [{"content": "ghost", "style": "wc"}]}}, "no LoRA named 'ghost'"),
])
def test_validate_api_payload_errors(scripts, expect):
    with pytest.raises(KLoraArgsError, match=expect):
        api.validate_api_payload({"prompt": "a dog", "alwayson_scripts": scripts}, lambda n: n != "ghost")


def run_asgi(app, method, path, body: bytes, chunks: int = 1):
    """Drive an ASGI app with one HTTP request (body split into ``chunks`` messages); return what it sent."""
    import asyncio

    parts = [body[i * len(body) // chunks:(i + 1) * len(body) // chunks] for i in range(chunks)]
    incoming = [{"type": "http.request", "body": part, "more_body": i < chunks - 1}
                for i, part in enumerate(parts)]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app({"type": "http", "method": method, "path": path}, receive, send))
    return sent


async def echo_app(scope, receive, send):
    """The webui's app: reads the whole body and echoes it."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def test_api_validator_refuses_bad_args_with_422():
    app = api.ApiArgsValidator(echo_app)
    body = json.dumps({"prompt": "x", "alwayson_scripts": {"K-LoRA": {"args": [{"mode": "best"}]}}}).encode()
    sent = run_asgi(app, "POST", "/sdapi/v1/txt2img", body, chunks=3)
    assert sent[0]["status"] == 422
    detail = json.loads(sent[1]["body"])
    assert detail["error"] == "KLoraArgsError" and "'mode'" in detail["detail"]
    assert dict(sent[0]["headers"])[b"content-length"] == str(len(sent[1]["body"])).encode()


@pytest.mark.parametrize(("method", "path", "payload"), [
    ("POST", "/sdapi/v1/img2img", {"alwayson_scripts": {"K-LoRA": {"args": [True, "dog", "wc"]}}}),
    ("POST", "/sdapi/v1/txt2img", {"prompt": "no scripts"}),
    ("POST", "/sdapi/v1/txt2img", "not json {"),
    ("POST", "/sdapi/v1/txt2img", ["alwayson_scripts"]),
    ("POST", "/sdapi/v1/options", {"alwayson_scripts": {"K-LoRA": {"args": [{"mode": "best"}]}}}),
    ("GET", "/sdapi/v1/txt2img", {"alwayson_scripts": {"K-LoRA": {"args": [{"mode": "best"}]}}}),
])
def test_api_validator_passes_the_rest_through_intact(method, path, payload):
    body = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
    sent = run_asgi(api.ApiArgsValidator(echo_app), method, path, body, chunks=2)
    assert sent[0]["status"] == 200 and sent[1]["body"] == body


def test_api_validator_forwards_rewritten_args():
    payload = {"prompt": "x", "alwayson_scripts": {"K-LoRA": {"args": {"content": "dög", "style": "w"}}}}
    body = json.dumps(payload, ensure_ascii=False).encode()
    seen = {}

    async def webui(scope, receive, send):
        seen["headers"] = dict(scope["headers"])
        await echo_app(scope, receive, send)

    sent = []

    async def receive_all():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    import asyncio

    incoming = [{"type": "http.request", "body": body[:10], "more_body": True},
                {"type": "http.request", "body": body[10:], "more_body": False}]
    scope = {"type": "http", "method": "POST", "path": "/sdapi/v1/txt2img",
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode())]}
    asyncio.run(api.ApiArgsValidator(webui)(scope, receive_all, send))
    forwarded = sent[1]["body"]
    assert json.loads(forwarded)["alwayson_scripts"]["K-LoRA"]["args"] == [{"content": "dög", "style": "w"}]
    assert seen["headers"][b"content-length"] == str(len(forwarded)).encode()
    assert seen["headers"][b"content-type"] == b"application/json"
    assert scope["headers"][1] == (b"content-length", str(len(body)).encode())  # the caller's scope untouched


def test_api_validator_name_check():
    app = api.ApiArgsValidator(echo_app, name_exists=lambda name: name == "dog")
    body = json.dumps({"alwayson_scripts": {"K-LoRA": {"args": [{"content": "dog", "style": "x"}]}}}).encode()
    sent = run_asgi(app, "POST", "/sdapi/v1/txt2img", body)
    assert sent[0]["status"] == 422 and "no LoRA named 'x'" in json.loads(sent[1]["body"])["detail"]


class FakeStarlette:
    """The part of starlette.applications.Starlette used here: ``middleware_stack`` (None until the app
    starts), ``add_middleware(cls, **options)`` (refused once started), and ``__call__``."""

    def __init__(self, started):
        self.middleware_stack = echo_app if started else None
        self.added = []

    def add_middleware(self, cls, **options):
        if self.middleware_stack is not None:
            raise RuntimeError("Cannot add middleware after an application has started")
        self.added.append((cls, options))
        self.middleware_stack = cls(echo_app, **options)

    async def __call__(self, scope, receive, send):
        await self.middleware_stack(scope, receive, send)


@pytest.mark.parametrize("started", [False, True])
def test_install_api_validation(started):
    app = FakeStarlette(started)
    assert api.install_api_validation(app, name_exists=lambda n: False)
    assert not api.install_api_validation(app)  # once per app
    assert isinstance(app.middleware_stack, api.ApiArgsValidator)
    assert len(app.added) == (0 if started else 1)
    body = json.dumps({"alwayson_scripts": {"K-LoRA": {"args": [{"content": "a", "style": "b"}]}}}).encode()
    sent = run_asgi(app, "POST", "/sdapi/v1/txt2img", body)
    assert sent[0]["status"] == 422 and "no LoRA named 'a'" in json.loads(sent[1]["body"])["detail"]
