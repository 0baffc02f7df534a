"""Mirror of modules/script_callbacks.py: on_cfg_denoiser / on_script_unloaded and CFGDenoiserParams.
Callbacks run in registration order; an exception in one is reported and the others still run."""

from __future__ import annotations

import traceback


class CFGDenoiserParams:
    # modules/script_callbacks.py: CFGDenoiserParams(x, image_cond, sigma, sampling_step,
    # total_sampling_steps, text_cond, text_uncond, denoiser=None)
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


callback_map = {
    "callbacks_cfg_denoiser": [],
    "callbacks_script_unloaded": [],
    "callbacks_before_ui": [],
    "callbacks_ui_settings": [],
    "callbacks_app_started": [],
}


# modules/script_callbacks.py: cfg_denoiser_callback(params)
def cfg_denoiser_callback(params):
    for _name, fn in list(callback_map["callbacks_cfg_denoiser"]):
        try:
            fn(params)
        except Exception:
            traceback.print_exc()


# modules/script_callbacks.py: script_unloaded_callback()
def script_unloaded_callback():
    for _name, fn in reversed(callback_map["callbacks_script_unloaded"]):
        fn()


# modules/script_callbacks.py: on_cfg_denoiser(callback, *, name=None)
def on_cfg_denoiser(callback, *, name=None):
    callback_map["callbacks_cfg_denoiser"].append((name, callback))


# modules/script_callbacks.py: on_script_unloaded(callback, *, name=None)
def on_script_unloaded(callback, *, name=None):
    callback_map["callbacks_script_unloaded"].append((name, callback))


# modules/script_callbacks.py: on_before_ui(callback, *, name=None)
def on_before_ui(callback, *, name=None):
    callback_map["callbacks_before_ui"].append((name, callback))


# modules/script_callbacks.py: on_ui_settings(callback, *, name=None)
def on_ui_settings(callback, *, name=None):
    callback_map["callbacks_ui_settings"].append((name, callback))


# modules/script_callbacks.py: on_app_started(callback, *, name=None)
def on_app_started(callback, *, name=None):
    callback_map["callbacks_app_started"].append((name, callback))
