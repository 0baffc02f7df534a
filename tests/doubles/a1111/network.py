"""Mirror of extensions-builtin/Lora/network.py (A1111 v1.10.1): NetworkOnDisk, the record of one LoRA file in
the webui's list (name = file name without extension, alias from metadata)."""

from __future__ import annotations

import os


# extensions-builtin/Lora/network.py: class NetworkOnDisk
class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = None
        self.shorthash = None
        self.sd_version = None
