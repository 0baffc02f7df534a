"""klora.apply: forward hooks that add the chosen delta, checked against merged weights.

The oracle everywhere is a copy of the module(s), taken before any hook exists, whose weights had the
deltas the plan chooses at that τ merged in (W + ΔW, bias + Δb), run in fp32. LoRA/LoCon/Tucker deltas of
the oracle are rebuilt here (float64) from the factors read from the file, independently of klora.delta, so
a wrong factor layout in the low-rank path cannot agree with itself.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from synth import (
    build_unet,
    tiny_unet_config,
    unet_layer_shapes,
    write_full,
    write_kohya,
    write_loha,
    write_lokr,
    write_peft,
    write_tensors,
)
from torch import nn

import klora.apply as apply_mod
import klora.deltapaths as deltapaths
from klora.apply import (
    ShapeMismatchError,
    StepClock,
    Target,
    attach,
    attached,
    cache_info,
    clear_cache,
    set_cache_size,
    site,
)
from klora.delta import bias_delta, dense_delta
from klora.formats import read_lora
from klora.fusion import make_plan
from klora.keys.sd import module_targets
from klora.layers import LoraFile, LoraLayer
from klora.options import FusionOptions

STEPS = 8
ATOL, RTOL = 2e-5, 1e-4


# ----------------------------------------------------------------------------------------------------
# Deltas the oracle merges


def expected_delta(layer: LoraLayer, strength: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ΔW (and Δbias) the host would merge. Rebuilt here from the raw factors for LoRA kinds (in float64);
    LoHa/LoKr/full come from klora.delta (their formulas are tested with delta.py)."""
    if layer.kind == "lora":
        t = {k: v.double() for k, v in layer.tensors.items()}
        down, up = t["down"].flatten(1), t["up"].flatten(1)
        if "mid" in t:
            dw = torch.einsum("oa,abhw,bi->oihw", up, t["mid"], down)
        else:
            dw = (up @ down).reshape(layer.shape)
        return (strength * layer.scale * dw).float(), None
    return dense_delta(layer, strength), bias_delta(layer, strength)


def _magnitudes(seed: int) -> Callable[[str], float]:
    """Per-layer delta magnitudes in [0.4, 2.5), fixed by (seed, key): the layers' thresholds spread, so
    that they flip at different steps."""

    def f(key: str) -> float:
        h = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=4).digest()
        return 0.4 + 2.1 * int.from_bytes(h, "little") / 2**32

    return f


def _combine(path: Path, parts: list[Path]) -> Path:
    """One file holding the layers of several single-kind files (a file may mix kinds)."""
    tensors: dict[str, torch.Tensor] = {}
    for p in parts:
        tensors |= load_file(str(p))
        p.unlink()
    return write_tensors(path, tensors)


def _write(tmp: Path, name: str, writer: Callable[..., Path], shapes: dict[str, tuple[int, ...]],
           **kw) -> Path:
    return writer(tmp / f"{name}.safetensors", shapes, **kw)


# ----------------------------------------------------------------------------------------------------
# The tiny UNet and LoRA pairs for it


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny; several torch threads only slow them down on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_factor_cache():
    """Every test starts with an empty factor cache of the default size (files of equal content written
    by two tests would otherwise share prepared factors)."""
    size = cache_info()["size"]
    clear_cache()
    yield
    clear_cache()
    set_cache_size(size)


@pytest.fixture(scope="module")
def unet() -> nn.Module:
    model = build_unet(tiny_unet_config(), seed=0)
    model.requires_grad_(False)
    return model


def _inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=gen),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(2, 7, 32, generator=gen),
    }


BLOCK = "down_blocks_1_attentions_0_transformer_blocks_0"
MID = "mid_block_attentions_0_transformer_blocks_0"
UP = "up_blocks_0_attentions_1_transformer_blocks_0"

# Canonical key → (content kind, style kind); None: that file does not patch the module.
KOHYA_LAYERS: dict[str, tuple[str | None, str | None]] = {
    f"unet/{BLOCK}_attn1_to_q": ("lora", "lora"),
    f"unet/{BLOCK}_attn1_to_k": ("lora", "lora"),
    f"unet/{BLOCK}_attn1_to_v": ("lora", "lora"),
    f"unet/{BLOCK}_attn1_to_out_0": ("lora", "lora"),
    f"unet/{BLOCK}_attn2_to_q": ("lora", "lora"),
    f"unet/{BLOCK}_attn2_to_k": ("lora", "lora"),  # cross-attention: in = cross_attention_dim
    f"unet/{BLOCK}_ff_net_0_proj": ("lora", "lora"),
    f"unet/{BLOCK}_ff_net_2": ("lora", "lora"),
    "unet/down_blocks_1_attentions_0_proj_in": ("lora", "lora"),  # 1×1 conv
    "unet/down_blocks_1_attentions_0_proj_out": ("lora", "lora"),
    f"unet/{MID}_attn1_to_q": ("lora", "lora"),
    f"unet/{MID}_attn2_to_v": ("lora", None),  # only the content file
    f"unet/{MID}_attn1_to_v": (None, "lora"),  # only the style file
    "unet/down_blocks_0_resnets_0_conv1": ("lora", "lora"),  # 3×3 LoCon
    "unet/down_blocks_0_downsamplers_0_conv": ("lora", "lora"),  # 3×3, stride 2
    "unet/up_blocks_1_resnets_0_conv2": ("tucker", "lora"),  # Tucker vs plain LoCon
    "unet/up_blocks_1_resnets_0_conv_shortcut": ("lora", "lora"),  # 1×1
    "unet/up_blocks_0_upsamplers_0_conv": ("tucker", "tucker"),  # both Tucker
    f"unet/{UP}_attn1_to_q": ("loha", "lora"),
    f"unet/{UP}_attn1_to_k": ("lora", "lokr"),
    f"unet/{UP}_attn1_to_v": ("full", "lora"),
    "unet/up_blocks_1_resnets_1_conv1": ("lora", "full"),  # full conv with a bias diff
    "unet/up_blocks_0_resnets_0_time_emb_proj": ("loha", "lokr"),
}
PEFT_LAYERS = [
    f"unet/{BLOCK}_attn1_to_q", f"unet/{BLOCK}_attn1_to_k", f"unet/{BLOCK}_attn1_to_v",
    f"unet/{BLOCK}_attn1_to_out_0", f"unet/{BLOCK}_attn2_to_k", f"unet/{BLOCK}_ff_net_0_proj",
    "unet/down_blocks_1_attentions_0_proj_in", "unet/down_blocks_1_attentions_0_proj_out",
    f"unet/{MID}_attn1_to_q", f"unet/{MID}_attn1_to_out_0", "unet/down_blocks_0_resnets_1_conv2",
]


def write_kohya_pair(model: nn.Module, tmp: Path) -> tuple[Path, Path]:
    """Content (rank 4, alpha 2) and style (rank 8, no alpha) files in kohya form, mixing LoRA, LoCon,
    Tucker, LoHa, LoKr and full layers."""
    shapes = unet_layer_shapes(model)
    out = []
    for side, (name, rank, alpha, seed) in enumerate((("content", 4, 2.0, 10), ("style", 8, None, 20))):
        by_kind: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, kinds in KOHYA_LAYERS.items():
            if kinds[side] is not None:
                by_kind.setdefault(kinds[side], {})[key] = shapes[key]
        mag = _magnitudes(seed)
        parts = []
        for kind, sub in by_kind.items():
            part = f"{name}_{kind}"
            if kind in ("lora", "tucker"):
                parts.append(_write(tmp, part, write_kohya, sub, rank=rank, alpha=alpha, seed=seed,
                                    scale_by=mag, tucker=kind == "tucker"))
            elif kind == "loha":
                parts.append(_write(tmp, part, write_loha, sub, rank=2, alpha=1.0, seed=seed, scale_by=mag))
            elif kind == "lokr":
                parts.append(_write(tmp, part, write_lokr, sub, rank=2, alpha=2.0, seed=seed, scale_by=mag))
            else:
                parts.append(_write(tmp, part, write_full, sub, seed=seed, bias=True,
                                    scale_by=lambda k, mag=mag: 10 * mag(k)))
        out.append(_combine(tmp / f"{name}.safetensors", parts))
    return out[0], out[1]


def write_peft_pair(model: nn.Module, tmp: Path) -> tuple[Path, Path]:
    """diffusers/PEFT files: content rank 4 with lora_alpha 2 in the metadata, style rank 6 without
    metadata (alpha = rank) and without the first layer."""
    shapes = unet_layer_shapes(model)
    c = {k: shapes[k] for k in PEFT_LAYERS}
    s = {k: shapes[k] for k in PEFT_LAYERS[1:]}
    return (_write(tmp, "peft_c", write_peft, c, rank=4, seed=30, metadata_alpha=2.0,
                   scale_by=_magnitudes(30)),
            _write(tmp, "peft_s", write_peft, s, rank=6, seed=40, scale_by=_magnitudes(40)))


class MergedReference:
    """A copy of a UNet, taken before any hook exists (a deep copy would copy hooks too), into whose
    weights :meth:`at` merges the deltas the plan chooses at τ (after restoring the copy's weights)."""

    def __init__(self, unet: nn.Module, plan, content: LoraFile, style: LoraFile) -> None:
        self.model = copy.deepcopy(unet)
        self.plan, self.content, self.style = plan, content, style
        self.modules = module_targets(self.model, "unet", "diffusers")
        self.saved = {k: (m.weight.clone(), None if m.bias is None else m.bias.clone())
                      for k, m in self.modules.items() if k in plan.layers}

    def at(self, tau: float) -> nn.Module:
        opts = self.plan.options
        with torch.no_grad():
            for key, (w, b) in self.saved.items():
                target = self.modules[key]
                target.weight.copy_(w)
                target.bias = None if b is None else nn.Parameter(b.clone(), requires_grad=False)
                choice = self.plan.choose(key, tau)
                for side, file, strength in (("content", self.content, opts.content_strength),
                                             ("style", self.style, opts.style_strength)):
                    layer = file.layers.get(key)
                    if layer is None or choice not in (side, "both"):
                        continue
                    dw, db = expected_delta(layer, strength)
                    target.weight += dw.reshape(target.weight.shape)
                    if db is not None:
                        _bias(target).add_(db)
        return self.model


def _bias(module: nn.Module) -> torch.Tensor:
    """The module's bias; a zero one for a module without (a host merging a bias delta adds one)."""
    if module.bias is None:
        module.bias = nn.Parameter(torch.zeros(module.weight.shape[0]), requires_grad=False)
    return module.bias


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def _assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == before.keys()
    for name, t in now.items():
        assert torch.equal(t, before[name]), name
    hooked = [n for n, m in model.named_modules() if m._forward_hooks]
    assert not hooked, hooked


# ----------------------------------------------------------------------------------------------------
# The UNet: every step of a run equals the merged copy


@pytest.mark.parametrize("form", ["kohya", "peft"])
@pytest.mark.parametrize("pattern", ["s", "s*"])
def test_unet_hooks_equal_merged_weights_at_every_step(unet, tmp_path, form, pattern):
    writer = write_kohya_pair if form == "kohya" else write_peft_pair
    content, style = (read_lora(p) for p in writer(unet, tmp_path))
    plan = make_plan(content, style, FusionOptions(pattern=pattern, content_strength=0.8, style_strength=1.3))
    modules = module_targets(unet, "unet", "diffusers")
    assert set(content.layers) | set(style.layers) <= set(modules)
    if form == "kohya":
        kinds = {layer.kind for f in (content, style) for layer in f.layers.values()}
        assert kinds == {"lora", "loha", "lokr", "full"}
        assert any("mid" in layer.tensors for layer in content.layers.values())
    targets = {k: Target(m) for k, m in modules.items()}
    before = _snapshot(unet)
    reference = MergedReference(unet, plan, content, style)
    inputs = _inputs()
    with torch.no_grad():
        plain = unet(**inputs).sample

    clock = StepClock()
    seen: dict[str, set[str]] = {}
    with torch.no_grad(), attached(plan, content, style, targets, clock) as hooks:
        assert set(hooks.keys) == set(plan.layers) and hooks.missing == ()
        for step in range(STEPS):
            clock.set_step(step, STEPS)
            assert clock.tau == step / STEPS
            got = unet(**inputs).sample
            want = reference.at(clock.tau)(**inputs).sample
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
            assert (got - plain).abs().max() > 1000 * ATOL  # the deltas are far above the tolerance
            for key in plan.layers:
                seen.setdefault(key, set()).add(plan.choose(key, clock.tau))
    # The run really exercised both sides, and layers that change their choice mid-run.
    shared = [k for k in plan.layers if k in content.layers and k in style.layers]
    assert sum(seen[k] == {"content", "style"} for k in shared) >= 2
    assert {c for k in shared for c in seen[k]} == {"content", "style"}
    _assert_untouched(unet, before)


def test_unet_detaches_when_the_forward_raises(unet, tmp_path):
    content, style = (read_lora(p) for p in write_kohya_pair(unet, tmp_path))
    plan = make_plan(content, style, FusionOptions())
    targets = {k: Target(m) for k, m in module_targets(unet, "unet", "diffusers").items()}
    before = _snapshot(unet)
    clock = StepClock()
    bad = _inputs()
    bad["encoder_hidden_states"] = torch.randn(2, 7, 5)  # wrong width: fails in attn2, after hooked layers
    calls = []
    probe = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    handle = probe.register_forward_hook(lambda *a: calls.append(1))
    try:
        with (pytest.raises(RuntimeError), torch.no_grad(),
              attached(plan, content, style, targets, clock) as hooks):
            assert hooks.attached
            clock.set_step(3, STEPS)
            unet(**bad)
    finally:
        handle.remove()
    assert calls, "the forward ran into hooked layers before it failed"
    assert not hooks.attached
    assert clock._listeners == []
    _assert_untouched(unet, before)
    hooks.remove()  # removing again is harmless


def test_merge_mode_adds_both(unet, tmp_path):
    content, style = (read_lora(p) for p in write_kohya_pair(unet, tmp_path))
    plan = make_plan(content, style, FusionOptions(mode="merge", content_strength=0.7, style_strength=1.1))
    targets = {k: Target(m) for k, m in module_targets(unet, "unet", "diffusers").items()}
    reference = MergedReference(unet, plan, content, style)
    clock = StepClock()
    inputs = _inputs(2)
    with torch.no_grad(), attached(plan, content, style, targets, clock):
        for step in (0, 5):
            clock.set_step(step, STEPS)
            shared = [k for k in plan.layers if k in content.layers and k in style.layers]
            assert all(plan.choose(k, clock.tau) == "both" for k in shared)
            want = reference.at(clock.tau)(**inputs).sample
            torch.testing.assert_close(unet(**inputs).sample, want, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------------
# Plain modules: conv geometry, fused rows, dtypes, selection and caching


def _merged_module(module: nn.Module, plan, content: LoraFile, style: LoraFile, tau: float,
                   pieces: dict[str, slice | None]) -> nn.Module:
    """A copy of ``module`` with the chosen deltas of ``pieces`` (key → output rows) merged in."""
    ref = copy.deepcopy(module)
    opts = plan.options
    with torch.no_grad():
        for key, rows in pieces.items():
            choice = plan.choose(key, tau)
            for side, file, strength in (("content", content, opts.content_strength),
                                         ("style", style, opts.style_strength)):
                if key in file.layers and choice in (side, "both"):
                    dw, db = expected_delta(file.layers[key], strength)
                    sel = slice(None) if rows is None else rows
                    ref.weight[sel] += dw.reshape(ref.weight[sel].shape)
                    if db is not None:
                        _bias(ref)[sel] += db
    return ref


CONVS = {
    "unet/k3": lambda: nn.Conv2d(6, 10, 3, padding=1),
    "unet/k3s2": lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1),
    "unet/k35_dil": lambda: nn.Conv2d(6, 10, (3, 5), stride=(1, 2), padding=(2, 1), dilation=(2, 1)),
    "unet/k5_valid": lambda: nn.Conv2d(6, 10, 5, padding="valid"),
    "unet/k3_same_reflect": lambda: nn.Conv2d(6, 10, 3, padding="same", padding_mode="reflect"),
    "unet/k3_circular_s2": lambda: nn.Conv2d(6, 10, 3, stride=2, padding=1, padding_mode="circular"),
    "unet/k1": lambda: nn.Conv2d(6, 10, 1),
}


@pytest.mark.parametrize("tucker", [False, True])
def test_conv_geometries_equal_merged(tmp_path, tucker):
    torch.manual_seed(3)
    mods = {key: make() for key, make in CONVS.items()}
    shapes = {key: tuple(m.weight.shape) for key, m in mods.items()}
    content = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=3, alpha=1.5, seed=1, tucker=tucker,
                               scale_by=_magnitudes(1)))
    style = read_lora(_write(tmp_path, "s", write_kohya, shapes, rank=5, seed=2, scale_by=_magnitudes(2)))
    assert tucker == ("mid" in content.layers["unet/k3"].tensors)
    plan = make_plan(content, style, FusionOptions(content_strength=1.2))
    refs = {key: copy.deepcopy(m) for key, m in mods.items()}
    clock = StepClock()
    x = torch.randn(2, 6, 13, 11, generator=torch.Generator().manual_seed(5))
    seen = set()
    with torch.no_grad(), attached(plan, content, style, {k: Target(m) for k, m in mods.items()}, clock):
        for step in range(STEPS):
            clock.set_step(step, STEPS)
            for key, m in mods.items():
                seen.add(plan.choose(key, clock.tau))
                want = _merged_module(refs[key], plan, content, style, clock.tau, {key: None})(x)
                torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
                assert (want - refs[key](x)).abs().max() > 0.1
    assert seen == {"content", "style"}


def test_fused_row_slices_equal_merging_split_deltas(tmp_path):
    """q/k/v LoRAs on a fused qkv Linear, and two halves of a fused conv, each added to its own rows."""
    torch.manual_seed(4)
    fused, fused_conv = nn.Linear(16, 3 * 12), nn.Conv2d(4, 2 * 6, 3, padding=1)
    parts = {"unet/blk_attn_to_q": slice(0, 12), "unet/blk_attn_to_k": slice(12, 24),
             "unet/blk_attn_to_v": slice(24, 36)}
    cparts = {"unet/blk_conv_a": slice(0, 6), "unet/blk_conv_b": slice(6, None)}
    shapes = {k: (12, 16) for k in parts} | {k: (6, 4, 3, 3) for k in cparts}
    content = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=2, alpha=1.0, seed=1,
                               scale_by=_magnitudes(1)))
    style = read_lora(_write(tmp_path, "s", write_kohya, shapes, rank=4, seed=2, scale_by=_magnitudes(2)))
    plan = make_plan(content, style, FusionOptions(style_strength=0.9))
    targets = {k: Target(fused, rows) for k, rows in parts.items()}
    targets |= {k: Target(fused_conv, rows) for k, rows in cparts.items()}
    ref0, refc0 = copy.deepcopy(fused), copy.deepcopy(fused_conv)
    gen = torch.Generator().manual_seed(6)
    x, xc = torch.randn(3, 5, 16, generator=gen), torch.randn(2, 4, 7, 7, generator=gen)
    clock = StepClock()
    seen = set()
    with torch.no_grad(), attached(plan, content, style, targets, clock) as hooks:
        assert len(fused._forward_hooks) == 3 and len(fused_conv._forward_hooks) == 2
        for step in range(STEPS):
            clock.set_step(step, STEPS)
            seen |= set(hooks.choices().values())
            want = _merged_module(ref0, plan, content, style, clock.tau, parts)(x)
            torch.testing.assert_close(fused(x), want, atol=1e-5, rtol=1e-5)
            want = _merged_module(refc0, plan, content, style, clock.tau, {k: cparts[k] for k in cparts})(xc)
            torch.testing.assert_close(fused_conv(xc), want, atol=1e-5, rtol=1e-5)
    assert seen == {"content", "style"}
    assert not fused._forward_hooks and not fused_conv._forward_hooks


def test_fused_rows_under_autograd_keep_the_graph(tmp_path):
    fused = nn.Linear(8, 12)
    lora = read_lora(_write(tmp_path, "c", write_kohya, {"unet/qkv_q": (4, 8)}, rank=2, seed=7))
    plan = make_plan(lora, lora, FusionOptions())  # the same file twice: one delta, whichever side
    x = torch.randn(2, 8, requires_grad=True)
    with attached(plan, lora, lora, {"unet/qkv_q": Target(fused, slice(0, 4))}, StepClock()):
        fused(x).sum().backward()
    want = fused.weight.detach().clone()
    want[:4] += expected_delta(lora.layers["unet/qkv_q"], 1.0)[0]
    torch.testing.assert_close(x.grad, want.sum(0).expand(2, 8), atol=1e-5, rtol=1e-5)
    assert fused.weight.grad is not None  # the module's own graph is intact


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_linear_runs_in_the_input_dtype(tmp_path, dtype):
    torch.manual_seed(8)
    lin32 = nn.Linear(64, 48)
    shapes = {"unet/lin": (48, 64)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=8, alpha=4.0, seed=1, scale_by=3.0))
    s = read_lora(_write(tmp_path, "s", write_kohya, shapes, rank=4, seed=2, scale_by=2.0))
    plan = make_plan(c, s, FusionOptions())
    lin = copy.deepcopy(lin32).to(dtype)
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(8))
    clock = StepClock()
    with torch.no_grad(), attached(plan, c, s, {"unet/lin": Target(lin)}, clock):
        for tau in (0.0, 0.99):
            clock.tau = tau
            got = lin(x.to(dtype))
            assert got.dtype == dtype
            want = _merged_module(lin32, plan, c, s, tau, {"unet/lin": None})(x)
            assert (want - lin32(x)).abs().max() > 0.5  # the delta matters at this precision
            torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)


class _Fp32Linear(nn.Linear):
    """A Linear that computes in float32 with autocast turned off inside, as hosts' upcast layers do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", enabled=False):
            return super().forward(x.float())


def test_float32_output_under_autocast(tmp_path):
    """The hook runs under the caller's autocast; a module that returns float32 there still gets the delta
    (the low-rank products must not mix autocast's bfloat16 with the float32 output)."""
    torch.manual_seed(14)
    lin = _Fp32Linear(24, 16)
    shapes = {"unet/lin": (16, 24)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=4, seed=1, scale_by=2.0))
    plan = make_plan(c, c, FusionOptions())
    x = torch.randn(3, 24, generator=torch.Generator().manual_seed(14))
    ref = nn.Linear(24, 16)
    ref.load_state_dict(lin.state_dict())
    with torch.no_grad():
        want = _merged_module(ref, plan, c, c, 0.0, {"unet/lin": None})(x)
        assert (want - ref(x)).abs().max() > 0.1
        with attached(plan, c, c, {"unet/lin": Target(lin)}, StepClock()), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            got = lin(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("attach_in_inference_mode", [False, True])
def test_calls_after_inference_mode_can_record_autograd(tmp_path, attach_in_inference_mode):
    """Factor copies made during an inference_mode call (or factors prepared under it) are reused by
    later calls; a later call that records autograd must still work."""
    torch.manual_seed(15)
    shapes = {"unet/lin": (12, 8)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=2, seed=1, scale_by=2.0))
    s = read_lora(_write(tmp_path, "s", write_kohya, shapes, rank=3, seed=2))
    plan = make_plan(c, s, FusionOptions(mode="merge"))
    for dtype in (torch.float32, torch.float64):  # float64: copies made on first use
        lin = nn.Linear(8, 12).to(dtype)
        ref = copy.deepcopy(lin)
        with torch.no_grad():
            ref.weight += (expected_delta(c.layers["unet/lin"], 1.0)[0]
                           + expected_delta(s.layers["unet/lin"], 1.0)[0]).to(dtype)
        clock = StepClock()
        if attach_in_inference_mode:
            with torch.inference_mode():
                hooks = attach(plan, c, s, {"unet/lin": Target(lin)}, clock)
        else:
            hooks = attach(plan, c, s, {"unet/lin": Target(lin)}, clock)
        with hooks:
            with torch.inference_mode():
                lin(torch.randn(2, 8, dtype=dtype))
            x = torch.randn(2, 8, dtype=dtype, requires_grad=True)
            y = lin(x)
            y.sum().backward()
        x2 = x.detach().clone().requires_grad_(True)
        ref(x2).sum().backward()
        torch.testing.assert_close(y, ref(x.detach()), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)


class _InferenceLinear(nn.Linear):
    """A Linear whose forward runs in inference mode itself: its output is an inference tensor, which the
    hook (running after the forward, outside that mode) must not change in place."""

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


@pytest.mark.parametrize("rows", [None, slice(2, 10)])
def test_inference_tensor_output_outside_inference_mode(tmp_path, rows):
    torch.manual_seed(16)
    lin = _InferenceLinear(6, 12)
    key = "unet/lin"
    c = read_lora(_write(tmp_path, "c", write_kohya, {key: (8 if rows else 12, 6)}, rank=2, seed=1,
                         scale_by=2.0))
    plan = make_plan(c, c, FusionOptions())
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(16))
    ref = nn.Linear(6, 12)
    ref.load_state_dict(lin.state_dict())
    with torch.no_grad():
        want = _merged_module(ref, plan, c, c, 0.0, {key: rows})(x)
        with attached(plan, c, c, {key: Target(lin, rows)}, StepClock()):
            got = lin(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class _StridedLinear(nn.Linear):
    """A Linear whose output is a non-contiguous view (as some hosts' patched layers return)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).transpose(0, 1).contiguous().transpose(0, 1)


def test_non_contiguous_output(tmp_path):
    torch.manual_seed(10)
    lin = _StridedLinear(12, 20)
    shapes = {"unet/lin": (20, 12)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=3, seed=1, scale_by=2.0))
    plan = make_plan(c, c, FusionOptions())
    x = torch.randn(3, 5, 12, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        assert not lin(x).is_contiguous()
        ref = nn.Linear(12, 20)
        ref.load_state_dict(lin.state_dict())
        want = _merged_module(ref, plan, c, c, 0.0, {"unet/lin": None})(x)
        assert (want - ref(x)).abs().max() > 0.1
        with attached(plan, c, c, {"unet/lin": Target(lin)}, StepClock()):
            torch.testing.assert_close(lin(x), want, atol=1e-5, rtol=1e-5)


def test_factors_move_once_per_device_and_dtype(tmp_path, monkeypatch):
    lin = nn.Linear(32, 32).half()
    shapes = {"unet/lin": (32, 32)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=4, seed=1))
    s = read_lora(_write(tmp_path, "s", write_full, shapes, seed=2, bias=True))
    plan = make_plan(c, s, FusionOptions(mode="merge"))  # both: the low-rank and the dense path
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(9)).half()
    calls = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        calls.append(1)
        return real_to(self, *args, **kwargs)

    with torch.no_grad(), attached(plan, c, s, {"unet/lin": Target(lin)}, StepClock()) as hooks:
        assert plan.choose("unet/lin", 0.0) == "both"
        monkeypatch.setattr(torch.Tensor, "to", counting_to)
        lin(x)
        first = len(calls)
        for _ in range(3):
            lin(x)
        monkeypatch.undo()
        assert first > 0 and len(calls) == first  # moved on the first call only
        # No dense ΔW kept for the low-rank kind; the full kind has its dense diff and bias.
        t = c.layers["unet/lin"].tensors
        assert hooks.factor_bytes == 4 * (t["down"].numel() + t["up"].numel() + 32 * 32 + 32)


def test_choices_are_computed_once_per_tau_change(unet, tmp_path):
    content, style = (read_lora(p) for p in write_kohya_pair(unet, tmp_path))
    real = make_plan(content, style, FusionOptions())

    class CountingPlan:
        """Delegates to the real plan and counts choose() calls."""

        layers, options, calls = real.layers, real.options, 0

        def choose(self, key, tau):
            CountingPlan.calls += 1
            return real.choose(key, tau)

    targets = {k: Target(m) for k, m in module_targets(unet, "unet", "diffusers").items()}
    clock = StepClock()
    n = len(real.layers)
    with torch.no_grad(), attached(CountingPlan(), content, style, targets, clock):
        assert CountingPlan.calls == n
        unet(**_inputs())
        unet(**_inputs())
        assert CountingPlan.calls == n
        clock.set_step(1, 10)
        assert CountingPlan.calls == 2 * n
        clock.set_step(1, 10)  # the same τ: nothing to do
        clock.tau = 0.1
        unet(**_inputs())
        assert CountingPlan.calls == 2 * n
    clock.set_step(5, 10)  # detached: the clock no longer drives these hooks
    assert CountingPlan.calls == 2 * n


@pytest.mark.parametrize("te", ["none", "content", "style", "both"])
def test_text_encoder_policy(tmp_path, te):
    shapes = {"te1/text_model_encoder_layers_0_self_attn_q_proj": (16, 16)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=4, seed=1))
    s = read_lora(_write(tmp_path, "s", write_kohya, shapes, rank=4, seed=2))
    (key,) = c.layers
    plan = make_plan(c, s, FusionOptions(te=te))
    assert plan.choose(key, 0.5) == te
    lin = nn.Linear(16, 16)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        want = _merged_module(lin, plan, c, s, 0.5, {key: None})(x)
        with attached(plan, c, s, {key: Target(lin)}, StepClock(0.5)):
            got = lin(x)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert (te == "none") == torch.equal(got, lin(x))


# ----------------------------------------------------------------------------------------------------
# Errors, clock, removal


def test_shape_mismatch_names_key_and_shapes_and_attaches_nothing(unet, tmp_path):
    content, style = (read_lora(p) for p in write_kohya_pair(unet, tmp_path))
    plan = make_plan(content, style, FusionOptions())
    modules = module_targets(unet, "unet", "diffusers")
    key, wrong = f"unet/{BLOCK}_attn1_to_q", f"unet/{BLOCK}_attn2_to_k"  # (64, 64) vs (64, 32)
    targets = {k: Target(m) for k, m in modules.items()}
    targets[key] = Target(modules[wrong])
    clock = StepClock()
    with pytest.raises(ShapeMismatchError) as err:
        attach(plan, content, style, targets, clock)
    msg = str(err.value)
    assert key in msg and "(64, 64)" in msg and "(64, 32)" in msg and "content" in msg
    assert isinstance(err.value, ValueError)
    assert not [n for n, m in unet.named_modules() if m._forward_hooks]
    assert clock._listeners == []
    # Rows that do not fit the layer's output features are a mismatch too.
    targets[key] = Target(modules[key], slice(0, 32))
    with pytest.raises(ShapeMismatchError, match=r"rows 0:32 of 64"):
        attach(plan, content, style, targets, clock)
    # A 3×3 LoCon layer on a 1×1 conv.
    targets[key] = Target(modules[key])
    conv_key = "unet/down_blocks_0_resnets_0_conv1"
    targets[conv_key] = Target(modules["unet/up_blocks_1_resnets_0_conv_shortcut"])
    with pytest.raises(ShapeMismatchError, match=conv_key):
        attach(plan, content, style, targets, clock)
    assert not [n for n, m in unet.named_modules() if m._forward_hooks]


def test_unsupported_modules_are_refused(tmp_path):
    shapes = {"unet/a": (8, 8)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=2, seed=1))
    plan = make_plan(c, c, FusionOptions())
    for module in (nn.Conv2d(8, 8, 1, groups=2), nn.Conv1d(8, 8, 1), nn.LayerNorm(8)):
        with pytest.raises(ValueError, match="unet/a"):
            attach(plan, c, c, {"unet/a": Target(module)}, StepClock())
        assert not module._forward_hooks


def test_linear_and_1x1_conv_accept_each_other(tmp_path):
    """A 1×1-conv LoRA (proj_in of SD1.5) on a Linear (SDXL-style proj_in) and the other way round."""
    gen = torch.Generator().manual_seed(14)
    conv_shaped = read_lora(_write(tmp_path, "c", write_kohya, {"unet/p": (10, 6, 1, 1)}, rank=3, seed=1))
    lin_shaped = read_lora(_write(tmp_path, "l", write_kohya, {"unet/p": (10, 6)}, rank=3, seed=2))
    lin, conv = nn.Linear(6, 10), nn.Conv2d(6, 10, 1)
    x, xc = torch.randn(4, 6, generator=gen), torch.randn(1, 6, 3, 3, generator=gen)
    for f in (conv_shaped, lin_shaped):
        plan = make_plan(f, f, FusionOptions())
        dw = expected_delta(f.layers["unet/p"], 1.0)[0].reshape(10, 6)
        with torch.no_grad():
            with attached(plan, f, f, {"unet/p": Target(lin)}, StepClock()):
                torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight + dw, lin.bias))
            with attached(plan, f, f, {"unet/p": Target(conv)}, StepClock()):
                want = torch.nn.functional.conv2d(xc, conv.weight + dw[..., None, None], conv.bias)
                torch.testing.assert_close(conv(xc), want)


class _PackedLinear(nn.Module):
    """A Linear-like module as quantised ops keep it (GGUF, bitsandbytes NF4): an ``nn.Module`` with a packed
    weight and no ``in_features``/``out_features``; the forward unpacks."""

    def __init__(self, dense: nn.Linear) -> None:
        super().__init__()
        self.packed = nn.Parameter(dense.weight.detach().reshape(-1, 1).clone())  # shape says nothing
        self.bias = nn.Parameter(dense.bias.detach().clone())
        self.logical = tuple(dense.weight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.packed.reshape(self.logical), self.bias)


def test_a_linear_without_declared_features_takes_the_targets_shape(tmp_path):
    """GGUF/NF4 Linears declare no features: the host's shape places the delta (rows of a fused one too);
    without it the module is refused, never guessed from the packed weight."""
    torch.manual_seed(15)
    dense = nn.Linear(8, 12)
    packed = _PackedLinear(dense)
    shapes = {"unet/q": (4, 8), "unet/k": (4, 8)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=2, seed=1))
    s = read_lora(_write(tmp_path, "s", write_kohya, shapes, rank=3, seed=2))
    plan = make_plan(c, s, FusionOptions(mode="merge"))
    rows = {"unet/q": slice(0, 4), "unet/k": slice(4, 8)}
    with pytest.raises(ValueError, match="cannot hook a _PackedLinear"):
        attach(plan, c, s, {k: Target(packed, r) for k, r in rows.items()}, StepClock())
    assert not packed._forward_hooks
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(15))
    targets = {k: Target(packed, r, shape=(12, 8)) for k, r in rows.items()}
    assert [site(k, t).shape for k, t in targets.items()] == [(4, 8), (4, 8)]
    with torch.no_grad(), attached(plan, c, s, targets, StepClock()):
        torch.testing.assert_close(packed(x), _merged_module(dense, plan, c, s, 0.0, rows)(x))
    assert not packed._forward_hooks


def test_missing_targets_are_reported_not_fatal(tmp_path):
    c = read_lora(_write(tmp_path, "c", write_kohya, {"unet/a": (8, 8), "unet/b": (8, 8)}, rank=2, seed=1))
    plan = make_plan(c, c, FusionOptions())
    with attached(plan, c, c, {"unet/a": Target(nn.Linear(8, 8))}, StepClock()) as hooks:
        assert hooks.keys == ("unet/a",)
        assert hooks.missing == ("unet/b",)


def test_step_clock():
    clock = StepClock()
    assert clock.tau == 0.0
    assert clock.set_step(3, 10) == 0.3
    assert clock.set_step(2, 6, skipped=4) == pytest.approx(0.6)  # img2img: τ continues at (4+2)/10
    assert clock.set_step(12, 10) == 1.0
    assert clock.set_step(-1, 10) == 0.0
    clock.tau = 0.25
    assert clock.tau == 0.25
    clock.tau = 7
    assert clock.tau == 1.0
    with pytest.raises(ValueError):
        clock.set_step(0, 0)
    with pytest.raises(ValueError):
        clock.tau = float("nan")
    assert StepClock(0.4).tau == 0.4


def test_remove_is_idempotent_and_restores_plain_output(tmp_path):
    c = read_lora(_write(tmp_path, "c", write_kohya, {"unet/lin": (8, 8)}, rank=2, seed=1))
    plan = make_plan(c, c, FusionOptions())
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(13))
    before = _snapshot(lin)
    with torch.no_grad():
        plain = lin(x)
        hooks = attach(plan, c, c, {"unet/lin": Target(lin)}, StepClock())
        assert not torch.allclose(lin(x), plain)
        hooks.remove()
        hooks.remove()
        with hooks:
            pass
        hooks.remove()
        assert torch.equal(lin(x), plain)
    _assert_untouched(lin, before)


# ----------------------------------------------------------------------------------------------------
# Prepared factors cached across attaches


class _Counts:
    """Counts what ``attach`` and the hooks prepare: the layers sent to klora.delta (kind, key, strength),
    the device/dtype copies made, and the stacked content+style factors built."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.prepared: list[tuple[str, str, float]] = []
        self.copies = 0
        self.stacked = 0
        real_low_rank, real_dense = apply_mod.low_rank, apply_mod.dense_delta
        real_ordinary, real_combine = deltapaths.ordinary, apply_mod.combine

        def low_rank(layer, strength=1.0):
            self.prepared.append((layer.kind, layer.key, strength))
            return real_low_rank(layer, strength)

        def dense(layer, strength=1.0):
            self.prepared.append((layer.kind, layer.key, strength))
            return real_dense(layer, strength)

        def ordinary(t):
            self.copies += 1
            return real_ordinary(t)

        def combine(a, b):
            both = real_combine(a, b)
            self.stacked += isinstance(both, deltapaths.DeltaPath)  # a PathSum of the two holds no tensors
            return both

        monkeypatch.setattr(apply_mod, "low_rank", low_rank)
        monkeypatch.setattr(apply_mod, "dense_delta", dense)
        monkeypatch.setattr(deltapaths, "ordinary", ordinary)
        monkeypatch.setattr(apply_mod, "combine", combine)

    def reset(self) -> None:
        self.prepared, self.copies, self.stacked = [], 0, 0


def test_a_second_attach_of_the_same_plan_prepares_and_copies_nothing(unet, tmp_path, monkeypatch):
    content, style = (read_lora(p) for p in write_kohya_pair(unet, tmp_path))
    model = copy.deepcopy(unet).double()  # float64: the hooks make copies of the fp32 factors
    targets = {k: Target(m) for k, m in module_targets(model, "unet", "diffusers").items()}
    plans = [make_plan(content, style, FusionOptions(pattern="s*", content_strength=0.8)),
             make_plan(content, style, FusionOptions(mode="merge", content_strength=0.8))]
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in _inputs().items()}
    counts = _Counts(monkeypatch)

    def run() -> list[torch.Tensor]:
        outs = []
        for plan in plans:
            clock = StepClock()
            with torch.no_grad(), attached(plan, content, style, targets, clock):
                for step in (0, 3, 7):
                    clock.set_step(step, STEPS)
                    outs.append(model(**inputs).sample)
        return outs

    cold = run()
    assert len(counts.prepared) >= len(content.layers) + len(style.layers)
    assert counts.copies > 0 and counts.stacked > 0
    assert cache_info()["files"] == 2
    counts.reset()
    warm = run()
    assert (counts.prepared, counts.copies, counts.stacked) == ([], 0, 0)
    set_cache_size(0)  # a fresh attach, nothing cached
    fresh = run()
    assert len(counts.prepared) >= len(content.layers) + len(style.layers) and counts.copies > 0
    assert cache_info()["files"] == 0
    for a, b, c in zip(cold, warm, fresh, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(cold[0], cold[3])  # the plans differ (the outputs say something)


def _lin_pair(tmp_path: Path) -> tuple[LoraFile, LoraFile, dict[str, Target], torch.Tensor]:
    shapes = {"unet/a": (12, 16), "unet/b": (12, 16)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=2, seed=1, scale_by=2.0))
    s = read_lora(_write(tmp_path, "s", write_full, shapes, seed=2, bias=True))
    torch.manual_seed(17)
    lin = nn.Linear(16, 12).double()
    targets = {"unet/a": Target(lin), "unet/b": Target(lin)}  # two layers, two hooks on one module
    return c, s, targets, torch.randn(3, 16, generator=torch.Generator().manual_seed(17), dtype=torch.float64)


def test_other_strengths_prepare_new_factors_and_the_cache_is_lru_bounded(tmp_path, monkeypatch):
    c, s, targets, x = _lin_pair(tmp_path)
    lin = targets["unet/a"].module
    counts = _Counts(monkeypatch)
    set_cache_size(2)

    def run(style_strength: float) -> tuple[torch.Tensor, set[tuple[str, float]], Any]:
        counts.reset()
        plan = make_plan(c, s, FusionOptions(mode="merge", style_strength=style_strength))
        with torch.no_grad(), attached(plan, c, s, targets, StepClock()) as hooks:
            out = lin(x)
        return out, {(kind, strength) for kind, _, strength in counts.prepared}, hooks

    first, prepared, hooks1 = run(1.0)
    assert prepared == {("lora", 1.0), ("full", 1.0)}
    style_path = hooks1._layers[0].style
    assert style_path._cache  # kept after remove: the cache holds it
    second, prepared, _ = run(0.5)  # content touched first, so the style at 1.0 is the oldest entry
    assert prepared == {("full", 0.5)}
    assert not torch.equal(first, second)
    assert cache_info()["files"] == 2 and cache_info()["size"] == 2
    assert not style_path._cache  # evicted: its device copies are freed
    third, prepared, _ = run(1.0)
    assert prepared == {("full", 1.0)}  # prepared anew; the content at 1.0 was still cached
    assert torch.equal(first, third)
    set_cache_size(1)
    assert cache_info()["files"] == 1
    set_cache_size(0)
    assert cache_info()["files"] == cache_info()["pairs"] == cache_info()["paths"] == 0


def test_clear_cache_frees_copies_and_attached_hooks_keep_working(tmp_path, monkeypatch):
    c, s, targets, x = _lin_pair(tmp_path)
    lin = targets["unet/a"].module
    plan = make_plan(c, s, FusionOptions(mode="merge"))
    counts = _Counts(monkeypatch)
    with torch.no_grad(), attached(plan, c, s, targets, StepClock()) as hooks:
        want = lin(x)
        paths = [h.content for h in hooks._layers] + [h.style for h in hooks._layers]
        assert cache_info()["files"] == 2 and cache_info()["paths"] > 0
        clear_cache()
        assert cache_info() == {"files": 0, "size": cache_info()["size"], "pairs": 0, "paths": 0,
                                "hits": 0, "misses": 0}
        assert not any(p._cache for p in paths)
        assert torch.equal(lin(x), want)  # new copies, made again on this call
        assert any(p._cache for p in paths)
    assert not any(p._cache for p in paths)  # no longer cached: freed on removal
    counts.reset()
    with torch.no_grad(), attached(plan, c, s, targets, StepClock()):
        assert torch.equal(lin(x), want)
    assert counts.prepared and counts.copies


def test_without_cache_hooks_free_their_copies_on_removal(tmp_path, monkeypatch):
    c, s, targets, x = _lin_pair(tmp_path)
    lin = targets["unet/a"].module
    plan = make_plan(c, s, FusionOptions(mode="merge"))
    set_cache_size(0)
    counts = _Counts(monkeypatch)
    for _ in range(2):
        counts.reset()
        with torch.no_grad(), attached(plan, c, s, targets, StepClock()) as hooks:
            lin(x)
            paths = [h.content for h in hooks._layers] + [h.style for h in hooks._layers]
            assert all(p._cache for p in paths)
        assert not any(p._cache for p in paths)
        assert counts.prepared and counts.copies


def test_cached_copies_made_in_inference_mode_serve_a_later_autograd_attach(tmp_path):
    torch.manual_seed(18)
    shapes = {"unet/lin": (12, 8)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=2, seed=1, scale_by=2.0))
    s = read_lora(_write(tmp_path, "s", write_kohya, shapes, rank=3, seed=2))
    plan = make_plan(c, s, FusionOptions(mode="merge"))  # both low-rank: one stacked path
    lin = nn.Linear(8, 12).double()
    ref = copy.deepcopy(lin)
    with torch.no_grad():
        ref.weight += (expected_delta(c.layers["unet/lin"], 1.0)[0]
                       + expected_delta(s.layers["unet/lin"], 1.0)[0]).double()
    targets = {"unet/lin": Target(lin)}
    with torch.inference_mode(), attached(plan, c, s, targets, StepClock()) as hooks:
        lin(torch.randn(2, 8, dtype=torch.float64))
        first = hooks._layers[0]._both._cache
    copies = [t for ts in first.values() for t in ts if t is not None]
    assert copies and not any(t.is_inference() for t in copies)
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    with attached(plan, c, s, targets, StepClock()) as hooks:
        y = lin(x)
        y.sum().backward()
        again = [t for ts in hooks._layers[0]._both._cache.values() for t in ts if t is not None]
    assert len(again) == len(copies) and all(a is b for a, b in zip(again, copies, strict=True))
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(y, ref(x.detach()))
    torch.testing.assert_close(x.grad, x2.grad)


def test_torch_compile_traces_the_hooks_without_graph_breaks(tmp_path):
    """Inside a compiled module the hooks are traced into the graph (an inference-tensor check would break
    it at every hooked layer); a τ change is followed (dynamo guards on the hooks' chosen delta)."""
    from torch._dynamo.utils import counters

    shapes = {"unet/0": (16, 16), "unet/1": (16, 16)}
    c = read_lora(_write(tmp_path, "c", write_kohya, shapes, rank=2, seed=1, scale_by=3.0))
    s = read_lora(_write(tmp_path, "s", write_kohya, shapes, rank=2, seed=2))
    plan = make_plan(c, s, FusionOptions(mode="random", seed=5))
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    targets = {"unet/0": Target(model[0]), "unet/1": Target(model[1])}
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(4))
    clock = StepClock()
    taus = [i / 4 for i in range(4)]
    with torch.no_grad(), attached(plan, c, s, targets, clock):
        expected = []
        for tau in taus:  # eager: also makes the factors' copies for this device and dtype
            clock.tau = tau
            expected.append(model(x))
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend="eager")
        try:
            for tau, want in zip(taus, expected, strict=True):
                clock.tau = tau
                torch.testing.assert_close(compiled(x), want)
            assert not counters["graph_break"]
        finally:
            torch._dynamo.reset()
    assert len({tuple(plan.choose(k, t) for k in shapes) for t in taus}) > 1  # the choices do change
