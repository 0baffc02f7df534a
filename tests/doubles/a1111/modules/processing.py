"""Mirror of modules/processing.py (A1111 v1.10.1): the processing objects and process_images with the order
of script hooks, extra-network activation, conditioning (with its cache), sampling, the hires pass, infotext
and postprocess — and the same exception behaviour: nothing catches an error, so postprocess does not run
after one. Image decoding, saving, face restoration and masks are left out (latents stand in for images)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from modules import (
    extra_networks,
    infotext_utils,
    lowvram,
    prompt_parser,
    scripts,
    sd_models,
    sd_samplers,
    shared,
)
from modules.shared import opts, state

# The host switch of this double: False for A1111. The Forge overlay
# (tests/doubles/forge/modules/processing.py) runs this file in its own module and sets it True. Every
# ``if FORGE`` below is a place where Forge's modules/processing.py (dfdcbab6) differs from A1111's in what
# the glue depends on: forge_objects reset before every batch and every sampling pass, the model reloaded
# through sd_models.forge_model_reload, no negative conditioning at CFG 1, the hires conds made during the
# first pass.
FORGE = False


# modules/processing.py: class StableDiffusionProcessing
@dataclass(repr=False)
class StableDiffusionProcessing:
    outpath_samples: str = None
    prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    negative_prompt: str = ""
    extra_generation_params: dict[str, Any] = None
    denoising_strength: float = None
    override_settings: dict[str, Any] = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    disable_extra_networks: bool = False

    scripts_value: scripts.ScriptRunner = field(default=None, init=False)
    script_args_value: list = field(default=None, init=False)

    # class-level lists shared by every instance: the webui's cross-generation conditioning cache
    cached_uc = [None, None]  # noqa: RUF012
    cached_c = [None, None]  # noqa: RUF012

    comments: dict = None
    sampler: Any = field(default=None, init=False)
    is_hr_pass: bool = field(default=False, init=False)
    c: tuple = field(default=None, init=False)
    uc: tuple = field(default=None, init=False)
    step_multiplier: int = field(default=1, init=False)
    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    all_seeds: list = field(default=None, init=False)
    all_subseeds: list = field(default=None, init=False)
    iteration: int = field(default=0, init=False)
    main_prompt: str = field(default=None, init=False)
    prompts: list = field(default=None, init=False)
    negative_prompts: list = field(default=None, init=False)
    seeds: list = field(default=None, init=False)
    subseeds: list = field(default=None, init=False)
    extra_network_data: dict = field(default=None, init=False)
    is_api: bool = field(default=False, init=False)

    def __post_init__(self):
        self.comments = {}
        if self.styles is None:
            self.styles = []
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.refiner_checkpoint_info = None
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    # modules/processing.py: StableDiffusionProcessing.sd_model (property; the setter ignores the value)
    @property
    def sd_model(self):
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    @property
    def scripts(self):
        return self.scripts_value

    @scripts.setter
    def scripts(self, value):
        self.scripts_value = value

    @property
    def script_args(self):
        return self.script_args_value

    @script_args.setter
    def script_args(self, value):
        self.script_args_value = value

    # modules/processing.py: StableDiffusionProcessing.comment(text)
    def comment(self, text):
        self.comments[text] = 1

    # modules/processing.py: StableDiffusionProcessing.txt2img_image_conditioning(x, width=None, height=None)
    def txt2img_image_conditioning(self, x, width=None, height=None):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        raise NotImplementedError()

    # modules/processing.py: StableDiffusionProcessing.close()
    def close(self):
        self.sampler = None
        self.c = None
        self.uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    # modules/processing.py: StableDiffusionProcessing.setup_prompts()
    def setup_prompts(self):
        self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        self.main_prompt = self.all_prompts[0]
        self.main_negative_prompt = self.all_negative_prompts[0]

    # modules/processing.py: StableDiffusionProcessing.cached_params(...)
    def cached_params(
        self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False
    ):
        return (
            required_prompts,
            steps,
            hires_steps,
            use_old_scheduling,
            shared.sd_model.sd_checkpoint_info,
            extra_network_data,
            self.width,
            self.height,
        )

    # modules/processing.py: StableDiffusionProcessing.get_conds_with_caching(function, required_prompts,
    # steps, caches, extra_network_data, hires_steps=None)
    def get_conds_with_caching(
        self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None
    ):
        cached_params = self.cached_params(required_prompts, steps, extra_network_data, hires_steps, False)
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                if FORGE and len(cache) > 2:  # Forge: a third slot keeps the prompt's extra generation params
                    shared.sd_model.extra_generation_params.update(cache[2])
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, False)
        if FORGE and len(cache) > 2:  # backend.text_processing.classic_engine.last_extra_generation_params
            cache[2] = {}
        cache[0] = cached_params
        return cache[1]

    # modules/processing.py: StableDiffusionProcessing.setup_conds()
    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = prompt_parser.SdConditioning(
            self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True
        )
        sampler_config = sd_samplers.find_sampler_config(self.sampler_name)
        total_steps = sampler_config.total_steps(self.steps) if sampler_config else self.steps
        self.step_multiplier = total_steps // self.steps
        self.firstpass_steps = total_steps
        if FORGE and self.cfg_scale == 1:  # Forge: "Skipping unconditional conditioning when CFG = 1"
            self.uc = None
        else:
            self.uc = self.get_conds_with_caching(
                prompt_parser.get_learned_conditioning,
                negative_prompts,
                total_steps,
                [self.cached_uc],
                self.extra_network_data,
            )
        self.c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            prompts,
            total_steps,
            [self.cached_c],
            self.extra_network_data,
        )

    # modules/processing.py: StableDiffusionProcessing.get_conds()
    def get_conds(self):
        return self.c, self.uc

    # modules/processing.py: StableDiffusionProcessing.parse_extra_network_prompts()
    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def rng_next(self):
        # stands in for rng.ImageRNG.next(): seeded noise of the latent shape
        g = torch.Generator().manual_seed(int(self.seeds[0]))
        return torch.randn((len(self.seeds), 4, self.height // 8, self.width // 8), generator=g)


# modules/processing.py: class Processed
class Processed:
    def __init__(
        self,
        p: StableDiffusionProcessing,
        images_list,
        seed=-1,
        info="",
        subseed=None,
        all_prompts=None,
        all_negative_prompts=None,
        all_seeds=None,
        all_subseeds=None,
        index_of_first_image=0,
        infotexts=None,
        comments="",
    ):
        self.images = images_list
        self.prompt = p.prompt
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.info = info
        self.comments = "".join(f"{comment}\n" for comment in p.comments)
        self.extra_generation_params = p.extra_generation_params
        self.index_of_first_image = index_of_first_image
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.infotexts = infotexts or [info] * len(images_list)


# modules/processing.py: create_infotext(p, all_prompts, all_seeds, all_subseeds, comments=None, iteration=0,
# position_in_batch=0, use_main_prompt=False, index=None, all_negative_prompts=None)
def create_infotext(
    p,
    all_prompts,
    all_seeds,
    all_subseeds,
    comments=None,
    iteration=0,
    position_in_batch=0,
    use_main_prompt=False,
    index=None,
    all_negative_prompts=None,
):
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "CFG scale": p.cfg_scale,
        "Seed": all_seeds[index],
        "Size": f"{p.width}x{p.height}",
    }
    generation_params.update(p.extra_generation_params)
    for key, value in generation_params.items():
        try:
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(**locals())
        except Exception:
            generation_params[key] = None
    text = ", ".join(
        [
            k if k == v else f"{k}: {infotext_utils.quote(v)}"
            for k, v in generation_params.items()
            if v is not None
        ]
    )
    negative = p.all_negative_prompts[index] if p.all_negative_prompts else ""
    return f"{all_prompts[index]}\nNegative prompt: {negative}\n{text}".strip()


# modules/processing.py: process_images(p)
def process_images(p: StableDiffusionProcessing) -> Processed:
    if p.scripts is not None:
        p.scripts.before_process(p)
    try:
        sd_models.reload_model_weights()
        res = process_images_inner(p)
    finally:
        # the real one restores overridden settings here; an exception still propagates to the caller
        shared.state.job = shared.state.job
    return res


# modules/processing.py: process_images_inner(p)
def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    if p.refiner_checkpoint not in (None, "", "None", "none"):
        p.refiner_checkpoint_info = sd_models.get_closet_checkpoint_match(p.refiner_checkpoint)
        if p.refiner_checkpoint_info is None:
            raise Exception(f'Could not find checkpoint with name {p.refiner_checkpoint}')

    seed = p.seed if p.seed != -1 else 1234
    p.setup_prompts()
    p.all_seeds = [int(seed) + x for x in range(len(p.all_prompts))]
    p.all_subseeds = [int(p.subseed) + x for x in range(len(p.all_prompts))]

    if p.scripts is not None:
        p.scripts.process(p)

    infotexts = []
    output_images = []
    with torch.no_grad():
        p.init(p.all_prompts, p.all_seeds, p.all_subseeds)

        for n in range(p.n_iter):
            p.iteration = n

            if state.skipped:
                state.skipped = False

            if state.interrupted or state.stopping_generation:
                break

            if FORGE:  # Forge: the loading parameters decide (a refiner switch set them back); objects reset
                sd_models.forge_model_reload()
                p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            else:
                sd_models.reload_model_weights()  # model can be changed for example by refiner

            p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size : (n + 1) * p.batch_size]
            p.subseeds = p.all_subseeds[n * p.batch_size : (n + 1) * p.batch_size]

            if p.scripts is not None:
                p.scripts.before_process_batch(
                    p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds
                )

            if len(p.prompts) == 0:
                break

            p.parse_extra_network_prompts()

            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)

            if FORGE:  # Forge: the batch samples from the objects the LoRAs were applied to
                p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()

            if p.scripts is not None:
                p.scripts.process_batch(
                    p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds
                )

            p.setup_conds()

            samples_ddim = p.sample(
                conditioning=p.c,
                unconditional_conditioning=p.uc,
                seeds=p.seeds,
                subseeds=p.subseeds,
                subseed_strength=p.subseed_strength,
                prompts=p.prompts,
            )

            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples_ddim)
                p.scripts.post_sample(p, ps)
                samples_ddim = ps.samples

            x_samples_ddim = samples_ddim  # decode_latent_batch stand-in

            state.nextjob()

            if p.scripts is not None:
                p.scripts.postprocess_batch(p, x_samples_ddim, batch_number=n)

            for i, x_sample in enumerate(x_samples_ddim):
                text = create_infotext(
                    p, p.prompts, p.seeds, p.subseeds, index=i, all_negative_prompts=p.negative_prompts
                )
                infotexts.append(text)
                output_images.append(x_sample)

    if not infotexts:
        infotexts.append(create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, use_main_prompt=True))

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)

    res = Processed(p, images_list=output_images, seed=p.all_seeds[0], info=infotexts[0], infotexts=infotexts)

    if p.scripts is not None:
        p.scripts.postprocess(p, res)

    return res


# modules/processing.py: class StableDiffusionProcessingTxt2Img
@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    hr_scale: float = 2.0
    hr_second_pass_steps: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""

    cached_hr_uc = [None, None]  # noqa: RUF012
    cached_hr_c = [None, None]  # noqa: RUF012

    hr_checkpoint_info: dict = field(default=None, init=False)
    hr_c: tuple | None = field(default=None, init=False)
    hr_uc: tuple | None = field(default=None, init=False)
    all_hr_prompts: list = field(default=None, init=False)
    all_hr_negative_prompts: list = field(default=None, init=False)
    hr_prompts: list = field(default=None, init=False)
    hr_negative_prompts: list = field(default=None, init=False)
    hr_extra_network_data: list = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    # modules/processing.py: StableDiffusionProcessingTxt2Img.init(all_prompts, all_seeds, all_subseeds)
    def init(self, all_prompts, all_seeds, all_subseeds):
        if self.enable_hr:
            self.extra_generation_params["Denoising strength"] = self.denoising_strength
            if self.hr_second_pass_steps:
                self.extra_generation_params["Hires steps"] = self.hr_second_pass_steps

    # modules/processing.py: StableDiffusionProcessingTxt2Img.sample(...)
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)

        x = self.rng_next()
        if FORGE:  # Forge: every sampling pass starts from the objects the LoRAs were applied to
            self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(
                p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning
            )

        samples = self.sampler.sample(
            self,
            x,
            conditioning,
            unconditional_conditioning,
            image_conditioning=self.txt2img_image_conditioning(x),
        )
        del x

        if not self.enable_hr:
            return samples

        if not FORGE:  # Forge goes to hr_checkpoint_name through main_entry (hires checkpoints: not modelled)
            sd_models.reload_model_weights(info=self.hr_checkpoint_info)

        return self.sample_hr_pass(samples, None, seeds, subseeds, subseed_strength, prompts)

    # modules/processing.py: StableDiffusionProcessingTxt2Img.sample_hr_pass(...)
    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        if shared.state.interrupted:
            return samples

        self.is_hr_pass = True
        img2img_sampler_name = self.hr_sampler_name or self.sampler_name
        self.sampler = sd_samplers.create_sampler(img2img_sampler_name, self.sd_model)
        image_conditioning = self.txt2img_image_conditioning(samples)

        shared.state.nextjob()
        noise = self.rng_next()

        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)

        self.calculate_hr_conds()

        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(
                p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc
            )

        if FORGE:  # Forge: the objects reset, then process_before_every_sampling a second time
            self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
            if self.scripts is not None:
                self.scripts.process_before_every_sampling(
                    self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc
                )

        samples = self.sampler.sample_img2img(
            self,
            samples,
            noise,
            self.hr_c,
            self.hr_uc,
            steps=self.hr_second_pass_steps or self.steps,
            image_conditioning=image_conditioning,
        )
        self.sampler = None
        self.is_hr_pass = False
        return samples

    # modules/processing.py: StableDiffusionProcessingTxt2Img.close()
    def close(self):
        super().close()
        self.hr_c = None
        self.hr_uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]

    # modules/processing.py: StableDiffusionProcessingTxt2Img.setup_prompts()
    def setup_prompts(self):
        super().setup_prompts()
        if not self.enable_hr:
            return
        if self.hr_prompt == "":
            self.hr_prompt = self.prompt
        if self.hr_negative_prompt == "":
            self.hr_negative_prompt = self.negative_prompt
        self.all_hr_prompts = self.batch_size * self.n_iter * [self.hr_prompt]
        self.all_hr_negative_prompts = self.batch_size * self.n_iter * [self.hr_negative_prompt]

    # modules/processing.py: StableDiffusionProcessingTxt2Img.calculate_hr_conds()
    def calculate_hr_conds(self):
        if self.hr_c is not None:
            return
        hr_prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.width, height=self.height)
        hr_negative_prompts = prompt_parser.SdConditioning(
            self.hr_negative_prompts, width=self.width, height=self.height, is_negative_prompt=True
        )
        sampler_config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        steps = self.hr_second_pass_steps or self.steps
        total_steps = sampler_config.total_steps(steps) if sampler_config else steps
        self.hr_uc = self.get_conds_with_caching(
            prompt_parser.get_learned_conditioning,
            hr_negative_prompts,
            self.firstpass_steps,
            [self.cached_hr_uc, self.cached_uc],
            self.hr_extra_network_data,
            total_steps,
        )
        self.hr_c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            hr_prompts,
            self.firstpass_steps,
            [self.cached_hr_c, self.cached_c],
            self.hr_extra_network_data,
            total_steps,
        )

    # modules/processing.py: StableDiffusionProcessingTxt2Img.setup_conds()
    def setup_conds(self):
        if self.is_hr_pass:
            self.hr_c = None
            self.calculate_hr_conds()
            return
        super().setup_conds()
        self.hr_uc = None
        self.hr_c = None

        if self.enable_hr and self.hr_checkpoint_info is None:
            if shared.opts.hires_fix_use_firstpass_conds:
                self.calculate_hr_conds()
            elif FORGE or (lowvram.is_enabled(shared.sd_model)
                           and shared.sd_model.sd_checkpoint_info == sd_models.select_checkpoint()):
                # A1111 in lowvram mode makes the hires conds now, before the text encoder is unloaded; Forge
                # always does (its branch is a plain ``else``)
                extra_networks.activate(self, self.hr_extra_network_data)
                self.calculate_hr_conds()
                extra_networks.activate(self, self.extra_network_data)

    # modules/processing.py: StableDiffusionProcessingTxt2Img.get_conds()
    def get_conds(self):
        if self.is_hr_pass:
            return self.hr_c, self.hr_uc
        return super().get_conds()

    # modules/processing.py: StableDiffusionProcessingTxt2Img.parse_extra_network_prompts()
    def parse_extra_network_prompts(self):
        res = super().parse_extra_network_prompts()
        if self.enable_hr:
            self.hr_prompts = self.all_hr_prompts[
                self.iteration * self.batch_size : (self.iteration + 1) * self.batch_size
            ]
            self.hr_negative_prompts = self.all_hr_negative_prompts[
                self.iteration * self.batch_size : (self.iteration + 1) * self.batch_size
            ]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)
        return res


# modules/processing.py: class StableDiffusionProcessingImg2Img (init_images are latents here)
@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_images: list = None
    denoising_strength: float = 0.75
    image_cfg_scale: float = None

    init_latent: torch.Tensor = field(default=None, init=False)
    image_conditioning: torch.Tensor = field(default=None, init=False)

    # modules/processing.py: StableDiffusionProcessingImg2Img.init(all_prompts, all_seeds, all_subseeds)
    def init(self, all_prompts, all_seeds, all_subseeds):
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        self.init_latent = torch.stack(list(self.init_images)[: self.batch_size])
        self.image_conditioning = self.init_latent.new_zeros(self.init_latent.shape[0], 5, 1, 1)

    # modules/processing.py: StableDiffusionProcessingImg2Img.sample(...)
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.rng_next()
        if FORGE:  # Forge: every sampling pass starts from the objects the LoRAs were applied to
            self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(
                p=self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning
            )
        samples = self.sampler.sample_img2img(
            self,
            self.init_latent,
            x,
            conditioning,
            unconditional_conditioning,
            image_conditioning=self.image_conditioning,
        )
        del x
        return samples
