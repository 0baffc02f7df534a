"""Mirror of extensions-builtin/Lora/networks.py (A1111 v1.10.1): the registries of available LoRA files and
list_available_networks(), which rescans the Lora folder (shared.cmd_opts.lora_dir)."""

from __future__ import annotations

import os

import network
from modules import errors, shared

available_networks = {}
available_network_aliases = {}
loaded_networks = []
networks_in_memory = {}
available_network_hash_lookup = {}
forbidden_network_aliases = {}


# The host switch of this double: the Forge overlay's networks.py
# (extensions-builtin/sd_forge_lora/networks.py) runs this file and sets it True; Forge's Lora extension does
# not scan the LyCORIS folder.
FORGE = False

_EXTENSIONS = [".pt", ".ckpt", ".safetensors"]


# extensions-builtin/Lora/networks.py: process_network_files(names=None)
def process_network_files(names: list[str] | None = None):
    candidates = list(shared.walk_files(shared.cmd_opts.lora_dir, allowed_extensions=_EXTENSIONS))
    if not FORGE:
        lyco = shared.cmd_opts.lyco_dir_backcompat
        candidates += list(shared.walk_files(lyco, allowed_extensions=_EXTENSIONS))
    for filename in candidates:
        if os.path.isdir(filename):
            continue
        name = os.path.splitext(os.path.basename(filename))[0]
        if names and name not in names:
            continue
        try:
            entry = network.NetworkOnDisk(name, filename)
        except OSError:
            errors.report(f"Failed to load network {name} from {filename}", exc_info=True)
            continue

        available_networks[name] = entry

        if entry.alias in available_network_aliases:
            forbidden_network_aliases[entry.alias.lower()] = 1

        available_network_aliases[name] = entry
        available_network_aliases[entry.alias] = entry


# extensions-builtin/Lora/networks.py: update_available_networks_by_names(names)
def update_available_networks_by_names(names: list[str]):
    process_network_files(names)


# extensions-builtin/Lora/networks.py: list_available_networks()
def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})

    if shared.cmd_opts.lora_dir:
        os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)

    process_network_files()
