"""Tiny diffusers pipelines built from diffusers and transformers classes with small configs (no download),
and LoRA files for them written the way users get them (PEFT adapters saved by ``save_lora_weights``).

Tokenizers are word-level ``tokenizers`` objects over a few words (a real CLIP/T5 vocabulary would need a
download); the pipelines only need token ids, padding and truncation from them.

Every builder seeds its own weights, so two calls give equal pipelines.
"""

from __future__ import annotations

from pathlib import Path

import diffusers
import torch
import transformers
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn

WORDS = ["a", "dog", "in", "bucket", "watercolor", "cat", "photo", "of", "the", "painting"]
PROMPT = "a photo of a dog in a bucket"
MAX_TOKENS = 8


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<|startoftext|>": 1, "<|endoftext|>": 2}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<pad>",
        unk_token="<|endoftext|>", model_max_length=MAX_TOKENS)


def clip(seed: int, hidden: int = 32, projection: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=16, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_TOKENS, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, projection_dim=hidden)
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def t5(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=16, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=2)
    return transformers.T5EncoderModel(config).eval()


def vae(latent_channels: int = 4, **kw) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        block_out_channels=[16, 16], in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        norm_num_groups=8, sample_size=32, **kw).eval()


def sd15(scheduler=None) -> diffusers.StableDiffusionPipeline:
    torch.manual_seed(10)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, cross_attention_dim=32, norm_num_groups=16, attention_head_dim=4).eval()
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae(), text_encoder=clip(1), tokenizer=tokenizer(), unet=unet,
        scheduler=scheduler or diffusers.EulerDiscreteScheduler(steps_offset=1), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl(scheduler=None) -> diffusers.StableDiffusionXLPipeline:
    torch.manual_seed(11)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=16).eval()
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=vae(), text_encoder=clip(2), text_encoder_2=clip(3, projection=True), tokenizer=tokenizer(),
        tokenizer_2=tokenizer(), unet=unet,
        scheduler=scheduler or diffusers.EulerDiscreteScheduler(steps_offset=1))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_transformer(seed: int = 12) -> nn.Module:
    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8)).eval()


def flux(scheduler=None) -> diffusers.FluxPipeline:
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(),
        vae=vae(latent_channels=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.06,
                scaling_factor=1.5),
        text_encoder=clip(4), tokenizer=tokenizer(), text_encoder_2=t5(5), tokenizer_2=tokenizer(),
        transformer=flux_transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, steps: int = 3, **kw) -> torch.Tensor:
    """The pipeline's latents for the test prompt (no VAE decode, whose clipping could hide a difference)."""
    kw.setdefault("prompt", PROMPT)
    if "image" not in kw:
        kw.setdefault("height", 32)
        kw.setdefault("width", 32)
    if isinstance(pipe, diffusers.FluxPipeline):
        kw.setdefault("max_sequence_length", MAX_TOKENS)
    out = pipe(num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent",
               **kw)
    return out.images


# ----------------------------------------------------------------------------------------------- LoRAs


UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "proj_mlp",
                "proj_out", "ff.net.2"]
TE_TARGETS = ["q_proj", "v_proj", "fc1"]
T5_TARGETS = ["q", "wo"]


def _randomize(module: nn.Module, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _adapter(model: nn.Module, targets: list[str], rank: int, alpha: float, seed: int, scale: float
             ) -> tuple[dict[str, torch.Tensor], dict]:
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights=False)
    inject_adapter_in_model(config, model)
    _randomize(model, seed, scale)
    return get_peft_model_state_dict(model), config.to_dict()


def write_lora(builder, folder: Path, name: str, seed: int, rank: int = 4, alpha: float = 2.0,
               scale: float = 0.05, text_encoders: bool = True) -> Path:
    """A PEFT LoRA for the pipeline ``builder()`` makes, on its denoiser (and text encoders), saved with the
    pipeline class's ``save_lora_weights`` and its adapter metadata (alpha ≠ rank)."""
    pipe = builder()
    cls = type(pipe)
    layers: dict[str, dict] = {}
    metadata: dict[str, dict] = {}
    if isinstance(pipe, diffusers.FluxPipeline):
        denoiser, prefix, targets = pipe.transformer, "transformer", FLUX_TARGETS
    else:
        denoiser, prefix, targets = pipe.unet, "unet", UNET_TARGETS
    layers[prefix], metadata[prefix] = _adapter(denoiser, targets, rank, alpha, seed, scale)
    if text_encoders:
        layers["text_encoder"], metadata["text_encoder"] = _adapter(
            pipe.text_encoder, TE_TARGETS, rank, alpha, seed + 100, scale)
        if isinstance(pipe, diffusers.StableDiffusionXLPipeline):
            layers["text_encoder_2"], metadata["text_encoder_2"] = _adapter(
                pipe.text_encoder_2, TE_TARGETS, rank, alpha, seed + 200, scale)
    kwargs = {f"{k}_lora_layers": v for k, v in layers.items()}
    kwargs.update({f"{k}_lora_adapter_metadata": v for k, v in metadata.items()})
    cls.save_lora_weights(folder, weight_name=name, **kwargs)
    return Path(folder) / name
