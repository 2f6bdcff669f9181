"""The embedded offline default: a small class-conditional model on scikit-learn's digits
(1,797 8x8 images upsampled to 16x16), trained in minutes on a CPU. `make demo` runs it."""
import ml_collections

from jax_diffusion.config_files import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.data.dataset = "digits"
    config.data.image_size = 16
    config.data.channels = 1
    config.data.random_flip = False  # a flipped digit is another shape

    config.model.ch = 32
    config.model.ch_mult = (1, 2, 2)
    config.model.num_res_blocks = 1
    config.model.attention_resolutions = (8,)
    config.model.dropout = 0.1
    config.model.num_classes = 10

    config.diffusion.schedule = "cosine"
    config.diffusion.num_timesteps = 1000
    # v-prediction and Min-SNR-5: with eps-prediction this model's x0 at high noise was worse
    # than the class mean, and its deterministic samples lost ~0.09 accuracy
    # (docs/notes/deterministic_sampling.md).
    config.diffusion.mean_type = "v"
    config.diffusion.loss_weighting = "min_snr"

    # 3,000 steps (twice the 1,500 of the first demo): the recipe comparison
    # (docs/recipes.md) measured +0.01 accuracy for DDIM-50 eta 1 and +0.02 for the deterministic
    # samplers from the doubling, while EDM's and the flow's recipes did no better per image.
    config.train.num_steps = 3000
    config.train.batch_size = 64
    config.train.lr = 1e-3
    config.train.warmup_steps = 200
    config.train.lr_schedule = "cosine"
    config.train.ema_decay = 0.995
    config.train.label_dropout = 0.1
    config.train.log_every = 250
    config.train.checkpoint_every = 500
    config.train.sample_every = 750

    config.sample.method = "ddim"
    config.sample.num_steps = 50
    # eta = 1 (stochastic DDIM): on this 3,000-step model it scores 0.984 classifier accuracy
    # against 0.944 for eta = 0 (docs/recipes.md), so the stochastic sampler stays the default.
    config.sample.eta = 1.0
    config.sample.num_samples = 1000
    config.sample.batch_size = 500
    config.sample.grid_size = 100

    config.eval.metrics = "digits"
    config.eval.num_samples = 1000
    config.eval.nll_examples = 256

    # Distillation of this model (make demo-distill, README "Few-step students"): progressive
    # distillation of its 16-step DDIM sampler, 16 -> 8 -> 4 steps, every stage kept, with
    # guidance w = 1.1 distilled in (unguided, the 4-step student keeps the deterministic
    # sampler's accuracy gap, docs/notes/deterministic_sampling.md).
    config.distill.teacher_steps = 16
    config.distill.num_halvings = 2
    config.distill.steps_per_stage = 150
    config.distill.lr = 3e-4
    config.distill.ema_decay = 0.99
    config.distill.guidance_scale = 1.1
    return config
