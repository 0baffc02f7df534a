"""Mirror of modules/scripts.py (A1111 v1.10.1): the Script base class and the ScriptRunner dispatch of
always-on hooks (each call wrapped in try/except + errors.report, as the webui does)."""

from __future__ import annotations

import re

from modules import errors

# modules/scripts.py: AlwaysVisible
AlwaysVisible = object()


# modules/scripts.py: class PostprocessBatchListArgs
class PostprocessBatchListArgs:
    def __init__(self, images):
        self.images = images


# modules/scripts.py: class PostSampleArgs
class PostSampleArgs:
    def __init__(self, samples):
        self.samples = samples


# modules/scripts.py: class Script (hooks are no-ops unless overridden)
class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    tabname = None
    group = None
    create_group = True
    infotext_fields = None
    paste_field_names = None
    api_info = None
    setup_for_ui_only = False
    controls = None

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img):
        pass

    def show(self, is_img2img):
        return True

    def run(self, p, *args):
        pass

    def setup(self, p, *args):
        pass

    def before_process(self, p, *args):
        pass

    def process(self, p, *args):
        pass

    def before_process_batch(self, p, *args, **kwargs):
        pass

    def after_extra_networks_activate(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess_batch_list(self, p, pp: PostprocessBatchListArgs, *args, **kwargs):
        pass

    def post_sample(self, p, ps: PostSampleArgs, *args):
        pass

    def postprocess(self, p, processed, *args):
        pass

    def before_hr(self, p, *args):
        pass

    # modules/scripts.py: Script.elem_id(item_id)
    def elem_id(self, item_id):
        need_tabname = self.show(True) == self.show(False)
        tabkind = "img2img" if self.is_img2img else "txt2img"
        tabname = f"{tabkind}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


# modules/scripts.py: scripts_data (ScriptClassData entries; read by extensions that find xyz_grid)
scripts_data = []


# modules/scripts.py: class ScriptRunner — only the always-on dispatch; every call sits in try/except
class ScriptRunner:
    def __init__(self):
        self.scripts = []
        self.selectable_scripts = []
        self.alwayson_scripts = []

    def _each(self, method_name):
        for script in self.alwayson_scripts:
            if getattr(script.__class__, method_name, None) == getattr(Script, method_name, None):
                continue
            yield script

    # modules/scripts.py: ScriptRunner.before_process(p)
    def before_process(self, p):
        for script in self._each("before_process"):
            try:
                script.before_process(p, *p.script_args[script.args_from : script.args_to])
            except Exception:
                errors.report(f"Error running before_process: {script.filename}", exc_info=True)

    # modules/scripts.py: ScriptRunner.process(p)
    def process(self, p):
        for script in self._each("process"):
            try:
                script.process(p, *p.script_args[script.args_from : script.args_to])
            except Exception:
                errors.report(f"Error running process: {script.filename}", exc_info=True)

    # modules/scripts.py: ScriptRunner.process_before_every_sampling(p, **kwargs)
    def process_before_every_sampling(self, p, **kwargs):
        for script in self._each("process_before_every_sampling"):
            try:
                script.process_before_every_sampling(
                    p, *p.script_args[script.args_from : script.args_to], **kwargs
                )
            except Exception:
                errors.report(
                    f"Error running process_before_every_sampling: {script.filename}", exc_info=True
                )

    # modules/scripts.py: ScriptRunner.before_process_batch(p, **kwargs)
    def before_process_batch(self, p, **kwargs):
        for script in self._each("before_process_batch"):
            try:
                script.before_process_batch(p, *p.script_args[script.args_from : script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running before_process_batch: {script.filename}", exc_info=True)

    # modules/scripts.py: ScriptRunner.after_extra_networks_activate(p, **kwargs)
    def after_extra_networks_activate(self, p, **kwargs):
        for script in self._each("after_extra_networks_activate"):
            try:
                script.after_extra_networks_activate(
                    p, *p.script_args[script.args_from : script.args_to], **kwargs
                )
            except Exception:
                errors.report(
                    f"Error running after_extra_networks_activate: {script.filename}", exc_info=True
                )

    # modules/scripts.py: ScriptRunner.process_batch(p, **kwargs)
    def process_batch(self, p, **kwargs):
        for script in self._each("process_batch"):
            try:
                script.process_batch(p, *p.script_args[script.args_from : script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running process_batch: {script.filename}", exc_info=True)

    # modules/scripts.py: ScriptRunner.postprocess(p, processed)
    def postprocess(self, p, processed):
        for script in self._each("postprocess"):
            try:
                script.postprocess(p, processed, *p.script_args[script.args_from : script.args_to])
            except Exception:
                errors.report(f"Error running postprocess: {script.filename}", exc_info=True)

    # modules/scripts.py: ScriptRunner.postprocess_batch(p, images, **kwargs)
    def postprocess_batch(self, p, images, **kwargs):
        for script in self._each("postprocess_batch"):
            try:
                script.postprocess_batch(
                    p, *p.script_args[script.args_from : script.args_to], images=images, **kwargs
                )
            except Exception:
                errors.report(f"Error running postprocess_batch: {script.filename}", exc_info=True)

    # modules/scripts.py: ScriptRunner.post_sample(p, ps)
    def post_sample(self, p, ps: PostSampleArgs):
        for script in self._each("post_sample"):
            try:
                script.post_sample(p, ps, *p.script_args[script.args_from : script.args_to])
            except Exception:
                errors.report(f"Error running post_sample: {script.filename}", exc_info=True)

    # modules/scripts.py: ScriptRunner.before_hr(p)
    def before_hr(self, p):
        for script in self._each("before_hr"):
            try:
                script.before_hr(p, *p.script_args[script.args_from : script.args_to])
            except Exception:
                errors.report(f"Error running before_hr: {script.filename}", exc_info=True)

    # Test-only: what ScriptRunner.initialize_scripts + setup_ui do for an always-on script (args slice)
    def add_alwayson(self, script, n_args: int):
        script.alwayson = True
        script.args_from = sum(s.args_to - s.args_from for s in self.alwayson_scripts)
        script.args_to = script.args_from + n_args
        self.alwayson_scripts.append(script)
        self.scripts.append(script)
