"""Mirror of modules/processing_scripts/refiner.py (Forge Neo 2.26): ``ScriptRefiner`` as far as the fast
switch needs it: ``postprocess`` loads the base checkpoint's weights back into the model after a
``refiner_fast_sd`` switch and clears ``ORIGINAL_CHECKPOINT``. The UI and ``setup`` (which copies the refiner
choice onto ``p``) are left out: tests set ``p.refiner_checkpoint_info`` and ``p.refiner_switch_at``."""

from __future__ import annotations

from modules import sd_models, sd_samplers_common, shared


class ScriptRefiner:
    # modules/processing_scripts/refiner.py: ScriptRefiner.postprocess(p, processed, *args)
    def postprocess(self, p, processed, *args):
        if sd_samplers_common.ORIGINAL_CHECKPOINT is None:
            return
        sd_model = shared.sd_model
        base = sd_models.loaded_models[sd_model.sd_checkpoint_info.title]  # the file's weights, as registered
        sd_model.forge_objects.unet.model.diffusion_model.load_state_dict(base.base_state_dict)
        sd_samplers_common.ORIGINAL_CHECKPOINT = None

    def __getattr__(self, name):  # the other script hooks: nothing to do here
        return lambda *args, **kwargs: None
