"""Mirror of modules/script_callbacks.py (A1111 v1.10.1): the callbacks K-LoRA registers and the params
object of on_cfg_denoiser. Ordering by extension metadata is left out: callbacks run in registration order."""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

from modules import errors


# modules/script_callbacks.py: report_exception(c, job)
def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


# modules/script_callbacks.py: class CFGDenoiserParams
class CFGDenoiserParams:
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


# modules/script_callbacks.py: class ScriptCallback
@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


# modules/script_callbacks.py: add_callback(callbacks, fun, *, name=None, category='unknown', filename=None)
def add_callback(callbacks, fun, *, name=None, category="unknown", filename=None):
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else "unknown file"
    callback_name = f"base/{os.path.basename(filename)}/{category}"
    if name is not None:
        callback_name += f"/{name}"
    callbacks.append(ScriptCallback(filename, fun, callback_name))


callback_map = dict(
    callbacks_model_loaded=[],
    callbacks_ui_settings=[],
    callbacks_cfg_denoiser=[],
    callbacks_infotext_pasted=[],
    callbacks_script_unloaded=[],
    callbacks_before_ui=[],
    callbacks_app_started=[],
)


# modules/script_callbacks.py: ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True)
def ordered_callbacks(category, unordered_callbacks=None, *, enable_user_sort=True):
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get("callbacks_" + category, [])
    return list(unordered_callbacks)


# modules/script_callbacks.py: clear_callbacks()
def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


# modules/script_callbacks.py: model_loaded_callback(sd_model)
def model_loaded_callback(sd_model):
    for c in ordered_callbacks("model_loaded"):
        try:
            c.callback(sd_model)
        except Exception:
            report_exception(c, "model_loaded_callback")


# modules/script_callbacks.py: ui_settings_callback()
def ui_settings_callback():
    for c in ordered_callbacks("ui_settings"):
        try:
            c.callback()
        except Exception:
            report_exception(c, "ui_settings_callback")


# modules/script_callbacks.py: cfg_denoiser_callback(params)
def cfg_denoiser_callback(params: CFGDenoiserParams):
    for c in ordered_callbacks("cfg_denoiser"):
        try:
            c.callback(params)
        except Exception:
            report_exception(c, "cfg_denoiser_callback")


# modules/script_callbacks.py: infotext_pasted_callback(infotext, params)
def infotext_pasted_callback(infotext: str, params: dict[str, Any]):
    for c in ordered_callbacks("infotext_pasted"):
        try:
            c.callback(infotext, params)
        except Exception:
            report_exception(c, "infotext_pasted")


# modules/script_callbacks.py: script_unloaded_callback()
def script_unloaded_callback():
    for c in reversed(ordered_callbacks("script_unloaded")):
        try:
            c.callback()
        except Exception:
            report_exception(c, "script_unloaded")


# modules/script_callbacks.py: before_ui_callback()
def before_ui_callback():
    for c in reversed(ordered_callbacks("before_ui")):
        try:
            c.callback()
        except Exception:
            report_exception(c, "before_ui")


# modules/script_callbacks.py: app_started_callback(demo: Optional[Blocks], app: FastAPI)
# (webui.py calls it with the UI's Blocks, api_only() with demo None)
def app_started_callback(demo, app):
    for c in ordered_callbacks("app_started"):
        try:
            c.callback(demo, app)
        except Exception:
            report_exception(c, "app_started_callback")


# modules/script_callbacks.py: remove_callbacks_for_function(callback_func)
def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)


# modules/script_callbacks.py: on_model_loaded(callback, *, name=None)
def on_model_loaded(callback, *, name=None):
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


# modules/script_callbacks.py: on_ui_settings(callback, *, name=None)
def on_ui_settings(callback, *, name=None):
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


# modules/script_callbacks.py: on_cfg_denoiser(callback, *, name=None)
def on_cfg_denoiser(callback, *, name=None):
    add_callback(callback_map["callbacks_cfg_denoiser"], callback, name=name, category="cfg_denoiser")


# modules/script_callbacks.py: on_infotext_pasted(callback, *, name=None)
def on_infotext_pasted(callback, *, name=None):
    add_callback(callback_map["callbacks_infotext_pasted"], callback, name=name, category="infotext_pasted")


# modules/script_callbacks.py: on_script_unloaded(callback, *, name=None)
def on_script_unloaded(callback, *, name=None):
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


# modules/script_callbacks.py: on_before_ui(callback, *, name=None)
def on_before_ui(callback, *, name=None):
    add_callback(callback_map["callbacks_before_ui"], callback, name=name, category="before_ui")


# modules/script_callbacks.py: on_app_started(callback, *, name=None)
def on_app_started(callback, *, name=None):
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")
