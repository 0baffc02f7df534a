"""Mirror of modules/shared.py (the loaded engine, options, job state) with modules/options.py's OptionInfo
reduced to what add_option needs."""

from __future__ import annotations

from types import SimpleNamespace


# modules/options.py: class OptionInfo (the chained .info()/.needs_reload_ui() calls)
class OptionInfo:
    def __init__(
        self,
        default=None,
        label="",
        component=None,
        component_args=None,
        onchange=None,
        section=None,
        **kwargs,
    ):
        self.default = default
        self.label = label
        self.onchange = onchange
        self.section = section

    def info(self, info):
        return self

    def needs_reload_ui(self):
        return self


# modules/options.py: class Options (attribute access, add_option)
class _Options(SimpleNamespace):
    def add_option(self, key, info):
        if not hasattr(self, key):
            setattr(self, key, info.default)


sd_model = None
opts = _Options(img2img_fix_steps=False, hires_fix_use_firstpass_conds=False)
state = SimpleNamespace(interrupted=False, skipped=False, sampling_step=0, sampling_steps=0)
