"""Mirror of modules/processing.py (Forge): the processing objects and the call order of process_images /
process_images_inner, Txt2Img.sample / sample_hr_pass and Img2Img.sample — forge_objects resets included,
the two process_before_every_sampling calls of the hires pass, postprocess skipped on an exception.
Conditioning goes through get_conds_with_caching with the class-level caches of the real one. The model
itself is a test callable: ``p.denoise(sd_model, x)`` and ``sd_model.encode(prompts)``."""

from __future__ import annotations

from modules import extra_networks, shared
from modules.sd_samplers_kdiffusion import KDiffusionSampler


class StableDiffusionProcessing:
    cached_uc = [None, None, None]  # noqa: RUF012 (Forge's class-level cache)
    cached_c = [None, None, None]  # noqa: RUF012 (Forge's class-level cache)

    def __init__(
        self,
        prompt="",
        steps=4,
        batch_size=1,
        n_iter=1,
        seed=1,
        sampler_name="Euler",
        scripts=None,
        denoise=None,
        denoising_strength=0.75,
    ):
        self.prompt = prompt
        self.steps = steps
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.seed = seed
        self.sampler_name = sampler_name
        self.scripts = scripts
        self.denoise = denoise
        self.denoising_strength = denoising_strength
        self.extra_generation_params = {}
        self.comments = {}
        self.is_hr_pass = False
        self.refiner_switch_at = None
        self.all_seeds = []
        self.iteration = 0
        self.prompts = []
        self.seeds = []
        self.subseeds = []
        self.disable_extra_networks = False
        self.extra_network_data = {}
        self.c = None
        # modules/processing.py: __post_init__ takes the class-level caches
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c
        self.sampler = None
        self.conds_computed = 0

    # modules/processing.py: StableDiffusionProcessing.sd_model (property → shared.sd_model)
    @property
    def sd_model(self):
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    # modules/processing.py: StableDiffusionProcessing.comment(text)
    def comment(self, text):
        self.comments[text] = 1

    # modules/processing.py: get_conds_with_caching(function, required_prompts, steps, caches,
    # extra_network_data)
    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data=None):
        cached_params = (tuple(required_prompts), steps, id(shared.sd_model))
        for cache in caches:
            if cache[0] is not None and cached_params == cache[0]:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps)
        cache[0] = cached_params
        self.conds_computed += 1
        return cache[1]

    # modules/processing.py: parse_extra_network_prompts() — the tags of the first prompt, stripped
    def parse_extra_network_prompts(self):
        self.prompts, data = [], {}
        for prompt in [self.prompt]:
            text, found = extra_networks.parse_prompt(prompt)
            self.prompts.append(text)
            if not data:
                data = dict(found)
        self.extra_network_data = data

    # modules/processing.py: setup_conds()
    def setup_conds(self):
        self.c = self.get_conds_with_caching(
            lambda m, prompts, s: m.encode(prompts), self.prompts, self.steps, [self.cached_c]
        )


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None, None]  # noqa: RUF012 (Forge's class-level cache)
    cached_hr_c = [None, None, None]  # noqa: RUF012 (Forge's class-level cache)

    def __init__(self, enable_hr=False, hr_second_pass_steps=0, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr = enable_hr
        self.hr_second_pass_steps = hr_second_pass_steps
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    # modules/processing.py: StableDiffusionProcessingTxt2Img.calculate_hr_conds()
    def calculate_hr_conds(self):
        self.hr_c = self.get_conds_with_caching(
            lambda m, prompts, s: m.encode(prompts),
            self.prompts,
            self.steps,
            [self.cached_hr_c, self.cached_c],
        )

    # modules/processing.py: StableDiffusionProcessingTxt2Img.sample(...)
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = KDiffusionSampler(self.sampler_name, self.sd_model)
        x = "latent"
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=None)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples)

    # modules/processing.py: StableDiffusionProcessingTxt2Img.sample_hr_pass(...)
    def sample_hr_pass(self, samples):
        self.is_hr_pass = True
        self.sampler = KDiffusionSampler(self.sampler_name, self.sd_model)
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.extra_network_data)
        self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(self, x=samples, noise=None, c=self.hr_c, uc=None)
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=None, c=self.hr_c, uc=None)
        samples = self.sampler.sample_img2img(
            self, samples, None, self.hr_c, None, steps=self.hr_second_pass_steps or self.steps
        )
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_images=None, **kwargs):
        super().__init__(**kwargs)
        self.init_images = init_images or ["image"]

    # modules/processing.py: StableDiffusionProcessingImg2Img.init(...) creates the sampler
    def init(self):
        self.sampler = KDiffusionSampler(self.sampler_name, self.sd_model)

    # modules/processing.py: StableDiffusionProcessingImg2Img.sample(...)
    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x="init", noise=None, c=conditioning, uc=None)
        return self.sampler.sample_img2img(self, "init", None, conditioning, unconditional_conditioning)


# modules/processing.py: process_images(p) — before_process outside the try, no script call in the finally
def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    return process_images_inner(p)


# modules/processing.py: process_images_inner(p)
def process_images_inner(p):
    p.all_seeds = [p.seed + i for i in range(p.n_iter * p.batch_size)]
    if p.scripts is not None:
        p.scripts.process(p)
    if isinstance(p, StableDiffusionProcessingImg2Img):
        p.init()
    outputs = []
    for n in range(p.n_iter):
        p.iteration = n
        if shared.state.interrupted:
            break
        if getattr(p, "reload_engine", None) is not None and n > 0:  # sd_models.forge_model_reload()
            shared.sd_model = p.reload_engine
        p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
        p.seeds = p.all_seeds[n * p.batch_size : (n + 1) * p.batch_size]
        p.subseeds = p.seeds
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n)
        p.parse_extra_network_prompts()
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=n)
        p.setup_conds()
        outputs.append(
            p.sample(
                conditioning=p.c,
                unconditional_conditioning=None,
                seeds=None,
                subseeds=None,
                subseed_strength=0,
                prompts=None,
            )
        )
        if p.scripts is not None:
            p.scripts.postprocess_batch(p, outputs[-1], batch_number=n)
    if p.scripts is not None:
        p.scripts.postprocess(p, outputs)
    return outputs
