"""Small real torch models with the module names of A1111's SD1.5 and SDXL checkpoints.

Not a mirror of a webui file: these stand in for ``shared.sd_model`` (ldm ``LatentDiffusion`` / sgm
``DiffusionEngine``) after ``modules/sd_hijack.py`` wrapped the text encoders. What matters is the module
tree the glue walks — ``model.diffusion_model`` with ldm/SGM block names,
``cond_stage_model.wrapped.transformer`` (an HF-named CLIP text model) for SD1.5,
``conditioner.embedders[0].wrapped.transformer`` and ``conditioner.embedders[1].wrapped.model`` (OpenCLIP,
fused ``nn.MultiheadAttention``) for SDXL — and that every Linear/Conv2d is really called in the forward
pass, so hooks on them act. Sizes are tiny.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

C = 32  # UNet channels
TOKENS = 6  # tokens per prompt
VOCAB = 97


class CrossAttention(nn.Module):
    """ldm.modules.attention.CrossAttention: to_q/to_k/to_v without bias, to_out = (Linear, Dropout)."""

    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 2) -> None:
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, d = q.shape
        h = self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(t.shape[0], t.shape[1], h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 2 * dim), nn.Dropout(0.0), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """proj_in/proj_out are 1×1 convs in SD1.5 (ldm) and Linear in SDXL (sgm, use_linear_in_transformer)."""

    def __init__(self, dim: int, context_dim: int, linear: bool) -> None:
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(8, dim)
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, context_dim)])
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
        if not self.linear:
            x = self.proj_out(x)
        return x + x_in


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(channels, channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class TimestepEmbedSequential(nn.Sequential):
    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNetModel(nn.Module):
    """ldm/sgm ``openaimodel.UNetModel`` layout, one level: input_blocks 0 (conv_in), 1 (res + attention),
    2 (downsample); middle_block (res, attention, res); output_blocks 0 (res + attention),
    1 (res + upsample)."""

    def __init__(self, context_dim: int, linear: bool) -> None:
        super().__init__()
        emb = 4 * C
        self.time_embed = nn.Sequential(nn.Linear(C, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(nn.Conv2d(4, C, 3, padding=1)),
                TimestepEmbedSequential(ResBlock(C, emb), SpatialTransformer(C, context_dim, linear)),
                TimestepEmbedSequential(Downsample(C)),
            ]
        )
        self.middle_block = TimestepEmbedSequential(
            ResBlock(C, emb), SpatialTransformer(C, context_dim, linear), ResBlock(C, emb)
        )
        self.output_blocks = nn.ModuleList(
            [
                TimestepEmbedSequential(ResBlock(C, emb), SpatialTransformer(C, context_dim, linear)),
                TimestepEmbedSequential(ResBlock(C, emb), Upsample(C)),
            ]
        )
        self.out = nn.Sequential(nn.GroupNorm(8, C), nn.SiLU(), nn.Conv2d(C, 4, 3, padding=1))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        half = C // 2
        freqs = torch.exp(-torch.arange(half, dtype=torch.float32) / half)
        args = timesteps[:, None].float() * freqs[None]
        emb = self.time_embed(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(h, emb, context)
        return self.out(h)


class DiffusionWrapper(nn.Module):
    def __init__(self, diffusion_model: nn.Module) -> None:
        super().__init__()
        self.diffusion_model = diffusion_model


# ---- text encoders -----------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        w = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1)
        return self.out_proj(w @ v)


class CLIPMLP(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.self_attn, self.mlp = CLIPAttention(dim), CLIPMLP(dim)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextTransformer(nn.Module):
    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(VOCAB, dim)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([CLIPEncoderLayer(dim) for _ in range(layers)])
        self.final_layer_norm = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.token_embedding(input_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    """transformers' CLIPTextModel names: ``text_model.encoder.layers.N.self_attn.q_proj`` …"""

    def __init__(self, dim: int, layers: int = 2) -> None:
        super().__init__()
        self.text_model = CLIPTextTransformer(dim, layers)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_model(input_ids)


class ResidualAttentionBlock(nn.Module):
    """open_clip.transformer.ResidualAttentionBlock: ``attn`` is an nn.MultiheadAttention (fused in_proj)."""

    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            OrderedDict(
                [("c_fc", nn.Linear(dim, 2 * dim)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(2 * dim, dim))]
            )
        )

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTextTower(nn.Module):
    """open_clip CLIP text tower names: ``transformer.resblocks.N.attn`` / ``.mlp.c_fc`` …; sequence-first."""

    def __init__(self, dim: int, layers: int = 2) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(VOCAB, dim)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([ResidualAttentionBlock(dim) for _ in range(layers)])
        self.ln_final = nn.LayerNorm(dim)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(input_ids).permute(1, 0, 2)  # NLD -> LND
        n = x.shape[0]
        mask = torch.full((n, n), float("-inf")).triu_(1)
        for r in self.transformer.resblocks:
            x = r(x, attn_mask=mask)
        return self.ln_final(x.permute(1, 0, 2))


def tokens(prompts: list[str]) -> torch.Tensor:
    """A deterministic stand-in for the CLIP tokenizer."""
    ids = [[(sum(map(ord, word)) % (VOCAB - 1)) + 1 for word in p.split()][:TOKENS] for p in prompts]
    return torch.tensor([row + [0] * (TOKENS - len(row)) for row in ids])


class FrozenCLIPEmbedder(nn.Module):
    """ldm/sgm FrozenCLIPEmbedder: the HF model sits at ``.transformer``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.transformer = CLIPTextModel(dim)


class FrozenOpenCLIPEmbedder2(nn.Module):
    """sgm FrozenOpenCLIPEmbedder2: the open_clip model sits at ``.model``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.model = OpenCLIPTextTower(dim)


class CustomWordsWrapper(nn.Module):
    """modules/sd_hijack_clip.py FrozenCLIPEmbedderWithCustomWordsBase: the hijacked embedder keeps the
    original at ``.wrapped``."""

    def __init__(self, wrapped: nn.Module) -> None:
        super().__init__()
        self.wrapped = wrapped

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = tokens(prompts)
        if isinstance(self.wrapped, FrozenOpenCLIPEmbedder2):
            return self.wrapped.model.encode(ids)
        return self.wrapped.transformer(ids)


class Conditioner(nn.Module):
    def __init__(self, embedders: list[nn.Module]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class TinySD(nn.Module):
    """``shared.sd_model`` after loading and hijacking: SD1.5-like (``cond_stage_model``) or SDXL-like
    (``conditioner`` with two embedders)."""

    def __init__(self, sdxl: bool = False, seed: int = 0, title: str = "tiny.safetensors") -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.is_sdxl = sdxl
        self.is_sd1 = not sdxl
        self.is_sd2 = False
        self.is_sd3 = False
        if sdxl:
            self.conditioner = Conditioner(
                [CustomWordsWrapper(FrozenCLIPEmbedder(24)), CustomWordsWrapper(FrozenOpenCLIPEmbedder2(32))]
            )
            self.cond_stage_model = self.conditioner
            context = 24 + 32
        else:
            self.cond_stage_model = CustomWordsWrapper(FrozenCLIPEmbedder(24))
            context = 24
        self.model = DiffusionWrapper(UNetModel(context, linear=sdxl))
        for m in self.modules():  # ldm zero-initialises some outputs; random values make every delta visible
            if isinstance(m, (nn.Linear, nn.Conv2d)) and m.bias is not None:
                nn.init.normal_(m.bias, std=0.1)
        from modules import sd_models  # the double on sys.path when the model is built

        self.sd_checkpoint_info = sd_models.CheckpointInfo(title)
        self.sd_model_hash = "0123456789"
        self.lowvram = False  # modules/sd_models.py load_model: whether --lowvram/--medvram applies
        self.calls = 0

    def get_learned_conditioning(self, prompts: list[str]) -> torch.Tensor:
        if self.is_sdxl:
            return torch.cat([e(prompts) for e in self.conditioner.embedders], dim=-1)
        return self.cond_stage_model(prompts)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.model.diffusion_model(x, t, cond)
