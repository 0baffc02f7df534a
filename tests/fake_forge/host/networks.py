"""Mirror of extensions-builtin/sd_forge_lora/networks.py (name lists and list_available_networks) and
network.py::NetworkOnDisk (name, filename, alias). ``lora_dir`` stands in for shared.cmd_opts.lora_dir."""

from __future__ import annotations

import os

lora_dir = ""
available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
available_network_hash_lookup = {}
scans = 0


# extensions-builtin/sd_forge_lora/network.py: NetworkOnDisk(name, filename)
class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.alias = self.name


# extensions-builtin/sd_forge_lora/networks.py: process_network_files(names=None)
def process_network_files(names=None):
    if not lora_dir or not os.path.isdir(lora_dir):
        return
    for entry in sorted(os.listdir(lora_dir)):
        filename = os.path.join(lora_dir, entry)
        if os.path.isdir(filename) or os.path.splitext(entry)[1].lower() not in (
            ".pt",
            ".ckpt",
            ".safetensors",
        ):
            continue
        name = os.path.splitext(entry)[0]
        if names and name not in names:
            continue
        net = NetworkOnDisk(name, filename)
        available_networks[name] = net
        if net.alias in available_network_aliases:
            forbidden_network_aliases[net.alias.lower()] = 1
        available_network_aliases[name] = net
        available_network_aliases[net.alias] = net


# extensions-builtin/sd_forge_lora/networks.py: list_available_networks()
def list_available_networks():
    global scans
    scans += 1
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    available_network_hash_lookup.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    process_network_files()
