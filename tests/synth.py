"""Synthetic LoRA files and model shapes for tests (no downloads, no committed binaries).

Shapes come from real diffusers model configs built on ``torch.device("meta")`` (no weights):

    shapes = sd15_unet_shapes()                      # canonical key → weight shape, every Linear/Conv2d
    att = select(shapes, attention=True)             # the attention projections only (SD1.5: 128, SDXL: 560)
    write_kohya(tmp_path / "c.safetensors", att, rank=8, alpha=4, seed=1)
    write_kohya(tmp_path / "s.safetensors", sdxl_attn, rank=4, naming="sgm", scale_by=block_magnitude(up=3.0))

Writers (all take ``shapes: dict[canonical key, weight shape]`` and write real key sets with safetensors):

* :func:`write_kohya` — kohya LoRA/LoCon (``lora_unet_…`` diffusers or SGM names, ``lora_te_``/``te1``/
  ``te2``; optional Tucker ``lora_mid`` for k×k convs);
* :func:`write_diffusers_old` — ``<prefix><module>.lora.down.weight`` (prefix ``unet.unet.``, ``unet.`` or
  ``""``) or the attention-processor form ``….processor.to_q_lora.down.weight``;
* :func:`write_peft` — ``unet.…lora_A.weight`` / ``text_encoder.…``, optional ``lora_adapter_metadata``;
* :func:`write_loha`, :func:`write_lokr`, :func:`write_full` — LyCORIS layers with kohya-style names.

Randomness: one ``torch.Generator`` seeded with ``seed`` per file, keys in the order of ``shapes``.
SGM names need to know which up blocks have attention (the upsampler's index): ``up_attention`` (SD1.5
{1, 2, 3}, SDXL {0, 1}); by default it is inferred from the attention keys in ``shapes``.
``rank``/``alpha``/``scale_by`` may be a number or a callable ``f(key)`` (per-layer values; ``alpha=None``
writes no alpha). ``scale_by`` multiplies the up factor (the delta) of a layer: use it to make a pair of
LoRAs *informative* (e.g. content strong in down blocks, style strong in up blocks, see
:func:`block_magnitude`). Files are float32 unless ``dtype`` says otherwise.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import nn

from klora.keys.sd import diffusers_to_sgm

Shapes = Mapping[str, tuple[int, ...]]
PerKey = Callable[[str], float]
IntOrFn = int | Callable[[str], int]
NumOrFn = float | int | Callable[[str], float | None] | None

# --------------------------------------------------------------------------------------------------
# Model configs (diffusers UNet2DConditionModel keyword arguments)
# --------------------------------------------------------------------------------------------------


def sd15_unet_config() -> dict:
    """Stable Diffusion 1.5 UNet."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=(
            "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
    )


def sdxl_unet_config() -> dict:
    """Stable Diffusion XL base UNet."""
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def tiny_unet_config() -> dict:
    """The tiny SD UNet of diffusers' own tests (48 attention projections, runs on a CPU in milliseconds)."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=32,
        norm_num_groups=32,
    )


def tiny_sdxl_unet_config() -> dict:
    """The tiny SDXL-like UNet of diffusers' tests (linear projections, two transformer depths, text_time).

    Its forward needs ``added_cond_kwargs={"text_embeds": (B, 32), "time_ids": (B, 6)}``."""
    return dict(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,
        cross_attention_dim=64,
        norm_num_groups=32,
    )


def build_unet(config: dict, meta: bool = False, seed: int = 0) -> nn.Module:
    """A diffusers ``UNet2DConditionModel``: on the meta device (shapes only) or real (seeded weights)."""
    from diffusers import UNet2DConditionModel

    if meta:
        with torch.device("meta"):
            return UNet2DConditionModel(**config)
    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def unet_layer_shapes(model: nn.Module, component: str = "unet") -> dict[str, tuple[int, ...]]:
    """Canonical key → weight shape of each Linear/Conv2d of a diffusers model (meta or real), model order."""
    out: dict[str, tuple[int, ...]] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name:
            out[f"{component}/{name.replace('.', '_')}"] = tuple(m.weight.shape)
    return out


@functools.cache
def _cached_shapes(which: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    cfg = {"sd15": sd15_unet_config, "sdxl": sdxl_unet_config, "tiny": tiny_unet_config}[which]()
    return tuple(unet_layer_shapes(build_unet(cfg, meta=True)).items())


def sd15_unet_shapes() -> dict[str, tuple[int, ...]]:
    """Every Linear/Conv2d of the SD1.5 UNet (cached)."""
    return dict(_cached_shapes("sd15"))


def sdxl_unet_shapes() -> dict[str, tuple[int, ...]]:
    """Every Linear/Conv2d of the SDXL UNet (cached)."""
    return dict(_cached_shapes("sdxl"))


def tiny_unet_shapes() -> dict[str, tuple[int, ...]]:
    """Every Linear/Conv2d of the tiny test UNet (cached)."""
    return dict(_cached_shapes("tiny"))


def te_layer_shapes(component: str = "te1", hidden: int = 768, layers: int = 12,
                    intermediate: int = 3072) -> dict[str, tuple[int, ...]]:
    """CLIP text-encoder projections in HF naming. SD1.5/SDXL CLIP-L: defaults; SDXL bigG: 1280, 32, 5120."""
    out: dict[str, tuple[int, ...]] = {}
    for i in range(layers):
        p = f"{component}/text_model_encoder_layers_{i}_"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + "self_attn_" + proj] = (hidden, hidden)
        out[p + "mlp_fc1"] = (intermediate, hidden)
        out[p + "mlp_fc2"] = (hidden, intermediate)
    return out


_ATTN_SUFFIXES = ("_to_q", "_to_k", "_to_v", "_to_out_0")


def select(shapes: Shapes, attention: bool | None = None, conv: bool | None = None,
           prefix: str | None = None, limit: int | None = None) -> dict[str, tuple[int, ...]]:
    """Filter a shape table: attention projections only / not, convs (4-D) only / not, key prefix, first N."""
    out: dict[str, tuple[int, ...]] = {}
    for k, s in shapes.items():
        if attention is not None and k.endswith(_ATTN_SUFFIXES) != attention:
            continue
        if conv is not None and (len(s) == 4) != conv:
            continue
        if prefix is not None and not k.startswith(prefix):
            continue
        out[k] = tuple(s)
        if limit is not None and len(out) >= limit:
            break
    return out


def block_magnitude(down: float = 1.0, mid: float = 1.0, up: float = 1.0, te: float = 1.0) -> PerKey:
    """A ``scale_by`` callable: one factor per UNet part (down/input, mid, up/output blocks) and for TEs."""

    def f(key: str) -> float:
        comp, _, name = key.partition("/")
        if comp != "unet":
            return te
        if name.startswith("down_blocks"):
            return down
        if name.startswith("mid_block"):
            return mid
        if name.startswith("up_blocks"):
            return up
        return 1.0

    return f


# --------------------------------------------------------------------------------------------------
# Naming helpers
# --------------------------------------------------------------------------------------------------

# Module names that contain '_' (so that a flattened name can be turned back into a dotted path).
_WORDS = {
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
    "proj_in", "proj_out", "conv_shortcut", "time_emb_proj", "conv_in", "conv_out", "conv_norm_out",
    "time_embedding", "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj",
    "v_proj", "out_proj", "final_layer_norm", "layer_norm1", "layer_norm2", "add_k_proj", "add_v_proj",
    "add_q_proj", "to_add_out", "single_transformer_blocks", "proj_mlp", "ff_context", "norm1_context",
    "input_blocks", "output_blocks", "middle_block", "in_layers", "out_layers", "emb_layers",
    "skip_connection", "time_embed", "label_emb",
}


def module_path(flat_name: str) -> str:
    """Dotted path of a flattened name: ``down_blocks_0_attentions_0`` → ``down_blocks.0.attentions.0``."""
    tokens = flat_name.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for n in (4, 3, 2):
            cand = "_".join(tokens[i:i + n])
            if i + n <= len(tokens) and cand in _WORDS:
                parts.append(cand)
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def _up_attention(shapes: Shapes) -> frozenset[int]:
    found = set()
    for k in shapes:
        if k.startswith("unet/up_blocks_") and "_attentions_" in k:
            found.add(int(k.split("_")[2]))
    return frozenset(found)


def kohya_name(key: str, naming: Literal["diffusers", "sgm"] = "diffusers", sdxl_te: bool = False,
               up_attention: frozenset[int] = frozenset()) -> str:
    """The kohya file key (no suffix) of a canonical key."""
    comp, _, name = key.partition("/")
    if comp == "unet":
        if naming == "sgm":
            name = diffusers_to_sgm(name, up_attention)
        return "lora_unet_" + name
    if comp == "te1":
        return ("lora_te1_" if sdxl_te else "lora_te_") + name
    if comp == "te2":
        return "lora_te2_" + name
    raise ValueError(f"no kohya prefix for component {comp!r}")


def _value(v: NumOrFn | IntOrFn, key: str):
    return v(key) if callable(v) else v


class _Writer:
    """Shared plumbing: generator, per-key values, kohya names, metadata, save."""

    def __init__(self, shapes: Shapes, seed: int, naming: str, dtype: torch.dtype,
                 scale_by: NumOrFn, up_attention: Collection[int] | None = None) -> None:
        self.shapes = shapes
        self.gen = torch.Generator().manual_seed(seed)
        self.naming = naming
        self.dtype = dtype
        self.scale_by = scale_by
        self.sdxl_te = any(k.startswith("te2/") for k in shapes)
        self.up_attention = _up_attention(shapes) if up_attention is None else frozenset(up_attention)
        self.tensors: dict[str, torch.Tensor] = {}

    def randn(self, *shape: int, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    def name(self, key: str) -> str:
        return kohya_name(key, self.naming, self.sdxl_te, self.up_attention)  # type: ignore[arg-type]

    def mag(self, key: str) -> float:
        v = _value(self.scale_by, key)
        return 1.0 if v is None else float(v)

    def put(self, name: str, t: torch.Tensor) -> None:
        self.tensors[name] = t.to(self.dtype).contiguous()

    def save(self, path: str | Path, metadata: dict[str, str] | None) -> Path:
        path = Path(path)
        save_file(self.tensors, str(path), metadata=metadata)
        return path


def _lora_factors(w: _Writer, key: str, shape: tuple[int, ...], r: int, tucker: bool):
    out, inp = shape[0], shape[1]
    kernel = tuple(shape[2:])
    mag = w.mag(key)
    fan_in = inp * math.prod(kernel or (1,))
    if tucker and kernel and kernel != (1, 1):
        down = w.randn(r, inp, 1, 1, std=1 / math.sqrt(inp))
        mid = w.randn(r, r, *kernel, std=1 / math.sqrt(r * math.prod(kernel)))
        up = w.randn(out, r, 1, 1, std=mag / math.sqrt(r))
        return down, up, mid
    down = w.randn(r, inp, *kernel, std=1 / math.sqrt(fan_in))
    up = w.randn(out, r, *((1, 1) if kernel else ()), std=mag / math.sqrt(r))
    return down, up, None


def _alpha_tensor(w: _Writer, name: str, alpha: NumOrFn, key: str) -> None:
    a = _value(alpha, key)
    if a is not None:
        w.put(name + ".alpha", torch.tensor(float(a)))


def write_kohya(path: str | Path, shapes: Shapes, rank: IntOrFn = 4, alpha: NumOrFn = None, seed: int = 0,
                naming: Literal["diffusers", "sgm"] = "diffusers", scale_by: NumOrFn = None,
                tucker: bool = False, dtype: torch.dtype = torch.float32,
                metadata: dict[str, str] | None = None,
                up_attention: Collection[int] | None = None) -> Path:
    """kohya-ss LoRA/LoCon: ``lora_unet_<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.

    ``naming="sgm"`` writes UNet names as kohya does for SDXL (``input_blocks_4_1_…``). ``tucker`` adds a
    ``lora_mid`` for k×k convs. Metadata gets ``ss_network_dim``/``ss_network_alpha`` unless given.
    """
    w = _Writer(shapes, seed, naming, dtype, scale_by, up_attention)
    for key, shape in shapes.items():
        r = int(_value(rank, key))
        down, up, mid = _lora_factors(w, key, tuple(shape), r, tucker)
        name = w.name(key)
        w.put(name + ".lora_down.weight", down)
        w.put(name + ".lora_up.weight", up)
        if mid is not None:
            w.put(name + ".lora_mid.weight", mid)
        _alpha_tensor(w, name, alpha, key)
    if metadata is None:
        metadata = {"ss_network_module": "networks.lora"}
        if not callable(rank):
            metadata["ss_network_dim"] = str(rank)
        if alpha is not None and not callable(alpha):
            metadata["ss_network_alpha"] = str(alpha)
    return w.save(path, metadata)


_DIFFUSERS_PREFIX = {"unet": "unet.", "te1": "text_encoder.", "te2": "text_encoder_2."}


def _dotted(key: str) -> tuple[str, str]:
    comp, _, name = key.partition("/")
    return comp, module_path(name)


def write_diffusers_old(path: str | Path, shapes: Shapes, rank: IntOrFn = 4, seed: int = 0,
                        prefix: str = "unet.unet.", processor: bool = False, scale_by: NumOrFn = None,
                        dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None) -> Path:
    """Old diffusers LoRA: ``<prefix><module>.lora.down.weight`` / ``.lora.up.weight`` (no alpha).

    ``prefix`` applies to UNet keys (``unet.unet.`` as the official K-LoRA training script writes, ``unet.``
    or ``""``); text-encoder keys get ``text_encoder.``/``text_encoder_2.`` and ``.lora_linear_layer``.
    ``processor=True`` writes attention projections as ``<attn>.processor.to_q_lora.down.weight``
    (``to_out_lora`` for ``to_out.0``); other layers keep the ``.lora.`` form.
    """
    w = _Writer(shapes, seed, "diffusers", dtype, scale_by)
    for key, shape in shapes.items():
        r = int(_value(rank, key))
        down, up, _ = _lora_factors(w, key, tuple(shape), r, False)
        comp, mod = _dotted(key)
        if comp == "unet":
            if processor and key.endswith(_ATTN_SUFFIXES):
                if mod.endswith(".to_out.0"):
                    head, proj = mod[: -len(".to_out.0")], "to_out"
                else:
                    head, proj = mod.rsplit(".", 1)
                base = f"{prefix}{head}.processor.{proj}_lora"
                w.put(base + ".down.weight", down)
                w.put(base + ".up.weight", up)
                continue
            base = f"{prefix}{mod}.lora"
        else:
            base = f"{_DIFFUSERS_PREFIX[comp]}{mod}.lora_linear_layer"
        w.put(base + ".down.weight", down)
        w.put(base + ".up.weight", up)
    return w.save(path, metadata)


def write_peft(path: str | Path, shapes: Shapes, rank: IntOrFn = 4, seed: int = 0,
               metadata_alpha: float | dict | None = None, scale_by: NumOrFn = None,
               dtype: torch.dtype = torch.float32, prefixes: Mapping[str, str] | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """PEFT/diffusers LoRA: ``unet.<module>.lora_A.weight`` (r, in) / ``.lora_B.weight`` (out, r).

    ``metadata_alpha``: None writes no ``lora_adapter_metadata`` (readers use alpha = rank); a number writes
    ``{"<comp>.lora_alpha": x, "<comp>.r": rank}`` for every component present; a dict is written as the
    JSON itself (e.g. with ``alpha_pattern``). ``prefixes`` overrides the component prefixes.
    """
    pre = dict(_DIFFUSERS_PREFIX if prefixes is None else prefixes)
    w = _Writer(shapes, seed, "diffusers", dtype, scale_by)
    comps: set[str] = set()
    for key, shape in shapes.items():
        r = int(_value(rank, key))
        down, up, _ = _lora_factors(w, key, tuple(shape), r, False)
        comp, mod = _dotted(key)
        comps.add(comp)
        w.put(f"{pre[comp]}{mod}.lora_A.weight", down)
        w.put(f"{pre[comp]}{mod}.lora_B.weight", up)
    meta = dict(metadata or {})
    meta.setdefault("format", "pt")
    if isinstance(metadata_alpha, dict):
        meta["lora_adapter_metadata"] = json.dumps(metadata_alpha)
    elif metadata_alpha is not None:
        cfg: dict = {}
        for comp in sorted(comps):
            p = pre[comp].rstrip(".")
            cfg[f"{p}.lora_alpha"] = metadata_alpha
            if not callable(rank):
                cfg[f"{p}.r"] = rank
        meta["lora_adapter_metadata"] = json.dumps(cfg)
    return w.save(path, meta)


def write_loha(path: str | Path, shapes: Shapes, rank: IntOrFn = 4, alpha: NumOrFn = None, seed: int = 0,
               naming: Literal["diffusers", "sgm"] = "diffusers", scale_by: NumOrFn = None,
               tucker: bool = False, dtype: torch.dtype = torch.float32,
               metadata: dict[str, str] | None = None,
               up_attention: Collection[int] | None = None) -> Path:
    """LyCORIS LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·kh·kw), same for w2 (convs flattened, as
    LyCORIS writes them). ``tucker``: for k×k convs ``hada_t1``/``hada_t2`` (r, r, kh, kw) with ``hada_w*_a``
    (r, out), ``hada_w*_b`` (r, in)."""
    w = _Writer(shapes, seed, naming, dtype, scale_by, up_attention)
    for key, shape in shapes.items():
        r = int(_value(rank, key))
        out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
        name = w.name(key)
        mag = math.sqrt(w.mag(key))
        if tucker and kernel and kernel != (1, 1):
            for i in (1, 2):
                w.put(f"{name}.hada_t{i}", w.randn(r, r, *kernel, std=1 / math.sqrt(r)))
                w.put(f"{name}.hada_w{i}_a", w.randn(r, out, std=mag / math.sqrt(r)))
                w.put(f"{name}.hada_w{i}_b", w.randn(r, inp, std=1 / math.sqrt(inp)))
        else:
            flat_in = inp * math.prod(kernel or (1,))
            for i in (1, 2):
                w.put(f"{name}.hada_w{i}_a", w.randn(out, r, std=mag / math.sqrt(r)))
                w.put(f"{name}.hada_w{i}_b", w.randn(r, flat_in, std=1 / math.sqrt(flat_in)))
        _alpha_tensor(w, name, alpha, key)
    return w.save(path, metadata)


def _split(n: int) -> tuple[int, int]:
    """n = a·b with a the largest divisor ≤ √n (the small Kronecker factor first)."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def write_lokr(path: str | Path, shapes: Shapes, rank: IntOrFn = 4, alpha: NumOrFn = None, seed: int = 0,
               naming: Literal["diffusers", "sgm"] = "diffusers", scale_by: NumOrFn = None,
               decompose: Literal["w2", "both", "none"] = "w2", tucker: bool = False,
               dtype: torch.dtype = torch.float32, metadata: dict[str, str] | None = None,
               up_attention: Collection[int] | None = None) -> Path:
    """LyCORIS LoKr: ΔW = kron(w1, w2) with out = a·b, in = c·d.

    ``decompose``: ``"w2"`` — ``lokr_w1`` (a, c) full, ``lokr_w2_a`` (b, r) @ ``lokr_w2_b`` (r, d·kh·kw);
    ``"both"`` — also ``lokr_w1_a`` (a, r) @ ``lokr_w1_b`` (r, c); ``"none"`` — ``lokr_w1`` and ``lokr_w2``
    (b, d[, kh, kw]) full. ``tucker`` (k×k convs, decomposed w2): ``lokr_t2`` (r, r, kh, kw),
    ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d).
    """
    w = _Writer(shapes, seed, naming, dtype, scale_by, up_attention)
    for key, shape in shapes.items():
        r = int(_value(rank, key))
        out, inp, kernel = shape[0], shape[1], tuple(shape[2:])
        a, b = _split(out)
        c, d = _split(inp)
        name = w.name(key)
        mag = w.mag(key)
        if decompose == "both":
            w.put(f"{name}.lokr_w1_a", w.randn(a, r, std=1 / math.sqrt(r)))
            w.put(f"{name}.lokr_w1_b", w.randn(r, c, std=1 / math.sqrt(c)))
        else:
            w.put(f"{name}.lokr_w1", w.randn(a, c, std=1 / math.sqrt(c)))
        k = math.prod(kernel or (1,))
        if decompose == "none":
            w.put(f"{name}.lokr_w2", w.randn(b, d, *kernel, std=mag / math.sqrt(d * k)))
        elif tucker and kernel and kernel != (1, 1):
            w.put(f"{name}.lokr_t2", w.randn(r, r, *kernel, std=1 / math.sqrt(r)))
            w.put(f"{name}.lokr_w2_a", w.randn(r, b, std=mag / math.sqrt(r)))
            w.put(f"{name}.lokr_w2_b", w.randn(r, d, std=1 / math.sqrt(d)))
        else:
            w.put(f"{name}.lokr_w2_a", w.randn(b, r, std=mag / math.sqrt(r)))
            w.put(f"{name}.lokr_w2_b", w.randn(r, d * k, std=1 / math.sqrt(d * k)))
        _alpha_tensor(w, name, alpha, key)
    return w.save(path, metadata)


def write_full(path: str | Path, shapes: Shapes, seed: int = 0,
               naming: Literal["diffusers", "sgm"] = "diffusers", scale_by: NumOrFn = None,
               bias: bool = False, dtype: torch.dtype = torch.float32,
               metadata: dict[str, str] | None = None,
               up_attention: Collection[int] | None = None) -> Path:
    """LyCORIS full: ``<name>.diff`` (the weight's shape), optional ``<name>.diff_b`` (out,)."""
    w = _Writer(shapes, seed, naming, dtype, scale_by, up_attention)
    for key, shape in shapes.items():
        name = w.name(key)
        fan_in = math.prod(shape[1:])
        w.put(f"{name}.diff", w.randn(*shape, std=w.mag(key) * 0.1 / math.sqrt(fan_in)))
        if bias:
            w.put(f"{name}.diff_b", w.randn(shape[0], std=0.01 * w.mag(key)))
    return w.save(path, metadata)


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                  metadata: dict[str, str] | None = None) -> Path:
    """Write arbitrary tensors (for files of kinds we refuse, or hand-made edge cases)."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return Path(path)
