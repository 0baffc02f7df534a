"""Mirror of modules/prompt_parser.py (A1111 v1.10.1): the two conditioning entry points setup_conds calls.
Prompt schedules are left out: each prompt gets one conditioning for the whole run."""

from __future__ import annotations


# modules/prompt_parser.py: class SdConditioning(list)
class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        self.is_negative_prompt = is_negative_prompt
        self.width = width
        self.height = height


# modules/prompt_parser.py: get_learned_conditioning(model, prompts, steps, hires_steps=None,
# use_old_scheduling=False)
def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    return model.get_learned_conditioning(list(prompts))


# modules/prompt_parser.py: get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None,
# use_old_scheduling=False)
def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    return model.get_learned_conditioning(list(prompts))
