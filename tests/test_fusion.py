"""klora.fusion: exact Top-K sums, γ, S(τ), the strict rule, modes, scope, TE policy, caching."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from klora import scores
from klora.delta import dense_delta
from klora.fusion import Plan, make_plan
from klora.keys import is_attention
from klora.layers import LoraFile, LoraLayer
from klora.options import FusionOptions
from klora.scores import layer_rank, pair_scores

Q = "unet/down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
K2 = "unet/down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
OUT = "unet/up_blocks_1_attentions_2_transformer_blocks_1_attn2_to_out_0"
FF = "unet/down_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj"
CONV = "unet/down_blocks_1_resnets_0_conv1"
TE = "te1/text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture(autouse=True)
def _fresh_cache():
    scores.clear_cache()
    scores.set_cache_size(8)
    yield
    scores.clear_cache()
    scores.set_cache_size(8)


# ------------------------------------------------------------------------------------------------ helpers


def lora(key: str, shape: tuple[int, ...], rank: int, alpha: float | None = None, seed: int = 0,
         mag: float = 1.0, mid: bool = False) -> LoraLayer:
    g = torch.Generator().manual_seed(seed)
    out, inp = shape[0], shape[1]
    kernel = tuple(shape[2:])
    def rnd(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g)

    if mid:
        t = {"down": rnd(rank, inp, 1, 1), "mid": rnd(rank, rank, *kernel), "up": rnd(out, rank, 1, 1) * mag}
    elif kernel:
        t = {"down": rnd(rank, inp, *kernel), "up": rnd(out, rank, 1, 1) * mag}
    else:
        t = {"down": rnd(rank, inp), "up": rnd(out, rank) * mag}
    return LoraLayer(key, key, "lora", t, alpha, rank, tuple(shape))


def full(key: str, diff: torch.Tensor) -> LoraLayer:
    return LoraLayer(key, key, "full", {"diff": diff}, None, None, tuple(diff.shape))


def lfile(layers: list[LoraLayer], sha: str = "", name: str = "f") -> LoraFile:
    return LoraFile(f"/x/{name}.safetensors", name, sha, {layer.key: layer for layer in layers})


def naive(lc: LoraLayer, ls: LoraLayer, cs: float = 1.0, ss: float = 1.0) -> tuple[int, float, ...]:
    """The reference: dense effective ΔW, full torch.topk, float64 sums."""
    k = min(layer_rank(lc) * layer_rank(ls), math.prod(lc.shape))
    out: list[float] = []
    for layer, s in ((lc, cs), (ls, ss)):
        a = dense_delta(layer, s).abs().flatten()
        out += [float(torch.topk(a, k).values.sum(dtype=torch.float64)), float(a.sum(dtype=torch.float64))]
    return k, out[0], out[2], out[1], out[3]


def s_of(plan: Plan, tau: float) -> float:
    """S(τ) written out independently of Plan.scale."""
    a, b = plan.options.resolved_alpha, plan.options.resolved_beta
    s = a * tau + b
    return math.fmod(s, a) % a if plan.options.pattern == "s*" else s


# ------------------------------------------------------------------------------------- scores vs naive
# (the Top-K kernel itself is tested against torch.topk in tests/test_topk.py)


def _pairs():
    yield lora(Q, (96, 64), 4, 2.0, 1), lora(Q, (96, 64), 8, 8.0, 2, mag=0.3)
    yield lora(K2, (96, 48), 8, None, 3), lora(K2, (96, 48), 2, 1.0, 4)
    yield lora(OUT, (40, 40), 16, 3.0, 5), lora(OUT, (40, 40), 16, 7.0, 6)  # K = 256 of 1600
    yield lora(CONV, (32, 16, 3, 3), 4, 1.0, 7), lora(CONV, (32, 16, 3, 3), 8, 4.0, 8)
    yield lora(CONV, (32, 16, 3, 3), 4, 2.0, 9, mid=True), lora(CONV, (32, 16, 3, 3), 4, None, 10)
    yield lora(FF, (12, 10), 8, 8.0, 11), lora(FF, (12, 10), 8, 8.0, 12)  # K = 64 of 120
    yield lora(FF, (6, 5), 8, 8.0, 13), lora(FF, (6, 5), 8, 8.0, 14)  # K = 64 > numel 30: clamped
    yield lora(Q, (64, 64), 4, 4.0, 15, mag=0.0), lora(Q, (64, 64), 4, 4.0, 16)  # all-zero content


@pytest.mark.parametrize("strengths", [(1.0, 1.0), (0.7, 1.3), (-0.5, 2.0)])
def test_scores_equal_naive(strengths):
    cs, ss = strengths
    for i, (lc, ls) in enumerate(_pairs()):
        got = pair_scores(lfile([lc], f"c{i}"), lfile([ls], f"s{i}"), cs, ss).layers[lc.key]
        k, sc, s_s, l1c, l1s = naive(lc, ls, cs, ss)
        assert got.k == k
        # Same float32 |ΔW| values, same descending order, float64 sum: bit for bit, for every kind (the
        # strength × scale multiplies |U| once, as dense_delta multiplies U).
        assert got.score_content == sc, i
        assert got.score_style == s_s, i
        # L1: rows accumulate in float32, rows in float64, strength applied to the sum.
        assert got.l1_content == pytest.approx(l1c, rel=1e-6, abs=0), i
        assert got.l1_style == pytest.approx(l1s, rel=1e-6, abs=0), i


def test_layer_stats_scaled_are_the_dense_delta_top_k_bitwise():
    for layer in (lora(Q, (48, 40), 4, 3.0, 1), lora(CONV, (16, 8, 3, 3), 4, 1.5, 2),
                  lora(CONV, (16, 8, 3, 3), 4, 1.5, 3, mid=True)):
        stats = scores.layer_stats(layer, 50)
        for s in (1.0, 0.35, -1.7):
            want = torch.topk(dense_delta(layer, s).abs().flatten(), 50).values
            assert torch.equal(stats.top * abs(s * layer.scale), want)


def test_other_kinds_equal_naive():
    g = torch.Generator().manual_seed(3)
    def rnd(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g)

    hada = {"w1a": rnd(24, 2), "w1b": rnd(2, 20), "w2a": rnd(24, 2), "w2b": rnd(2, 20)}
    loha = LoraLayer(Q, Q, "loha", hada, 1.0, 2, (24, 20))
    lokr = LoraLayer(Q, Q, "lokr", {"w1": rnd(4, 5), "w2": rnd(6, 4)}, None, None, (24, 20))
    dff = full(Q, torch.randn(24, 20, generator=g))
    plain = lora(Q, (24, 20), 3, 1.5, 4)
    for lc, ls in ((loha, plain), (plain, lokr), (dff, loha), (lokr, dff)):
        for cs in (1.0, 0.6):
            got = pair_scores(lfile([lc]), lfile([ls]), cs, 1.0).layers[Q]
            k, sc, s_s, l1c, l1s = naive(lc, ls, cs, 1.0)
            assert got.k == k
            assert got.score_content == (sc if cs == 1.0 else pytest.approx(sc, rel=1e-6, abs=0))
            assert got.score_style == s_s
            assert got.l1_content == pytest.approx(l1c, rel=1e-6, abs=0)
            assert got.l1_style == pytest.approx(l1s, rel=1e-6, abs=0)


def test_rank_fallback_for_full_layers():
    dff = full(CONV, torch.randn(20, 3, 3, 3))  # in·kh·kw = 27
    assert layer_rank(dff) == 20
    assert layer_rank(full(Q, torch.randn(10, 30))) == 10
    plain = lora(CONV, (20, 3, 3, 3), 2)
    got = pair_scores(lfile([dff]), lfile([plain])).layers[CONV]
    assert got.k == 40  # 20 · 2
    other = full(CONV, torch.randn(20, 3, 3, 3))
    both_full = pair_scores(lfile([dff]), lfile([other])).layers[CONV]
    assert both_full.k == 400 and both_full.score_content == naive(dff, other)[1]
    wide = full(Q, torch.randn(3, 5))  # rank min(3, 5) = 3; with a rank-8 partner K = 24, clamped to 15
    clamped = pair_scores(lfile([wide]), lfile([lora(Q, (3, 5), 8)])).layers[Q]
    assert clamped.k == 15 and clamped.score_content == pytest.approx(clamped.l1_content, rel=1e-6)


# ----------------------------------------------------------------------------------------------- gamma


def _ratio_files(ratios: list[float], extra_c: list[LoraLayer] = (), extra_s: list[LoraLayer] = ()):
    """Content/style full layers whose L1 ratio per layer is exactly ``ratios[i]`` (constant entries)."""
    keys = [f"unet/down_blocks_0_attentions_0_transformer_blocks_{i}_attn1_to_q" for i in range(len(ratios))]
    c = [full(k, torch.full((4, 4), float(r))) for k, r in zip(keys, ratios, strict=True)]
    s = [full(k, torch.ones(4, 4)) for k in keys]
    return lfile(c + list(extra_c), name="c"), lfile(s + list(extra_s), name="s"), keys


def test_gamma_auto_drops_outliers_and_paper_sums():
    c, s, _ = _ratio_files([1, 1, 1, 1, 10])  # mean 2.8; 10 ≥ 8.4 dropped
    plan = make_plan(c, s, FusionOptions())
    assert plan.gamma == 1.0 and plan.gamma_method == "auto"
    assert make_plan(c, s, FusionOptions(gamma="paper")).gamma == pytest.approx(14 / 5)
    c, s, _ = _ratio_files([1, 1, 1, 1, 6])  # mean 2: 6 = 3·mean is dropped too ("≥")
    assert make_plan(c, s).gamma == 1.0
    c, s, _ = _ratio_files([1, 2, 3, 6])  # mean 3; 6 < 9 kept
    assert make_plan(c, s).gamma == pytest.approx(3.0)
    manual = make_plan(c, s, FusionOptions(gamma=0.25))
    assert manual.gamma == 0.25 and manual.gamma_method == "manual"


def test_gamma_only_over_scored_denoiser_layers():
    huge_te = (full(TE, torch.full((4, 4), 1000.0)), full(TE, torch.ones(4, 4)))
    huge_ff = (full(FF, torch.full((4, 4), 1000.0)), full(FF, torch.ones(4, 4)))
    c, s, _ = _ratio_files([2, 2], extra_c=[huge_te[0], huge_ff[0]], extra_s=[huge_te[1], huge_ff[1]])
    assert make_plan(c, s, FusionOptions(scope="attention", gamma="paper")).gamma == pytest.approx(2.0)
    assert make_plan(c, s, FusionOptions(scope="attention")).gamma == pytest.approx(2.0)
    # scope all takes the feed-forward layer in, never the text encoder
    assert make_plan(c, s, FusionOptions(scope="all", gamma="paper")).gamma == pytest.approx(1004 / 3)


def test_gamma_degenerate_cases():
    c, s, keys = _ratio_files([0, 0, 0])  # content all zero: every ratio 0, all dropped
    plan = make_plan(c, s)
    assert plan.gamma == 1.0 and "fallback" in plan.gamma_note
    assert all(plan.choices(k, 10) == "S" * 10 for k in keys)
    c = lfile([full(keys[0], torch.ones(4, 4))], name="c")
    s = lfile([full(keys[0], torch.zeros(4, 4))], name="s")
    for g in ("auto", "paper"):
        plan = make_plan(c, s, FusionOptions(gamma=g))
        assert plan.gamma == 1.0
        assert plan.layers[keys[0]].threshold == math.inf
        assert plan.choices(keys[0], 7) == "C" * 7  # S_s = 0 < S_c: content wins at every step
    zero = lfile([full(keys[0], torch.zeros(4, 4))], name="z")
    plan = make_plan(zero, s)
    assert plan.choices(keys[0], 5) == "SSSSS"  # both zero: 0 > 0 is false
    assert plan.layers[keys[0]].threshold == -math.inf


# ------------------------------------------------------------------------------------ the rule and ties


def test_identical_files_flip_exactly_where_scale_reaches_one():
    layers = [lora(Q, (32, 24), 4, 2.0, 1), lora(K2, (32, 40), 4, 2.0, 2)]
    f = lfile(layers, "same")
    plan = make_plan(f, f, FusionOptions())
    assert plan.gamma == 1.0
    # S(τ) = 1.5τ + 0.5 = 1 at step 10 of 30 exactly; S_c = S_s, so the strict rule gives style there.
    assert all(plan.choices(k, 30) == "C" * 10 + "S" * 20 for k in (Q, K2))
    # γ cancels the strengths: content at twice the strength has twice the L1 and twice the scores.
    plan2 = make_plan(f, f, FusionOptions(content_strength=2.0))
    assert plan2.gamma == 2.0
    assert all(plan2.choices(k, 30) == "C" * 10 + "S" * 20 for k in (Q, K2))
    # γ·S(τ) = 1 at every step: style throughout (strict); topk mode with S_c = S_s likewise.
    flat = make_plan(f, f, FusionOptions(alpha=0.0, beta=0.5, gamma=2.0))
    assert flat.choices(Q, 12) == "S" * 12
    assert make_plan(f, f, FusionOptions(mode="topk")).choices(Q, 12) == "S" * 12


def test_choose_is_the_inequality():
    g = torch.Generator().manual_seed(5)
    layers_c, layers_s = [], []
    for i in range(12):
        key = f"unet/up_blocks_0_attentions_0_transformer_blocks_{i}_attn1_to_v"
        mag = float(torch.rand(1, generator=g)) * 3
        layers_c.append(lora(key, (24, 24), 2 + i % 3, 1.0, 100 + i, mag=mag))
        layers_s.append(lora(key, (24, 24), 4, None, 200 + i))
    c, s = lfile(layers_c, "cc"), lfile(layers_s, "ss")
    for opts in (FusionOptions(), FusionOptions(pattern="s*"),
                 FusionOptions(gamma="paper", alpha=2.0, beta=0.0),
                 FusionOptions(pattern="s*", alpha=0.7, beta=0.1, gamma=1.7)):
        plan = make_plan(c, s, opts)
        for key, lp in plan.layers.items():
            for i in range(101):
                tau = i / 100
                direct = lp.score_content > plan.gamma * s_of(plan, tau) * lp.score_style
                assert plan.choose(key, tau) == ("content" if direct else "style")
                st = s_of(plan, tau)
                if abs(st - lp.threshold) > 1e-9 * max(1.0, abs(st)):
                    assert (st < lp.threshold) == direct


def test_patterns_and_flips():
    c = lfile([lora(f"unet/mid_block_attentions_0_transformer_blocks_{i}_attn2_to_q", (16, 16), 4, 4.0, i,
                    mag=0.5 + i / 8) for i in range(16)], "c")
    s = lfile([lora(k, (16, 16), 4, 4.0, 50 + i) for i, k in enumerate(c.layers)], "s")
    ps = make_plan(c, s, FusionOptions(pattern="s"))
    pstar = make_plan(c, s, FusionOptions(pattern="s*"))
    assert (ps.alpha, ps.beta) == (1.5, 0.5) and (pstar.alpha, pstar.beta) == (1.5, 1.275)
    assert pstar.scale(0.0) == 1.275 and pstar.scale(0.2) == pytest.approx(0.075)  # wrapped
    assert make_plan(c, s, FusionOptions(pattern="s*", beta=0.2)).beta == 0.2
    for key in c.layers:
        f = ps.flips(key, 40)
        assert len(f) <= 1 and all(ps.choices(key, 40)[i] == "S" for i in f)  # C → S only
        assert len(pstar.flips(key, 40)) <= 3
    assert any(pstar.flips(k, 40) for k in c.layers)
    row = ps.choices(next(iter(c.layers)), 40)
    assert ps.flips(next(iter(c.layers)), 40) == [i for i in range(1, 40) if row[i] != row[i - 1]]
    share = ps.content_share(40)
    assert len(share) == 40 and share[0] >= share[-1]
    assert ps.k_range == (16, 16)


# -------------------------------------------------------------------------------- modes, scope, TE, single


def _mixed_files():
    c = lfile([lora(Q, (16, 16), 2, 2.0, 1), lora(FF, (32, 16), 2, 2.0, 2), lora(TE, (16, 16), 2, 2.0, 3),
               lora("unet/conv_in", (8, 4, 3, 3), 2, 2.0, 4),
               lora("te2/text_model_final", (8, 8), 2, 2.0, 5)], "mc")
    s = lfile([lora(Q, (16, 16), 4, 4.0, 11), lora(FF, (32, 16), 4, 4.0, 12), lora(TE, (16, 16), 4, 4.0, 13),
               lora("unet/conv_out", (4, 8, 3, 3), 4, 4.0, 14),
               lora("te1/text_model_only_style", (8, 8), 4, 4.0, 15)], "ms")
    return c, s


def test_scope_te_policy_and_single_file_layers():
    c, s = _mixed_files()
    plan = make_plan(c, s, FusionOptions(scope="attention"))
    assert list(plan.layers) == [Q, FF, TE, "unet/conv_in", "te2/text_model_final", "unet/conv_out",
                                 "te1/text_model_only_style"]
    assert plan.layers[Q].constant is None and plan.layers[Q].k == 8
    assert plan.layers[FF].constant == "both" and plan.layers[FF].k is None  # outside the scope
    assert plan.choices(FF, 4) == "BBBB"
    assert plan.choices("unet/conv_in", 4) == "CCCC" and plan.layers["unet/conv_in"].source == "content"
    assert plan.choices("unet/conv_out", 4) == "SSSS" and plan.layers["unet/conv_out"].source == "style"
    assert make_plan(c, s, FusionOptions(scope="all")).layers[FF].constant is None
    # policy → (shared TE layer, content-only TE layer, style-only TE layer)
    table = {"both": ("B", "C", "S"), "content": ("C", "C", "-"), "style": ("S", "-", "S"),
             "none": ("-", "-", "-")}
    for te, (shared, content_only, style_only) in table.items():
        p = make_plan(c, s, FusionOptions(te=te))
        assert p.choices(TE, 3) == shared * 3
        assert p.choices("te2/text_model_final", 3) == content_only * 3
        assert p.choices("te1/text_model_only_style", 3) == style_only * 3
        assert p.layers[TE].k is None


def test_modes():
    c, s = _mixed_files()
    merge = make_plan(c, s, FusionOptions(mode="merge", scope="attention"))
    assert merge.choices(Q, 5) == "BBBBB" and merge.choices(FF, 5) == "BBBBB"
    assert merge.choices("unet/conv_in", 3) == "CCC"
    fixed = make_plan(c, s, FusionOptions(mode="fixed", alpha=1.5, beta=0.25))
    # S(τ) = 1.5τ + 0.25 ≤ 1 up to τ = 0.5 inclusive
    assert fixed.choices(Q, 10) == "CCCCCCSSSS" and fixed.layers[Q].threshold is None
    topk = make_plan(c, s, FusionOptions(mode="topk"))
    lp = topk.layers[Q]
    assert topk.choices(Q, 6) == ("C" if lp.score_content > lp.score_style else "S") * 6
    assert lp.threshold == lp.score_content / lp.score_style


def test_random_mode_is_seeded_and_one_third():
    keys = [f"unet/up_blocks_1_attentions_{i % 3}_transformer_blocks_{i}_attn1_to_k" for i in range(200)]
    c = lfile([lora(k, (4, 4), 1, None, i) for i, k in enumerate(keys)], "rc")
    s = lfile([lora(k, (4, 4), 1, None, 1000 + i) for i, k in enumerate(keys)], "rs")
    p1 = make_plan(c, s, FusionOptions(mode="random", seed=7))
    p2 = make_plan(c, s, FusionOptions(mode="random", seed=7))
    p3 = make_plan(c, s, FusionOptions(mode="random", seed=8))
    rows1 = [p1.choices(k, 50) for k in keys]
    assert rows1 == [p2.choices(k, 50) for k in keys]
    assert rows1 != [p3.choices(k, 50) for k in keys]
    share = sum(r.count("C") for r in rows1) / (len(keys) * 50)
    assert abs(share - 1 / 3) < 0.02  # 10 000 draws: σ ≈ 0.005
    assert p1.choose(keys[0], 0.3) == p1.choose(keys[0], 0.3)  # two calls in one step agree
    assert p1.choose(keys[0], -0.0) == p1.choose(keys[0], 0.0)


def test_random_mode_takes_any_integer_seed():
    """Seeds outside the signed 64-bit range (API callers, 2**64 - 1 style sentinels) draw, not crash."""
    c = lfile([lora(Q, (4, 4), 1, None, 1)], "rc")
    s = lfile([lora(Q, (4, 4), 1, None, 2)], "rs")
    for seed in (2**63, 2**64 + 12345, -(2**63) - 1):
        row = make_plan(c, s, FusionOptions(mode="random", seed=seed)).choices(Q, 20)
        assert len(row) == 20 and set(row) <= {"C", "S"}
    # draws of seeds in the signed range are unchanged; only the 64 low bits count
    assert (make_plan(c, s, FusionOptions(mode="random", seed=2**64 - 1)).choices(Q, 40)
            == make_plan(c, s, FusionOptions(mode="random", seed=-1)).choices(Q, 40))


def test_is_attention():
    yes = [Q, K2, OUT, "unet/mid_block_attentions_0_transformer_blocks_3_attn2_to_v",
           "transformer/transformer_blocks_0_attn_to_q", "transformer/single_transformer_blocks_3_attn_to_k"]
    no = [FF, CONV, "unet/down_blocks_1_attentions_0_proj_in",
          "transformer/transformer_blocks_0_attn_add_q_proj",
          "unet/down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_1", TE]
    assert all(is_attention(k) for k in yes)
    assert not any(is_attention(k) for k in no)


def test_linear_layout_and_1x1_conv_layout_pair():
    """SD1.5's proj_in is a 1×1 conv: LoRA files give (out, in, 1, 1), LoHa/LoKr ones (out, in). Both are
    the same delta layout (the hooks accept either); the pair is scored, not refused."""
    key = "unet/down_blocks_1_attentions_0_proj_in"
    g = torch.Generator().manual_seed(21)
    hada = {n: torch.randn(*size, generator=g) for n, size in
            (("w1a", (24, 2)), ("w1b", (2, 20)), ("w2a", (24, 2)), ("w2b", (2, 20)))}
    loha = LoraLayer(key, key, "loha", hada, 1.0, 2, (24, 20))
    conv = lora(key, (24, 20, 1, 1), 4, 2.0, 22)
    for lc, ls in ((loha, conv), (conv, loha)):
        got = pair_scores(lfile([lc]), lfile([ls])).layers[key]
        k, sc, s_s, l1c, l1s = naive(lc, ls)
        assert (got.k, got.score_content, got.score_style) == (k, sc, s_s)
        assert got.l1_content == pytest.approx(l1c, rel=1e-6, abs=0)
        assert got.l1_style == pytest.approx(l1s, rel=1e-6, abs=0)
    with pytest.raises(ValueError, match="same base model"):  # a real 3×3 kernel is not a Linear
        pair_scores(lfile([lora(CONV, (8, 4, 3, 3), 2)]), lfile([lora(CONV, (8, 36), 2)]))


def test_shape_mismatch_and_bad_options():
    with pytest.raises(ValueError, match="same base model"):
        pair_scores(lfile([lora(Q, (8, 8), 2)]), lfile([lora(Q, (8, 16), 2)]))
    for bad in (dict(pattern="x"), dict(mode="blend"), dict(scope="ff"), dict(te="all"), dict(gamma=0),
                dict(gamma=-1.0), dict(gamma=math.nan), dict(gamma="mean"), dict(gamma=True),
                dict(alpha=math.inf), dict(content_strength=math.nan), dict(pattern="s*", alpha=0.0),
                dict(seed=1.5)):
        with pytest.raises(ValueError):
            FusionOptions(**bad)
    with pytest.raises(ValueError):
        make_plan(lfile([]), lfile([])).choices(Q, 0)


# --------------------------------------------------------------------------------------------- caching


def test_pair_and_file_caches(monkeypatch):
    calls = []
    real = scores.layer_stats
    monkeypatch.setattr(scores, "layer_stats", lambda layer, *a: calls.append(layer.key) or real(layer, *a))
    c = lfile([lora(Q, (24, 24), 4, 2.0, 1), lora(K2, (24, 32), 4, 2.0, 2)], "a" * 64, "c")
    s = lfile([lora(Q, (24, 24), 8, 8.0, 3), lora(K2, (24, 32), 8, 8.0, 4)], "b" * 64, "s")
    s2 = lfile([lora(Q, (24, 24), 8, 4.0, 5), lora(K2, (24, 32), 8, 4.0, 6)], "d" * 64, "s2")
    first = make_plan(c, s)
    assert len(calls) == 4
    again = make_plan(c, s, FusionOptions(pattern="s*", gamma="paper", mode="topk"))
    assert len(calls) == 4 and scores.cache_info()["pair_hits"] == 1
    assert again.layers[Q].score_content == first.layers[Q].score_content
    make_plan(c, s, FusionOptions(content_strength=0.5))  # new pair entry, file statistics reused
    assert len(calls) == 4
    make_plan(c, s2)  # the content file's statistics are reused
    assert len(calls) == 6
    s3 = lfile([lora(Q, (24, 24), 16, 4.0, 7), lora(K2, (24, 32), 16, 4.0, 8)], "e" * 64, "s3")
    larger = make_plan(c, s3)  # K grows from 32 to 64: the content layers are scored again
    assert len(calls) == 10
    for key in (Q, K2):
        lp = larger.layers[key]
        assert (lp.k, lp.score_content) == naive(c.layers[key], s3.layers[key])[:2]
    shorter = make_plan(c, s, FusionOptions(content_strength=0.9))  # K = 32 from the 64-long Top list
    assert len(calls) == 10
    assert shorter.layers[Q].score_content == naive(c.layers[Q], s.layers[Q], 0.9)[1]
    scores.clear_cache()
    make_plan(c, s)
    assert len(calls) == 14
    scores.set_cache_size(0)
    make_plan(c, s)
    make_plan(c, s)
    assert len(calls) == 22
    info = scores.cache_info()
    assert info["pairs"] == 0 and info["files"] == 0


def test_cache_never_mixes_files_without_hash():
    a = lfile([lora(Q, (8, 8), 2, None, 1)], "", "a")
    b = lfile([lora(Q, (8, 8), 2, None, 1, mag=5.0)], "", "b")  # the same factors, up × 5
    s = lfile([lora(Q, (8, 8), 2, None, 3)], "", "s")
    sa, sb = make_plan(a, s).layers[Q].score_content, make_plan(b, s).layers[Q].score_content
    assert sb == pytest.approx(5 * sa, rel=1e-5)


def test_lru_eviction():
    scores.set_cache_size(2)
    files = [lfile([lora(Q, (8, 8), 2, None, i)], f"{i:064x}", str(i)) for i in range(4)]
    for f in files[1:]:
        pair_scores(files[0], f)
    assert scores.cache_info()["pairs"] == 2 and scores.cache_info()["files"] == 4
    before = scores.cache_info()["pair_hits"]
    pair_scores(files[0], files[3])
    assert scores.cache_info()["pair_hits"] == before + 1
    pair_scores(files[0], files[1])  # evicted earlier
    assert scores.cache_info()["pair_hits"] == before + 1


# ------------------------------------------------------------------------------------- real files


def test_files_read_from_disk(tmp_path: Path):
    from klora.formats import read_lora
    from tests import synth

    shapes = {Q: (64, 64), K2: (64, 96), OUT: (64, 64), CONV: (32, 16, 3, 3), TE: (48, 48)}
    pc = synth.write_kohya(tmp_path / "c.safetensors", shapes, rank=4, alpha=2, seed=1)
    ps = synth.write_diffusers_old(tmp_path / "s.safetensors", shapes, rank=8, seed=2)  # no alpha: scale 1
    c, s = read_lora(pc), read_lora(ps)
    assert c.sha256 and s.sha256 and c.sha256 != s.sha256
    plan = make_plan(c, s, FusionOptions())
    assert set(plan.layers) == set(shapes)
    assert plan.choices(TE, 4) == "BBBB"
    for key in (Q, K2, OUT, CONV):
        lp = plan.layers[key]
        k, sc, s_s, _, _ = naive(c.layers[key], s.layers[key])
        assert (lp.k, lp.score_content, lp.score_style) == (k, sc, s_s)
        assert plan.choices(key, 20) == "".join(
            "C" if sc > plan.gamma * (1.5 * (i / 20) + 0.5) * s_s else "S" for i in range(20))
    assert make_plan(read_lora(pc), read_lora(ps)).layers[Q] == plan.layers[Q]  # cached by content hash
    assert scores.cache_info()["pair_hits"] == 1


# ------------------------------------------------------------------------------------- balance and K


def test_balance_weights_the_style_side_by_four_to_the_b():
    g = torch.Generator().manual_seed(11)
    layers_c, layers_s = [], []
    for i in range(10):
        key = f"unet/up_blocks_1_attentions_0_transformer_blocks_{i}_attn2_to_k"
        layers_c.append(lora(key, (24, 24), 3, 2.0, 300 + i, mag=float(torch.rand(1, generator=g)) * 3))
        layers_s.append(lora(key, (24, 24), 4, None, 400 + i))
    c, s = lfile(layers_c, "c" * 64, "c"), lfile(layers_s, "s" * 64, "s")
    base = make_plan(c, s)
    steps = 40
    rows = {}
    for b in (-1.0, -0.5, 0.0, 0.25, 1.0):
        plan = make_plan(c, s, FusionOptions(balance=b))
        assert plan.gamma == base.gamma  # γ itself is the rule's; the balance weights on top of it
        for key, lp in plan.layers.items():
            for i in range(steps):
                tau = i / steps
                direct = lp.score_content > base.gamma * 4.0 ** b * s_of(plan, tau) * lp.score_style
                assert plan.choose(key, tau) == ("content" if direct else "style")
        rows[b] = "".join(plan.choices(k, steps) for k in plan.layers)
    assert rows[0.0] == "".join(base.choices(k, steps) for k in base.layers)  # 0: the paper's rule exactly
    content = [rows[b].count("C") for b in sorted(rows)]
    assert content == sorted(content, reverse=True) and content[0] > content[-1]  # more style, less content
    key = next(iter(c.layers))  # topk compares S_c with S_s alone: no γ, no balance
    assert make_plan(c, s, FusionOptions(balance=1.0, mode="topk")).choices(key, 8) == \
        make_plan(c, s, FusionOptions(mode="topk")).choices(key, 8)


def test_k_override_sums_that_many_entries_and_is_clamped():
    lc = lora(Q, (24, 20), 4, 2.0, 1)
    ls = lora(Q, (24, 20), 2, None, 2)
    c, s = lfile([lc], "a" * 64, "c"), lfile([ls], "b" * 64, "s")
    for k in (1, 7, 100, 24 * 20, 10_000):
        scored = pair_scores(c, s, k=k).layers[Q]
        n = min(k, 24 * 20)
        assert scored.k == n
        for layer, got in ((lc, scored.score_content), (ls, scored.score_style)):
            want = float(torch.topk(dense_delta(layer).abs().flatten(), n).values.sum(dtype=torch.float64))
            assert got == want
    assert pair_scores(c, s).layers[Q].k == 8  # default: r_c·r_s
    assert make_plan(c, s, FusionOptions(k=5)).layers[Q].k == 5
    with pytest.raises(ValueError, match="whole number"):
        FusionOptions(k=2.5)
    with pytest.raises(ValueError, match="≥ 1"):
        FusionOptions(k=-2)
    assert FusionOptions(k=0).k is None  # 0: the default (what an empty gradio number box sends)


def test_files_without_a_content_hash_bypass_the_disk_cache(tmp_path):
    """Files built in memory (no sha256 of real bytes) are scored, never written to or read from disk."""
    c = lfile([lora(Q, (24, 24), 4, 2.0, 1)], "x" * 64, "c")  # not a hex digest
    s = lfile([lora(Q, (24, 24), 8, 8.0, 3)], "", "s")
    scores.set_disk_cache(tmp_path / "klora")
    try:
        assert make_plan(c, s).layers[Q].k == 32
        assert not (tmp_path / "klora").exists() or not list((tmp_path / "klora").iterdir())
    finally:
        scores.set_disk_cache(None)
        scores.clear_cache()


def test_disk_cache_spares_a_restart_the_products(tmp_path, monkeypatch):
    """A second process (memory caches empty) reads the per-file tables from the disk cache and scores
    the pair without forming a product; a corrupt entry is ignored and rewritten."""
    calls = []
    real = scores.layer_stats
    monkeypatch.setattr(scores, "layer_stats", lambda layer, *a: calls.append(layer.key) or real(layer, *a))
    c = lfile([lora(Q, (24, 24), 4, 2.0, 1), lora(K2, (24, 32), 4, 2.0, 2)], "a" * 64, "c")
    s = lfile([lora(Q, (24, 24), 8, 8.0, 3), lora(K2, (24, 32), 8, 8.0, 4)], "b" * 64, "s")
    scores.set_disk_cache(tmp_path / "klora")
    try:
        first = make_plan(c, s)
        assert len(calls) == 4 and len(list((tmp_path / "klora").glob("*.safetensors"))) == 2
        scores.clear_cache()  # a restart: nothing in memory
        again = make_plan(c, s, FusionOptions(content_strength=0.7))
        assert len(calls) == 4  # every table came from the disk
        assert again.layers[Q].score_style == first.layers[Q].score_style
        for entry in (tmp_path / "klora").glob("*.safetensors"):
            entry.write_bytes(entry.read_bytes()[:-7])  # truncated by a crash
        scores.clear_cache()
        third = make_plan(c, s)
        assert len(calls) == 8  # the broken entries are misses: scored again, identically
        assert [lp.score_content for lp in third.layers.values()] == \
            [lp.score_content for lp in first.layers.values()]
        scores.clear_cache()
        make_plan(c, s)
        assert len(calls) == 8  # and were rewritten
    finally:
        scores.set_disk_cache(None)
        scores.clear_cache()
