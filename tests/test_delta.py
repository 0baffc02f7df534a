"""klora.delta against independent formulas computed here from the raw tensors of real files.

Each oracle reads the file with ``safetensors.torch.load_file`` (not through klora.formats) and rebuilds ΔW
its own way: explicit loops, einsum with other index names, convolutions applied in sequence.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from synth import (
    kohya_name,
    write_diffusers_old,
    write_full,
    write_kohya,
    write_loha,
    write_lokr,
    write_peft,
    write_tensors,
)

from klora.delta import LowRank, bias_delta, dense_delta, low_rank
from klora.formats import read_lora

LIN = {"unet/down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (24, 12)}
CONV3 = {"unet/mid_block_resnets_0_conv1": (16, 12, 3, 3)}
CONV1 = {"unet/down_blocks_1_resnets_0_conv_shortcut": (16, 8, 1, 1)}
ALL = {**LIN, **CONV3, **CONV1}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == torch.float32
    assert a.shape == b.shape
    torch.testing.assert_close(a, b.to(torch.float32), rtol=1e-5, atol=1e-6)


def _raw(p: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(p)).items()}


def test_kohya_linear_and_conv(tmp_path: Path) -> None:
    p = write_kohya(tmp_path / "k.safetensors", ALL, rank=3, alpha=1.5, seed=4)
    raw, lf = _raw(p), read_lora(p)
    for key, shape in ALL.items():
        n = kohya_name(key)
        down, up = raw[n + ".lora_down.weight"], raw[n + ".lora_up.weight"]
        r = down.shape[0]
        expected = (1.5 / r) * (up.reshape(shape[0], r) @ down.reshape(r, -1)).reshape(shape)
        _close(dense_delta(lf.layers[key]), expected)


def test_kohya_conv_delta_equals_the_lora_convolutions(tmp_path: Path) -> None:
    """ΔW of a 3×3 LoCon (plain and Tucker) applied by F.conv2d equals running the factors as convs."""
    x = torch.randn(2, 12, 9, 7, dtype=torch.float64)
    for tucker in (False, True):
        p = write_kohya(tmp_path / f"t{tucker}.safetensors", CONV3, rank=4, alpha=2, seed=5, tucker=tucker)
        raw, layer = _raw(p), read_lora(p).layers["unet/mid_block_resnets_0_conv1"]
        n = kohya_name("unet/mid_block_resnets_0_conv1")
        if tucker:
            h = F.conv2d(x, raw[n + ".lora_down.weight"])
            h = F.conv2d(h, raw[n + ".lora_mid.weight"], padding=1)
        else:
            h = F.conv2d(x, raw[n + ".lora_down.weight"], padding=1)
        expected = F.conv2d(h, raw[n + ".lora_up.weight"]) * (2 / 4)
        got = F.conv2d(x, dense_delta(layer).double(), padding=1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_tucker_einsum(tmp_path: Path) -> None:
    p = write_kohya(tmp_path / "t.safetensors", CONV3, rank=3, alpha=None, tucker=True, seed=2)
    raw = _raw(p)
    n = kohya_name("unet/mid_block_resnets_0_conv1")
    up, mid, down = raw[n + ".lora_up.weight"], raw[n + ".lora_mid.weight"], raw[n + ".lora_down.weight"]
    expected = torch.einsum("xa,abhw,by->xyhw", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    _close(dense_delta(read_lora(p).layers["unet/mid_block_resnets_0_conv1"]), expected)


@pytest.mark.parametrize("writer", ["old", "peft"])
def test_diffusers_formats(tmp_path: Path, writer: str) -> None:
    if writer == "old":
        p = write_diffusers_old(tmp_path / "d.safetensors", LIN, rank=2, seed=1)
        a, b, scale = ".lora.down.weight", ".lora.up.weight", 1.0
    else:
        p = write_peft(tmp_path / "d.safetensors", LIN, rank=2, seed=1, metadata_alpha=8)
        a, b, scale = ".lora_A.weight", ".lora_B.weight", 4.0
    raw = _raw(p)
    (key,) = LIN
    prefix = "unet.unet." if writer == "old" else "unet."
    mod = prefix + "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    _close(dense_delta(read_lora(p).layers[key]), scale * raw[mod + b] @ raw[mod + a])


@pytest.mark.parametrize("tucker", [False, True])
def test_loha(tmp_path: Path, tucker: bool) -> None:
    p = write_loha(tmp_path / "h.safetensors", ALL, rank=3, alpha=2, seed=6, tucker=tucker)
    raw, lf = _raw(p), read_lora(p)
    for key, shape in ALL.items():
        n = kohya_name(key)
        w = {s: raw[f"{n}.hada_{s}"] for s in ("w1_a", "w1_b", "w2_a", "w2_b")}
        if tucker and key in CONV3:
            t1, t2 = raw[n + ".hada_t1"], raw[n + ".hada_t2"]
            # explicit sums over the two rank indices
            p1 = torch.zeros(shape, dtype=torch.float64)
            p2 = torch.zeros(shape, dtype=torch.float64)
            for i, j in itertools.product(range(3), range(3)):
                p1 += t1[i, j][None, None] * torch.outer(w["w1_a"][i], w["w1_b"][j])[:, :, None, None]
                p2 += t2[i, j][None, None] * torch.outer(w["w2_a"][i], w["w2_b"][j])[:, :, None, None]
            expected = p1 * p2 * (2 / 3)
        else:
            expected = ((w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]) * (2 / 3)).reshape(shape)
        layer = lf.layers[key]
        _close(dense_delta(layer).reshape(shape), expected)
        assert dense_delta(layer).shape == layer.shape


@pytest.mark.parametrize(("decompose", "tucker"), [
    ("w2", False), ("w2", True), ("both", False), ("none", False)])
def test_lokr(tmp_path: Path, decompose, tucker: bool) -> None:
    p = write_lokr(tmp_path / "k.safetensors", ALL, rank=2, alpha=3, seed=7, decompose=decompose,
                   tucker=tucker)
    raw, lf = _raw(p), read_lora(p)
    for key, shape in ALL.items():
        n = kohya_name(key)
        w1 = raw[n + ".lokr_w1"] if n + ".lokr_w1" in raw else raw[n + ".lokr_w1_a"] @ raw[n + ".lokr_w1_b"]
        if n + ".lokr_w2" in raw:
            w2 = raw[n + ".lokr_w2"]
        elif n + ".lokr_t2" in raw:
            t2, w2a, w2b = raw[n + ".lokr_t2"], raw[n + ".lokr_w2_a"], raw[n + ".lokr_w2_b"]
            w2 = torch.einsum("abhw,ax,by->xyhw", t2, w2a, w2b).contiguous()
        else:
            w2a, w2b = raw[n + ".lokr_w2_a"], raw[n + ".lokr_w2_b"]
            w2 = (w2a @ w2b).reshape(w2a.shape[0], -1, *shape[2:])
        if w2.dim() == 2 and len(shape) == 4:
            w2 = w2.reshape(*w2.shape, *shape[2:])
        # Kronecker product by its definition, entry by entry: ΔW[a·B+b, c·D+d, …] = w1[a, c] · w2[b, d, …]
        big_b, big_d = w2.shape[0], w2.shape[1]
        expected = torch.zeros(shape, dtype=torch.float64)
        for a, c in itertools.product(range(w1.shape[0]), range(w1.shape[1])):
            expected[a * big_b:(a + 1) * big_b, c * big_d:(c + 1) * big_d] = w1[a, c] * w2
        scale = 3 / 2 if decompose != "none" else 1.0
        layer = lf.layers[key]
        _close(dense_delta(layer).reshape(shape), expected * scale)
        # torch.kron agrees (the delta is the Kronecker product, reshaped to the weight)
        kron = torch.kron(w1.reshape(w1.shape + (1,) * (w2.dim() - 2)), w2)
        _close(dense_delta(layer).reshape(shape), kron * scale)


def test_full_and_bias(tmp_path: Path) -> None:
    p = write_full(tmp_path / "f.safetensors", ALL, seed=8, bias=True)
    raw, lf = _raw(p), read_lora(p)
    for key in ALL:
        n = kohya_name(key)
        layer = lf.layers[key]
        _close(dense_delta(layer, 0.5), 0.5 * raw[n + ".diff"])
        _close(bias_delta(layer, 0.5), 0.5 * raw[n + ".diff_b"])
        # the result is a new tensor, never the layer's own storage
        d = dense_delta(layer)
        d.add_(1.0)
        assert not torch.equal(d, layer.tensors["diff"])
    lora = read_lora(write_kohya(tmp_path / "k.safetensors", LIN)).layers
    assert bias_delta(next(iter(lora.values()))) is None


@pytest.mark.parametrize("writer", [write_kohya, write_loha, write_lokr, write_full])
def test_strength_is_linear(tmp_path: Path, writer) -> None:
    lf = read_lora(writer(tmp_path / "s.safetensors", ALL, seed=9))
    for layer in lf.layers.values():
        base = dense_delta(layer)
        assert base.abs().sum() > 0
        for s in (0.0, -1.0, 0.3, 2.5):
            torch.testing.assert_close(dense_delta(layer, s), s * base, rtol=1e-6, atol=1e-7)


def test_half_precision_file_computes_in_float32(tmp_path: Path) -> None:
    p = write_kohya(tmp_path / "h.safetensors", LIN, rank=4, alpha=2, dtype=torch.float16, seed=3)
    raw = load_file(str(p))
    (key,) = LIN
    n = kohya_name(key)
    expected = 0.5 * (raw[n + ".lora_up.weight"].float() @ raw[n + ".lora_down.weight"].float())
    got = dense_delta(read_lora(p).layers[key])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("tucker", [False, True])
def test_low_rank_factors_rebuild_the_dense_delta(tmp_path: Path, tucker: bool) -> None:
    lf = read_lora(write_kohya(tmp_path / "k.safetensors", ALL, rank=3, alpha=1, seed=11, tucker=tucker,
                               dtype=torch.bfloat16))
    x = torch.randn(2, 12, 6, 5)
    for key, layer in lf.layers.items():
        lr = low_rank(layer, strength=0.7)
        assert isinstance(lr, LowRank)
        assert lr.down.dtype == lr.up.dtype == torch.float32
        r = layer.rank
        assert lr.down.shape[0] == r and lr.up.shape[:2] == (layer.shape[0], r)
        dense = dense_delta(layer, 0.7)
        if len(layer.shape) == 2:
            torch.testing.assert_close(lr.up @ lr.down, dense)
        else:
            assert lr.up.shape[2:] == (1, 1)
            if lr.mid is None:
                assert lr.down.shape[1:] == layer.shape[1:]
            else:
                assert tucker and lr.down.shape[2:] == (1, 1) and lr.mid.shape == (r, r, *layer.shape[2:])
            if key in CONV3:
                pad = 1
                xin = x
            else:
                pad = 0
                xin = x[:, :8]
            h = F.conv2d(xin, lr.down, padding=0 if lr.mid is not None else pad)
            if lr.mid is not None:
                h = F.conv2d(h, lr.mid, padding=pad)
            expected = F.conv2d(xin, dense, padding=pad)
            torch.testing.assert_close(F.conv2d(h, lr.up), expected, rtol=1e-4, atol=1e-5)


def test_low_rank_none_for_other_kinds(tmp_path: Path) -> None:
    for writer in (write_loha, write_lokr, write_full):
        lf = read_lora(writer(tmp_path / f"{writer.__name__}.safetensors", LIN))
        assert all(low_rank(layer) is None for layer in lf.layers.values())


def test_alpha_scale_applies_per_layer(tmp_path: Path) -> None:
    """alpha/rank differs per layer (kohya conv_dim/conv_alpha): each delta carries its own scale."""
    ranks = {next(iter(LIN)): 8, next(iter(CONV3)): 2, next(iter(CONV1)): 4}
    alphas = {next(iter(LIN)): 1.0, next(iter(CONV3)): 4.0, next(iter(CONV1)): None}
    p = write_kohya(tmp_path / "a.safetensors", ALL, rank=ranks.__getitem__, alpha=alphas.__getitem__, seed=1)
    raw, lf = _raw(p), read_lora(p)
    for key, shape in ALL.items():
        n = kohya_name(key)
        up, down = raw[n + ".lora_up.weight"], raw[n + ".lora_down.weight"]
        prod = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        scale = 1.0 if alphas[key] is None else alphas[key] / ranks[key]
        _close(dense_delta(lf.layers[key]), scale * prod)


def test_hand_written_numbers(tmp_path: Path) -> None:
    """A 2×2 case small enough to check by hand: up = [[1], [2]], down = [[3, 4]], alpha 0.5, rank 1."""
    t = {"lora_unet_a.lora_down.weight": torch.tensor([[3.0, 4.0]]),
         "lora_unet_a.lora_up.weight": torch.tensor([[1.0], [2.0]]),
         "lora_unet_a.alpha": torch.tensor(0.5)}
    layer = read_lora(write_tensors(tmp_path / "x.safetensors", t)).layers["unet/a"]
    assert dense_delta(layer, 2.0).tolist() == [[3.0, 4.0], [6.0, 8.0]]
    assert math.isclose(layer.scale, 0.5)
