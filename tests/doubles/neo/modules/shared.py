"""Forge Neo's modules/shared.py: A1111's (the A1111 double runs in this module first; Forge keeps it) with
the options of Neo's modules/shared_options.py section "refiner" that the refiner switch reads."""

from __future__ import annotations

from overlay import extend

a1111 = extend(globals())

# modules/shared_options.py, section "refiner"
for _key, _info in {
    "refiner_fast_sd": a1111.OptionInfo(False, 'Reload "state_dict" Only'),
    "refiner_use_steps": a1111.OptionInfo(False, "Switch by sampling steps instead of sigma"),
    "refiner_lora_replacement": a1111.OptionInfo("high_noise=low_noise", "LoRA replacement for the refiner"),
}.items():
    options_templates[_key] = _info  # noqa: F821 (defined by the A1111 layer run above)
    opts.add_option(_key, _info)  # noqa: F821
