"""Small real models with Forge's module names, for glue tests (not mirrors of behaviour):

* an SD1.5-style UNet with the SGM/ldm names of Forge's ``backend/nn/unet.py::IntegratedUNet2DConditionModel``
  (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``, 1×1-conv ``proj_in``/``proj_out``, resnet
  ``in_layers.2``…), one block per level;
* text encoders with the HF names Forge wraps (``backend/nn/clip.py::IntegratedCLIP`` →
  ``transformer.text_model…``, ``backend/nn/t5.py::IntegratedT5`` →
  ``transformer.encoder.block.N.layer.0.SelfAttention.q``);
* a Flux transformer: tests/doubles/models/flux.py.

Linear layers come from a factory, so the tests build them with Forge's own ``Linear`` (not a
torch.nn.Linear).
Forwards are simplifications that call every hooked module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Lin = Callable[..., nn.Module]


class CrossAttention(nn.Module):  # backend/nn/unet.py::CrossAttention
    def __init__(self, dim: int, context_dim: int, lin: Lin) -> None:
        super().__init__()
        self.to_q = lin(dim, dim, bias=False)
        self.to_k = lin(context_dim, dim, bias=False)
        self.to_v = lin(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(lin(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out(w @ v)


class GEGLU(nn.Module):  # backend/nn/unet.py::GEGLU
    def __init__(self, dim: int, out: int, lin: Lin) -> None:
        super().__init__()
        self.proj = lin(dim, out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * torch.nn.functional.gelu(gate)


class FeedForward(nn.Module):  # backend/nn/unet.py::FeedForward
    def __init__(self, dim: int, lin: Lin) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4, lin), nn.Dropout(0.0), lin(dim * 4, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):  # backend/nn/unet.py::BasicTransformerBlock
    def __init__(self, dim: int, context_dim: int, lin: Lin) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, lin)
        self.attn2 = CrossAttention(dim, context_dim, lin)
        self.ff = FeedForward(dim, lin)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(x, x)
        x = x + self.attn2(x, context)
        return x + self.ff(x)


class SpatialTransformer(nn.Module):  # backend/nn/unet.py::SpatialTransformer (SD1.5: conv proj_in/out)
    def __init__(self, dim: int, context_dim: int, lin: Lin) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim, lin)])
        self.proj_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.proj_in(x).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class ResBlock(nn.Module):  # backend/nn/unet.py::ResBlock (in_layers.2 / out_layers.3 convs, emb_layers.1)
    def __init__(self, dim: int, emb: int, lin: Lin) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, dim), nn.SiLU(), nn.Conv2d(dim, dim, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), lin(emb, dim))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(8, dim), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(dim, dim, 3, padding=1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return x + self.out_layers(h)


class TinySgmUNet(nn.Module):
    """input_blocks.0 (conv), input_blocks.1 (res + attention), middle_block (res, attention, res),
    output_blocks.0 (res + attention), out; SGM names throughout."""

    def __init__(self, lin: Lin, dim: int = 32, context_dim: int = 24, emb: int = 16) -> None:
        super().__init__()
        self.emb = emb
        self.time_embed = nn.Sequential(lin(emb, emb), nn.SiLU(), lin(emb, emb))
        self.input_blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(4, dim, 3, padding=1)),
                nn.ModuleList([ResBlock(dim, emb, lin), SpatialTransformer(dim, context_dim, lin)]),
            ]
        )
        self.middle_block = nn.ModuleList(
            [ResBlock(dim, emb, lin), SpatialTransformer(dim, context_dim, lin), ResBlock(dim, emb, lin)]
        )
        self.output_blocks = nn.ModuleList(
            [
                nn.ModuleList([ResBlock(dim, emb, lin), SpatialTransformer(dim, context_dim, lin)]),
            ]
        )
        self.out = nn.Sequential(nn.GroupNorm(8, dim), nn.SiLU(), nn.Conv2d(dim, 4, 3, padding=1))

    # the signature of backend/nn/unet.py::IntegratedUNet2DConditionModel.forward (as KModel.apply_model calls
    # it); the time embedding ignores ``timesteps``
    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        control: object = None,
        transformer_options: dict | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        emb = self.time_embed(torch.ones(x.shape[0], self.emb))
        h = self.input_blocks[0](x)
        for group in (self.input_blocks[1], self.middle_block, self.output_blocks[0]):
            for layer in group:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h, context)
        return self.out(h)


class _ClipLayer(nn.Module):
    def __init__(self, dim: int, lin: Lin) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, lin(dim, dim))
        self.mlp = nn.Module()
        self.mlp.fc1 = lin(dim, dim * 2)
        self.mlp.fc2 = lin(dim * 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.self_attn
        q, k, v = a.q_proj(x), a.k_proj(x), a.v_proj(x)
        w = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + a.out_proj(w @ v)
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(x)))


class TinyClip(nn.Module):
    """IntegratedCLIP-like: ``transformer.text_model.encoder.layers.N.{self_attn.*_proj, mlp.fc1/fc2}``."""

    def __init__(self, lin: Lin, dim: int = 24, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        self.dim = dim
        self.transformer = nn.Module()
        self.transformer.text_model = nn.Module()
        self.transformer.text_model.encoder = nn.Module()
        self.transformer.text_model.encoder.layers = nn.ModuleList(
            [_ClipLayer(dim, lin) for _ in range(layers)]
        )
        self.tokens = torch.randn(1, 5, dim, generator=torch.Generator().manual_seed(seed))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        x = self.tokens + len(prompts[0]) * 1e-3
        for layer in self.transformer.text_model.encoder.layers:
            x = layer(x)
        return x


class TinyT5(nn.Module):
    """IntegratedT5-like: ``transformer.encoder.block.N.layer.0.SelfAttention.{q,k,v,o}``, and with ``ffn``
    the gated feed-forward ``layer.1.DenseReluDense.{wi_0, wi_1, wo}`` (T5 v1.1 / UMT5; T5-XXL: dim 4096, ffn
    10240, 24 blocks)."""

    def __init__(self, lin: Lin, dim: int = 24, blocks: int = 1, ffn: int = 0) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.block = nn.ModuleList()
        for _ in range(blocks):
            block = nn.Module()
            block.layer = nn.ModuleList([nn.Module()])
            attn = nn.Module()
            for name in "qkvo":
                setattr(attn, name, lin(dim, dim, bias=False))
            block.layer[0].SelfAttention = attn
            if ffn:
                dense = nn.Module()
                dense.wi_0, dense.wi_1 = lin(dim, ffn, bias=False), lin(dim, ffn, bias=False)
                dense.wo = lin(ffn, dim, bias=False)
                block.layer.append(nn.Module())
                block.layer[1].DenseReluDense = dense
            self.transformer.encoder.block.append(block)
        self.tokens = torch.randn(1, 3, dim, generator=torch.Generator().manual_seed(5))

    def forward(self, prompts: list[str]) -> torch.Tensor:
        x = self.tokens
        for block in self.transformer.encoder.block:
            a = block.layer[0].SelfAttention
            x = x + a.o(a.q(x) * a.k(x) + a.v(x))
        return x
