"""Mirror of modules/sd_models.py (A1111 v1.10.1): the checkpoint record and reload_model_weights, which
replaces shared.sd_model (a new model object for another checkpoint, e.g. the refiner)."""

from __future__ import annotations

from modules import shared

loaded_models: dict = {}
"""Test-only: checkpoint title → model object, standing in for loading a checkpoint from disk."""

selected_checkpoint = None
"""Test-only: the checkpoint the settings select (the real one reads opts.sd_model_checkpoint)."""


# modules/sd_models.py: class CheckpointInfo
class CheckpointInfo:
    def __init__(self, filename, vae=None):
        self.filename = filename
        self.name = filename
        self.name_for_extra = filename.rsplit(".", 1)[0]
        self.model_name = self.name_for_extra
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = filename
        self.short_title = self.name_for_extra


# modules/sd_models.py: select_checkpoint()
def select_checkpoint():
    return selected_checkpoint


# modules/sd_models.py: get_closet_checkpoint_match(search_string)
def get_closet_checkpoint_match(search_string):
    model = loaded_models.get(search_string)
    return None if model is None else model.sd_checkpoint_info


# modules/sd_models.py: reload_model_weights(sd_model=None, info=None, forced_reload=False)
def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    if checkpoint_info is None:
        return shared.sd_model
    if (
        shared.sd_model is not None
        and shared.sd_model.sd_checkpoint_info == checkpoint_info
        and not forced_reload
    ):
        return shared.sd_model
    shared.sd_model = loaded_models[checkpoint_info.title]
    return shared.sd_model
