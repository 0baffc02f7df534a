"""Mirror of modules/shared.py (A1111 v1.10.1): the globals the glue reads (sd_model, opts, state)."""

from __future__ import annotations

import os
from types import SimpleNamespace

from modules import options, shared_state

# modules/shared.py re-exports these from modules/options.py
OptionInfo = options.OptionInfo
options_section = options.options_section

# modules/shared_options.py: options_templates (only the entries the glue and the samplers read)
options_templates: dict[str, options.OptionInfo] = {
    "img2img_fix_steps": OptionInfo(
        False, "With img2img, do exactly the amount of steps the slider specifies."
    ),
    "persistent_cond_cache": OptionInfo(True, "Persistent cond cache"),
    "refiner_switch_by_sample_steps": OptionInfo(
        False, "Switch to refiner by sampling steps instead of model timesteps. Old behavior for refiner."
    ),
    "hires_fix_refiner_pass": OptionInfo("second pass", "Hires fix: which pass to enable refiner for"),
    "hires_fix_use_firstpass_conds": OptionInfo(
        False, "For hires fix, calculate conds of second pass using extra networks of first pass."
    ),
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "lora_in_memory_limit": OptionInfo(0, "Number of Lora networks to keep cached in memory"),
    "always_discard_next_to_last_sigma": OptionInfo(False, "Always discard next-to-last sigma"),
}

# modules/shared.py: opts = options.Options(options_templates, restricted_opts)
opts = options.Options(options_templates)

# modules/shared.py: state = shared_state.State()
state = shared_state.State()

# modules/shared.py: sd_model (set by sd_models.load_model; here by the tests)
sd_model = None

# modules/shared.py: cmd_opts (parsed command line); only the Lora dirs are read
cmd_opts = SimpleNamespace(lora_dir="", lyco_dir_backcompat="")


# modules/shared.py: walk_files = util.walk_files (modules/util.py: walk_files(path, allowed_extensions=None))
# — the files under ``path``, sorted; hidden folders are listed (opts.list_hidden_files is not modelled)
def walk_files(path, allowed_extensions=None):
    if not os.path.exists(path):
        return
    if allowed_extensions is not None:
        allowed_extensions = set(allowed_extensions)
    for root, _, files in sorted(os.walk(path, followlinks=True), key=lambda x: x[0]):
        for filename in sorted(files):
            extension = os.path.splitext(filename)[1].lower()
            if allowed_extensions is not None and extension not in allowed_extensions:
                continue
            yield os.path.join(root, filename)
