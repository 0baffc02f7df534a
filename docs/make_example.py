"""Write the two synthetic LoRA files the README's selection map is made from.

    python docs/make_example.py OUTDIR

writes ``OUTDIR/synthetic_content.safetensors`` and ``OUTDIR/synthetic_style.safetensors``: kohya-format
SD1.5 LoRAs with the real SD1.5 key set and shapes of a UNet-only LoRA (the 192 layers of the transformer
blocks: proj_in/out, attention projections, feed-forward). They are random, not trained: the content LoRA
is strong in the down blocks and fades towards the up blocks, the style LoRA does the opposite, so the
per-layer thresholds spread over the run. Content: rank 16, alpha 8; style: rank 4, alpha 2.5 (alpha
differs from rank in both, so the alpha/rank scale matters).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

# SD1.5 UNet: channels of the down blocks with attention, mid, and up blocks with attention.
_DOWN = [(0, 320), (1, 640), (2, 1280)]
_UP = [(1, 1280), (2, 640), (3, 320)]
_CONTEXT = 768


def _transformer_layers(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    """Modules of one ``Transformer2DModel`` (SD1.5: conv proj_in/proj_out, one transformer block)."""
    t = f"{prefix}_transformer_blocks_0"
    return [
        (f"{prefix}_proj_in", (c, c, 1, 1)),
        (f"{t}_attn1_to_q", (c, c)),
        (f"{t}_attn1_to_k", (c, c)),
        (f"{t}_attn1_to_v", (c, c)),
        (f"{t}_attn1_to_out_0", (c, c)),
        (f"{t}_attn2_to_q", (c, c)),
        (f"{t}_attn2_to_k", (c, _CONTEXT)),
        (f"{t}_attn2_to_v", (c, _CONTEXT)),
        (f"{t}_attn2_to_out_0", (c, c)),
        (f"{t}_ff_net_0_proj", (8 * c, c)),
        (f"{t}_ff_net_2", (c, 4 * c)),
        (f"{prefix}_proj_out", (c, c, 1, 1)),
    ]


def sd15_layers() -> list[tuple[str, tuple[int, ...]]]:
    """``(kohya layer name, weight shape)`` of the UNet's transformer blocks, in model order."""
    layers: list[tuple[str, tuple[int, ...]]] = []
    for i, c in _DOWN:
        for j in range(2):
            layers += _transformer_layers(f"lora_unet_down_blocks_{i}_attentions_{j}", c)
    layers += _transformer_layers("lora_unet_mid_block_attentions_0", 1280)
    for i, c in _UP:
        for j in range(3):
            layers += _transformer_layers(f"lora_unet_up_blocks_{i}_attentions_{j}", c)
    return layers


def write_lora(path: Path, rank: int, alpha: float, strength_at, seed: int) -> None:
    """A kohya LoRA over :func:`sd15_layers` whose delta at UNet position x in [0, 1] scales with
    ``strength_at(x)`` (x = 0 first down layer, 1 last up layer)."""
    gen = torch.Generator().manual_seed(seed)
    layers = sd15_layers()
    unet = [name for name, _ in layers]
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in layers:
        out_f, in_f = shape[0], shape[1]
        magnitude = strength_at(unet.index(name) / (len(unet) - 1))
        magnitude *= math.exp(0.35 * torch.randn((), generator=gen).item())  # per-layer spread
        down = torch.randn(rank, in_f, generator=gen) / math.sqrt(in_f)
        up = torch.randn(out_f, rank, generator=gen) * (0.02 * magnitude)
        if len(shape) == 4:
            down, up = down.reshape(rank, in_f, 1, 1), up.reshape(out_f, rank, 1, 1)
        tensors[f"{name}.lora_down.weight"] = down.to(torch.float16)
        tensors[f"{name}.lora_up.weight"] = up.to(torch.float16)
        tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(tensors, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})


def main(outdir: str) -> None:
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    # content strong in the down blocks, style strong in the up blocks (log-linear across the UNet)
    write_lora(out / "synthetic_content.safetensors", rank=16, alpha=8.0,
               strength_at=lambda x: math.exp(0.6 * (1.0 - 2.0 * x)), seed=1)
    write_lora(out / "synthetic_style.safetensors", rank=4, alpha=2.5,
               strength_at=lambda x: math.exp(0.6 * (2.0 * x - 1.0)), seed=2)
    print(f"wrote {out / 'synthetic_content.safetensors'} and {out / 'synthetic_style.safetensors'}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/make_example.py OUTDIR")
    main(sys.argv[1])
