"""Mirror of modules/sd_models.py (A1111 v1.10.1): the checkpoint record, the checkpoint the settings select,
and reload_model_weights, which replaces shared.sd_model (a new model object for another checkpoint, e.g. the
refiner)."""

from __future__ import annotations

from modules import shared

checkpoints_list = {}
checkpoint_aliases = {}

loaded_models: dict = {}
"""Test-only: checkpoint title → model object, standing in for loading a checkpoint from disk."""


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
        self.ids = [self.title, self.name, self.name_for_extra, self.model_name]

    # modules/sd_models.py: CheckpointInfo.register() (what list_models does for every checkpoint file)
    def register(self):
        checkpoints_list[self.title] = self
        for id in self.ids:
            checkpoint_aliases[id] = self


# modules/sd_models.py: select_checkpoint() — the checkpoint opts.sd_model_checkpoint names, else the first
def select_checkpoint():
    model_checkpoint = shared.opts.sd_model_checkpoint
    checkpoint_info = checkpoint_aliases.get(model_checkpoint)
    if checkpoint_info is not None:
        return checkpoint_info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError("No checkpoints found.")
    return next(iter(checkpoints_list.values()))


# modules/sd_models.py: get_closet_checkpoint_match(search_string) — an alias, else the shortest title
# containing the string
def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    checkpoint_info = checkpoint_aliases.get(search_string)
    if checkpoint_info is not None:
        return checkpoint_info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title],
                   key=lambda x: len(x.title))
    return found[0] if found else None


# modules/sd_models.py: reload_model_weights(sd_model=None, info=None, forced_reload=False)
def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    if (
        shared.sd_model is not None
        and shared.sd_model.sd_checkpoint_info == checkpoint_info
        and not forced_reload
    ):
        return shared.sd_model
    shared.sd_model = loaded_models[checkpoint_info.title]
    return shared.sd_model
