"""Mirror of modules/sd_samplers.py (A1111 v1.10.1): all_samplers, find_sampler_config and create_sampler."""

from __future__ import annotations

from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

# modules/sd_samplers.py: all_samplers (k-diffusion, then the timestep samplers)
all_samplers = [*sd_samplers_kdiffusion.all_samplers, *sd_samplers_timesteps.samplers_data_timesteps]
all_samplers_map = {x.name: x for x in all_samplers}


# modules/sd_samplers.py: find_sampler_config(name)
def find_sampler_config(name):
    config = all_samplers_map.get(name) if name is not None else all_samplers[0]
    return config


# modules/sd_samplers.py: create_sampler(name, model)
def create_sampler(name, model):
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
