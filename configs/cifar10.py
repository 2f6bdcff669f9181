"""DDPM (Ho et al. 2020) on CIFAR-10: the 35.7M-parameter U-Net, linear schedule, L_simple; DDIM
sampling.

The network is Ho et al.'s, conventions included, so google/ddpm-cifar10-32's weights import into it
(--mode=import)."""
import ml_collections

from jax_diffusion.config_files import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()

    data = config.data
    data.dataset = "cifar10"
    data.image_size = 32
    data.channels = 3
    data.random_flip = True

    model = config.model
    model.ch = 128
    model.ch_mult = (1, 2, 2, 2)
    model.num_res_blocks = 2
    model.attention_resolutions = (16,)
    model.num_heads = 1
    model.num_head_channels = -1
    model.dropout = 0.1
    model.conv_resample = True
    model.resblock_updown = False
    model.use_scale_shift_norm = False
    model.learn_sigma = False
    model.num_classes = 0
    model.time_embedding_freq_shift = 1
    model.time_embedding_flip_sin_to_cos = False
    model.norm_eps = 1e-6
    model.downsample_padding = "tf_same"

    diffusion = config.diffusion
    diffusion.schedule = "linear"
    diffusion.num_timesteps = 1000
    diffusion.mean_type = "eps"
    diffusion.var_type = "fixed_large"
    diffusion.loss_type = "mse"

    train = config.train
    train.batch_size = 128
    train.lr = 2e-4
    train.warmup_steps = 5000
    train.grad_clip = 1.0
    train.ema_decay = 0.9999
    train.num_steps = 800_000
    train.checkpoint_every = 10_000
    train.log_every = 100
    train.sample_every = 10_000

    sample = config.sample
    sample.method = "ddim"
    sample.num_steps = 50
    sample.eta = 0.0
    sample.num_samples = 50_000
    sample.batch_size = 500
    return config
