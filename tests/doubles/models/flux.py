"""BFL-named Flux transformer for tests: the module names and weight shapes of Forge's
``backend/nn/flux.py::IntegratedFluxTransformer2DModel`` (DoubleStreamBlock, SingleStreamBlock, LastLayer,
MLPEmbedder, Modulation, SelfAttention), written from those facts.

``forward`` has Forge's signature and patching of the latent; ``inner_forward`` is a simplification that
calls every Linear once (fused qkv and linear1 included) so that hooks run; it is not Flux's math. Build it
on ``torch.device("meta")`` with the real FLUX.1-dev sizes for name and shape checks, or small and real for
numeric checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

LinearFactory = Callable[[int, int], nn.Module]


def _linear(i: int, o: int) -> nn.Module:
    return nn.Linear(i, o)


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (B,) times as in backend/nn/flux.py::timestep_embedding."""
    t = time_factor * t.float()
    half = dim // 2
    steps = torch.arange(half, dtype=torch.float32) / half
    freqs = torch.exp(-torch.log(torch.tensor(float(max_period))) * steps)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def patchify(x: torch.Tensor) -> torch.Tensor:
    """A latent (B, C, H, W) as tokens of 2×2 patches (B, H/2·W/2, 4·C), as the DiTs take it."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpatchify(tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Tokens of 2×2 patches back to a latent of ``shape`` (B, C, H, W)."""
    b, c, h, w = shape
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class MLPEmbedder(nn.Module):  # backend/nn/flux.py::MLPEmbedder
    def __init__(self, in_dim: int, hidden: int, lin: LinearFactory) -> None:
        super().__init__()
        self.in_layer = lin(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = lin(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class Modulation(nn.Module):  # backend/nn/flux.py::Modulation
    def __init__(self, dim: int, double: bool, lin: LinearFactory) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = lin(dim, self.multiplier * dim)


class SelfAttention(nn.Module):  # backend/nn/flux.py::SelfAttention (qkv fused: rows q | k | v)
    def __init__(self, dim: int, lin: LinearFactory) -> None:
        super().__init__()
        self.qkv = lin(dim, dim * 3)
        self.proj = lin(dim, dim)


class DoubleStreamBlock(nn.Module):  # backend/nn/flux.py::DoubleStreamBlock
    def __init__(self, hidden: int, mlp_hidden: int, lin: LinearFactory) -> None:
        super().__init__()
        self.hidden = hidden
        self.img_mod = Modulation(hidden, True, lin)
        self.img_attn = SelfAttention(hidden, lin)
        self.img_mlp = nn.Sequential(
            lin(hidden, mlp_hidden), nn.GELU(approximate="tanh"), lin(mlp_hidden, hidden)
        )
        self.txt_mod = Modulation(hidden, True, lin)
        self.txt_attn = SelfAttention(hidden, lin)
        self.txt_mlp = nn.Sequential(
            lin(hidden, mlp_hidden), nn.GELU(approximate="tanh"), lin(mlp_hidden, hidden)
        )

    def forward(
        self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden
        out = []
        for x, mod, attn, mlp in (
            (img, self.img_mod, self.img_attn, self.img_mlp),
            (txt, self.txt_mod, self.txt_attn, self.txt_mlp),
        ):
            shift = mod.lin(vec)[:, None, :h]
            qkv = attn.qkv(x + shift)
            q, k, v = qkv[..., :h], qkv[..., h : 2 * h], qkv[..., 2 * h :]
            x = x + attn.proj(torch.tanh(q) * k + v)
            out.append(x + mlp(x))
        return out[0], out[1]


class SingleStreamBlock(nn.Module):  # backend/nn/flux.py::SingleStreamBlock
    def __init__(self, hidden: int, mlp_hidden: int, lin: LinearFactory) -> None:
        super().__init__()
        self.hidden = hidden
        self.linear1 = lin(hidden, hidden * 3 + mlp_hidden)
        self.linear2 = lin(hidden + mlp_hidden, hidden)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, False, lin)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        h = self.hidden
        shift = self.modulation.lin(vec)[:, None, :h]
        qkv, mlp = torch.split(self.linear1(x + shift), [3 * h, self.linear1_mlp], dim=-1)
        q, k, v = qkv[..., :h], qkv[..., h : 2 * h], qkv[..., 2 * h :]
        return x + self.linear2(torch.cat((torch.tanh(q) * k + v, self.mlp_act(mlp)), dim=-1))

    @property
    def linear1_mlp(self) -> int:
        return int(self.linear2.in_features) - self.hidden


class LastLayer(nn.Module):  # backend/nn/flux.py::LastLayer
    def __init__(self, hidden: int, out_channels: int, lin: LinearFactory) -> None:
        super().__init__()
        self.linear = lin(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), lin(hidden, 2 * hidden))


class IntegratedFluxTransformer2DModel(nn.Module):  # backend/nn/flux.py::IntegratedFluxTransformer2DModel
    def __init__(
        self,
        in_channels: int = 16,
        vec_in_dim: int = 768,
        context_in_dim: int = 4096,
        hidden_size: int = 3072,
        mlp_ratio: float = 4.0,
        num_heads: int = 24,
        depth: int = 19,
        depth_single_blocks: int = 38,
        guidance_embed: bool = True,
        linear: LinearFactory = _linear,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels * 4
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.img_in = linear(self.in_channels, hidden_size)
        self.time_in = MLPEmbedder(256, hidden_size, linear)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size, linear)
        self.guidance_in = MLPEmbedder(256, hidden_size, linear) if guidance_embed else nn.Identity()
        self.txt_in = linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(hidden_size, mlp_hidden, linear) for _ in range(depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(hidden_size, mlp_hidden, linear) for _ in range(depth_single_blocks)
        )
        self.final_layer = LastLayer(hidden_size, self.in_channels, linear)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """The signature of Forge's forward (as KModel.apply_model calls it): the latent ``x`` (B, C, H, W) in
        2×2 patches, ``timestep`` (B,), ``context`` (B, T, context_in_dim), ``y`` (B, vec_in_dim),
        ``guidance`` (B,); the output in the latent's shape."""
        out = self.inner_forward(patchify(x), context, timestep, y, guidance)
        return unpatchify(out, x.shape)

    def inner_forward(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor,
        guidance: torch.Tensor | None,
    ) -> torch.Tensor:
        """backend/nn/flux.py::IntegratedFluxTransformer2DModel.inner_forward without the positional ids:
        img (B, L, in_channels*4) patches, txt (B, T, context_in_dim)."""
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if isinstance(self.guidance_in, MLPEmbedder):
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec)
        x = x[:, txt.shape[1] :]
        shift = self.final_layer.adaLN_modulation(vec)[:, None, : self.hidden_size]
        return self.final_layer.linear(x + shift)
