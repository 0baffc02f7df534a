"""Forge's extensions-builtin/sd_forge_lora/networks.py (dfdcbab6) as the glue uses it: the registries of
available LoRA files and list_available_networks(), the same as A1111's builtin Lora (the A1111 double,
run in this module first) except that only ``shared.cmd_opts.lora_dir`` is scanned (``FORGE``)."""

from __future__ import annotations

from overlay import extend

a1111 = extend(globals())

FORGE = True
