"""Mirror of backend/patcher/lora.py::model_lora_keys_unet (via
packages_3rdparty/comfyui_lora_collection: lora.py::model_lora_keys_unet and utils.py::flux_to_diffusers).

Mirrored: the generic part (``lora_unet_<module with _>`` for every ``diffusion_model.*.weight``) and, for
Flux, ``transformer.<diffusers>`` and ``lora_transformer_<diffusers with _>`` with ``(param, (0, start,
length))`` offsets for the fused qkv and linear1, written here from Forge's table (hidden size from the
model). The SD diffusers-name part is left out."""

from __future__ import annotations

# flux_to_diffusers facts: diffusers module in a block → (BFL module, offset index or None)
_DOUBLE = [
    ("attn.to_q", "img_attn.qkv", 0),
    ("attn.to_k", "img_attn.qkv", 1),
    ("attn.to_v", "img_attn.qkv", 2),
    ("attn.add_q_proj", "txt_attn.qkv", 0),
    ("attn.add_k_proj", "txt_attn.qkv", 1),
    ("attn.add_v_proj", "txt_attn.qkv", 2),
    ("attn.to_out.0", "img_attn.proj", None),
    ("norm1.linear", "img_mod.lin", None),
    ("norm1_context.linear", "txt_mod.lin", None),
    ("attn.to_add_out", "txt_attn.proj", None),
    ("ff.net.0.proj", "img_mlp.0", None),
    ("ff.net.2", "img_mlp.2", None),
    ("ff_context.net.0.proj", "txt_mlp.0", None),
    ("ff_context.net.2", "txt_mlp.2", None),
]
_SINGLE = [
    ("attn.to_q", "linear1", 0),
    ("attn.to_k", "linear1", 1),
    ("attn.to_v", "linear1", 2),
    ("proj_mlp", "linear1", 3),
    ("norm.linear", "modulation.lin", None),
    ("proj_out", "linear2", None),
]


def _flux_map(model, key_map):
    dm = model.diffusion_model
    h = dm.hidden_size
    for prefix_from, prefix_to, table, n in (
        ("transformer_blocks", "double_blocks", _DOUBLE, len(dm.double_blocks)),
        ("single_transformer_blocks", "single_blocks", _SINGLE, len(dm.single_blocks)),
    ):
        for i in range(n):
            for d, b, part in table:
                to = f"diffusion_model.{prefix_to}.{i}.{b}.weight"
                value = to if part is None else (to, (0, h * part, h if part < 3 else h * 4))
                name = f"{prefix_from}.{i}.{d}"
                key_map[f"transformer.{name}"] = value
                key_map["lora_transformer_{}".format(name.replace(".", "_"))] = value


# backend/patcher/lora.py: model_lora_keys_unet(model, key_map={})
def model_lora_keys_unet(model, key_map={}):  # noqa: B006 (Forge's signature, shared default included)
    for k in model.state_dict():
        if k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_lora = k[len("diffusion_model.") : -len(".weight")].replace(".", "_")
            key_map[f"lora_unet_{key_lora}"] = k
            key_map[k[: -len(".weight")]] = k
    if "flux" in model.config.huggingface_repo.lower():
        _flux_map(model, key_map)
    return key_map
