"""Mirror of modules/lowvram.py (A1111 v1.10.1): whether the loaded model runs in --lowvram/--medvram mode."""

from __future__ import annotations


# modules/lowvram.py: is_enabled(sd_model) — sd_models.load_model sets sd_model.lowvram
def is_enabled(sd_model):
    return sd_model.lowvram
