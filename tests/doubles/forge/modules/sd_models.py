"""Forge's modules/sd_models.py (dfdcbab6): the checkpoint list and selection are A1111's (the A1111 double
runs in this module first); loading is Forge's own. ``reload_model_weights`` does nothing; the model is
(re)loaded by ``forge_model_reload()`` when ``model_data.forge_loading_parameters`` (set by
modules_forge/main_entry.py) changed since the last load.
"""

from __future__ import annotations

from modules import script_callbacks, shared
from overlay import extend

a1111 = extend(globals())


# modules/sd_models.py: class SdModelData (the model the webui runs; ``shared.sd_model`` reads it through
# modules/shared_items.py Shared.sd_model — the double's shared keeps a plain attribute, set here too)
class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v
        shared.sd_model = v


model_data = SdModelData()


# modules/sd_models.py: reload_model_weights(sd_model=None, info=None, forced_reload=False) — a no-op on Forge
def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    pass


# modules/sd_models.py: forge_model_reload() — (model, whether it was loaded now); loading stands in for
# backend/loader.py forge_loader (the test registers its models in ``loaded_models`` by checkpoint title)
def forge_model_reload():
    current_hash = str(model_data.forge_loading_parameters)

    if model_data.forge_hash == current_hash:
        return model_data.sd_model, False

    if model_data.sd_model:
        model_data.sd_model = None

    checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]

    if checkpoint_info is None:
        raise ValueError(
            "You do not have any model! Please download at least one model in [models/Stable-diffusion]."
        )

    sd_model = loaded_models[checkpoint_info.title]  # noqa: F821 (defined by the A1111 layer run above)

    sd_model.extra_generation_params = {}
    sd_model.comments = []
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename

    model_data.set_sd_model(sd_model)

    script_callbacks.model_loaded_callback(sd_model)

    model_data.forge_hash = current_hash

    return sd_model, True
