"""SD UNet names: SGM (ldm) ↔ diffusers, and the hookable modules of an SD model by canonical key.

Files and hosts use three spellings of the same UNet module: diffusers (``down_blocks.1.attentions.0…``),
SGM/ldm as in A1111's ``model.diffusion_model`` and kohya SDXL files (``input_blocks.4.1…``), and kohya's
flattened ``lora_unet_…`` form of either. Everything here works on the flattened ('_') form, so one converter
serves file keys and module names alike.

The block arithmetic is the same for SD1.x/2.x and SDXL (two layers per block, three ``input_blocks`` /
``output_blocks`` per block):
``input_blocks[3i+1+j]`` = ``down_blocks[i]`` layer j (``.0`` resnet, ``.1`` attention),
``input_blocks[3i+3].0.op`` = ``down_blocks[i].downsamplers.0.conv``,
``output_blocks[3i+j]`` = ``up_blocks[i]`` layer j, with the upsampler's ``conv`` at ``output_blocks[3i+2]``
index 1 (block without attention) or 2,
``middle_block.0/1/2`` = ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Literal

from torch import nn

Naming = Literal["diffusers", "sgm"]

# ResnetBlock2D member names: SGM → diffusers.
_RESNET_SGM_TO_DIFF = {
    "in_layers_0": "norm1",
    "in_layers_2": "conv1",
    "emb_layers_1": "time_emb_proj",
    "out_layers_0": "norm2",
    "out_layers_3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFF_TO_SGM = {v: k for k, v in _RESNET_SGM_TO_DIFF.items()}

# Top-level UNet modules outside the blocks: SGM → diffusers.
_TOP_SGM_TO_DIFF = {
    "time_embed_0": "time_embedding_linear_1",
    "time_embed_2": "time_embedding_linear_2",
    "label_emb_0_0": "add_embedding_linear_1",
    "label_emb_0_2": "add_embedding_linear_2",
    "input_blocks_0_0": "conv_in",
    "out_0": "conv_norm_out",
    "out_2": "conv_out",
}
_TOP_DIFF_TO_SGM = {v: k for k, v in _TOP_SGM_TO_DIFF.items()}

_SGM_ROOT = re.compile(r"^(input_blocks|middle_block|output_blocks|time_embed|label_emb)_|^out_[02]$")
_IN_RE = re.compile(r"^input_blocks_(\d+)_(\d+)(?:_(.+))?$")
_MID_RE = re.compile(r"^middle_block_(\d+)(?:_(.+))?$")
_OUT_RE = re.compile(r"^output_blocks_(\d+)_(\d+)(?:_(.+))?$")
_D_BLOCK_RE = re.compile(r"^(down|up)_blocks_(\d+)_(resnets|attentions)_(\d+)(?:_(.+))?$")
_D_SAMPLER_RE = re.compile(r"^(down|up)_blocks_(\d+)_(downsamplers|upsamplers)_0_conv$")
_D_MID_RE = re.compile(r"^mid_block_(resnets|attentions)_(\d+)(?:_(.+))?$")


def is_sgm_name(flat_name: str) -> bool:
    """Whether a flattened UNet module name uses SGM/ldm block names (``input_blocks_…``)."""
    return bool(_SGM_ROOT.match(flat_name))


def _resnet_rest(rest: str | None, table: dict[str, str]) -> str | None:
    if rest is None:
        return None
    for old, new in table.items():
        if rest == old or rest.startswith(old + "_"):
            return new + rest[len(old):]
    return rest


def _join(*parts: str | None) -> str:
    return "_".join(p for p in parts if p)


def sgm_to_diffusers(flat_name: str) -> str:
    """Convert a flattened SGM UNet module name to the flattened diffusers name.

    Names that are not SGM names come back unchanged (so diffusers names pass through).
    """
    if flat_name in _TOP_SGM_TO_DIFF:
        return _TOP_SGM_TO_DIFF[flat_name]
    m = _IN_RE.match(flat_name)
    if m:
        n, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        if n == 0:
            return flat_name
        i, j = divmod(n - 1, 3)
        if j == 2:  # the block's downsampler
            if sub == 0 and rest == "op":
                return f"down_blocks_{i}_downsamplers_0_conv"
            return flat_name
        if sub == 0:
            return _join(f"down_blocks_{i}_resnets_{j}", _resnet_rest(rest, _RESNET_SGM_TO_DIFF))
        if sub == 1:
            return _join(f"down_blocks_{i}_attentions_{j}", rest)
        return flat_name
    m = _MID_RE.match(flat_name)
    if m:
        sub, rest = int(m.group(1)), m.group(2)
        if sub in (0, 2):
            return _join(f"mid_block_resnets_{sub // 2}", _resnet_rest(rest, _RESNET_SGM_TO_DIFF))
        if sub == 1:
            return _join("mid_block_attentions_0", rest)
        return flat_name
    m = _OUT_RE.match(flat_name)
    if m:
        n, sub, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        i, j = divmod(n, 3)
        if sub == 0:
            return _join(f"up_blocks_{i}_resnets_{j}", _resnet_rest(rest, _RESNET_SGM_TO_DIFF))
        if rest == "conv" and j == 2 and sub in (1, 2):  # Upsample's only module is `conv`
            return f"up_blocks_{i}_upsamplers_0_conv"
        if sub == 1:
            return _join(f"up_blocks_{i}_attentions_{j}", rest)
        return flat_name
    return flat_name


def diffusers_to_sgm(flat_name: str, up_blocks_with_attention: frozenset[int] | set[int] = frozenset()
                     ) -> str:
    """Convert a flattened diffusers UNet module name to the flattened SGM name.

    The upsampler's index inside ``output_blocks[3i+2]`` depends on the model (1 when up block i has no
    attention, else 2), so the caller names the up blocks that have attention (SD1.5: {1, 2, 3};
    SDXL: {0, 1}). Names that are not diffusers UNet names come back unchanged.
    """
    if flat_name in _TOP_DIFF_TO_SGM:
        return _TOP_DIFF_TO_SGM[flat_name]
    m = _D_BLOCK_RE.match(flat_name)
    if m:
        side, i, what, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if what == "resnets":
            rest, sub = _resnet_rest(rest, _RESNET_DIFF_TO_SGM), 0
        else:
            sub = 1
        n = 3 * i + 1 + j if side == "down" else 3 * i + j
        block = "input_blocks" if side == "down" else "output_blocks"
        return _join(f"{block}_{n}_{sub}", rest)
    m = _D_SAMPLER_RE.match(flat_name)
    if m:
        i = int(m.group(2))
        if m.group(1) == "down":
            return f"input_blocks_{3 * i + 3}_0_op"
        sub = 2 if i in up_blocks_with_attention else 1
        return f"output_blocks_{3 * i + 2}_{sub}_conv"
    m = _D_MID_RE.match(flat_name)
    if m:
        what, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if what == "resnets":
            return _join(f"middle_block_{2 * j}", _resnet_rest(rest, _RESNET_DIFF_TO_SGM))
        return _join("middle_block_1", rest)
    return flat_name


def unet_key(flat_name: str) -> str:
    """Canonical key of a UNet module given its flattened name in either naming."""
    return "unet/" + (sgm_to_diffusers(flat_name) if is_sgm_name(flat_name) else flat_name)


_SGM_BLOCK_RE = re.compile(r"^(input_blocks|output_blocks)_(\d+)_(\d+)(?:_(.+))?$")


def _ldm_unet(model: nn.Module) -> nn.Module:
    """``model`` itself when it carries ``num_res_blocks``, else its ``diffusion_model`` submodule (a wrapper
    such as A1111's whole ``sd_model``); ``model`` when there is none."""
    if hasattr(model, "num_res_blocks"):
        return model
    found = [(n, m) for n, m in model.named_modules()
             if (n == "diffusion_model" or n.endswith(".diffusion_model")) and hasattr(m, "num_res_blocks")]
    return min(found, key=lambda nm: len(nm[0]))[1] if found else model


def sgm_renumbering(unet: nn.Module) -> Callable[[str], str | None] | None:
    """Renumber the SGM blocks of a UNet whose levels do not have two res blocks each into the two-block
    layout :func:`sgm_to_diffusers` assumes (every SD1.x/SD2.x/SDXL checkpoint has it).

    ldm/SGM ``UNetModel`` numbers ``input_blocks``/``output_blocks`` by its ``num_res_blocks`` per level
    (``input_blocks``: conv, then per level its res blocks and a downsampler; ``output_blocks``: per level,
    deepest first, ``num_res_blocks + 1`` blocks, the last holding the upsampler), so with one block per level
    the fixed formula would put, e.g., ``up_blocks.1.attentions.0`` on ``output_blocks.3``. ``unet`` is the
    UNet or a wrapper with a ``diffusion_model`` submodule. None when the layout is the standard one (or
    unknown). The function takes and returns flattened names; it returns None for a block the standard
    layout cannot express (a level's third or later res block), and other names unchanged."""
    dm = _ldm_unet(unet)
    nrb = getattr(dm, "num_res_blocks", None)
    if isinstance(nrb, int):
        nrb = [nrb] * len(getattr(dm, "channel_mult", ()) or ())
    if not isinstance(nrb, (list, tuple)) or not nrb or not all(isinstance(n, int) for n in nrb):
        return None
    if all(n == 2 for n in nrb):
        return None
    levels = len(nrb)
    down: dict[int, int] = {0: 0}
    up: dict[int, int] = {}
    upsampler: dict[int, int] = {}  # an up level's last block (holds the Upsample) → the standard 3i+2
    n = 1
    for i, count in enumerate(nrb):
        for j in range(min(count, 2)):  # a third block has no number of its own in the standard layout
            down[n + j] = 3 * i + 1 + j
        n += count
        if i < levels - 1:
            down[n] = 3 * i + 3
            n += 1
    n = 0
    for i in range(levels):
        count = nrb[levels - 1 - i] + 1
        for j in range(min(count, 3)):
            up[n + j] = 3 * i + j
        if i < levels - 1:
            upsampler[n + count - 1] = 3 * i + 2
        n += count

    def renumber(flat_name: str) -> str | None:
        m = _SGM_BLOCK_RE.match(flat_name)
        if m is None:
            return flat_name
        side, block, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if side == "input_blocks":
            new = down.get(block)
        elif rest == "conv" and sub >= 1 and block in upsampler:  # Upsample's only module is ``conv``
            new = upsampler[block]
        else:
            new = up.get(block)
        if new is None:
            return None
        return _join(f"{side}_{new}_{sub}", rest)

    return renumber


# OpenCLIP (A1111's SDXL te2, SD2 te) → HF CLIP names for the modules whose forward is called.
_OPENCLIP_RE = re.compile(r"^(?:.*_)?transformer_resblocks_(\d+)_mlp_(c_fc|c_proj)$")
_OPENCLIP_MLP = {"c_fc": "fc1", "c_proj": "fc2"}
_WRAPPER_PREFIXES = ("model_diffusion_model_", "diffusion_model_")


def _te_name(flat_name: str, naming: Naming) -> str | None:
    i = flat_name.find("text_model_")
    if i >= 0:
        return flat_name[i:]
    if naming == "diffusers" and flat_name.startswith("encoder_layers_"):
        return "text_model_" + flat_name  # transformers 5's CLIPTextModel has no text_model level
    if naming == "sgm":
        m = _OPENCLIP_RE.match(flat_name)
        if m:
            return f"text_model_encoder_layers_{m.group(1)}_mlp_{_OPENCLIP_MLP[m.group(2)]}"
    return None


def module_targets(model: nn.Module, component: str, naming: Naming) -> dict[str, nn.Module]:
    """Canonical key → Linear/Conv2d module of ``model`` (including subclasses, e.g. hosts' own ops).

    ``naming="diffusers"``: a diffusers ``UNet2DConditionModel`` (or a transformer) for ``unet``, an HF
    ``CLIPTextModel`` (or anything whose names contain ``text_model.``) for ``te1``/``te2``.
    ``naming="sgm"``: A1111's ldm/SGM UNet (``model.diffusion_model``; given a wrapper such as the whole
    ``sd_model``, only the modules under ``diffusion_model.`` are taken, without that prefix), numbered by
    its own ``num_res_blocks`` (:func:`sgm_renumbering`; blocks it cannot express are left out), and for
    text encoders also OpenCLIP's MLP layers (``transformer.resblocks.N.mlp.c_fc``).
    OpenCLIP attention (``nn.MultiheadAttention``) is not returned: its fused ``in_proj`` is a parameter,
    not a module, and its ``out_proj`` is used without calling the submodule's forward, so a forward hook
    there would never run.
    """
    out: dict[str, nn.Module] = {}
    named = [(n.replace(".", "_"), m) for n, m in model.named_modules()
             if n and isinstance(m, (nn.Linear, nn.Conv2d))]
    wrapped = (component == "unet" and naming == "sgm"
               and any(f.startswith(_WRAPPER_PREFIXES) for f, _ in named))
    renumber = sgm_renumbering(model) if component == "unet" and naming == "sgm" else None
    for f, module in named:
        if component == "unet":
            if naming == "sgm":
                if wrapped:  # a wrapper (e.g. the whole sd_model) was passed: only its diffusion_model
                    p = next((p for p in _WRAPPER_PREFIXES if f.startswith(p)), None)
                    if p is None:
                        continue
                    f = f[len(p):]
                if renumber is not None and is_sgm_name(f):
                    renumbered = renumber(f)
                    if renumbered is None:
                        continue
                    f = renumbered
                f = sgm_to_diffusers(f)
            out["unet/" + f] = module
        else:
            te = _te_name(f, naming)
            if te is not None:
                out[f"{component}/{te}"] = module
    return out


def up_blocks_with_attention(model: nn.Module) -> frozenset[int]:
    """Indices of a diffusers UNet's up blocks that contain attention (for :func:`diffusers_to_sgm`)."""
    found = set()
    for name, _ in model.named_modules():
        m = re.match(r"^up_blocks\.(\d+)\.attentions\.", name)
        if m:
            found.add(int(m.group(1)))
    return frozenset(found)


# 3×3 convs of SD/SDXL UNets (canonical names), for LoHa/LoKr files that flatten the kernel.
_CONV3_RE = re.compile(r"^unet/(?:.*_(?:conv1|conv2)|.*samplers_0_conv|conv_in|conv_out)$")


def flattened_conv_shape(key: str, out: int, flat_in: int) -> tuple[int, ...]:
    """Target shape of a layer whose file flattened a conv kernel into the input dimension (LoHa and LoKr
    without Tucker cores): 3×3 for the SD UNet's ``conv1``/``conv2``/``conv_in``/``conv_out`` and sampler
    ``conv``, 1×1 for ``conv_shortcut``, else ``(out, flat_in)`` (a Linear, or a 1×1 conv such as SD1.5's
    ``proj_in``, which :func:`klora.layers.layout` treats alike)."""
    if _CONV3_RE.match(key) and flat_in % 9 == 0:
        return (out, flat_in // 9, 3, 3)
    if key.startswith("unet/") and key.endswith("_conv_shortcut"):
        return (out, flat_in, 1, 1)
    return (out, flat_in)

