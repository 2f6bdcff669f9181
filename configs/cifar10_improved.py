"""Improved DDPM (Nichol & Dhariwal 2021) on CIFAR-10: class-conditional 52.6M U-Net with AdaGN and
learned sigma, cosine schedule with T=4000, L_hybrid; DDIM sampling."""
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
    model.num_res_blocks = 3
    model.attention_resolutions = (16, 8)
    model.num_heads = 4
    model.num_head_channels = -1
    model.dropout = 0.3
    model.conv_resample = True
    model.resblock_updown = False        # the paper's CIFAR-10 run resamples
                                         # with separate conv layers
    model.use_scale_shift_norm = True
    model.learn_sigma = True
    model.num_classes = 10               # 11 embedding rows: the last is the null label
    model.time_embedding_freq_shift = 0
    model.time_embedding_flip_sin_to_cos = True
    model.norm_eps = 1e-5
    model.downsample_padding = "symmetric"

    diffusion = config.diffusion
    diffusion.schedule = "cosine"
    diffusion.num_timesteps = 4000
    diffusion.mean_type = "eps"
    diffusion.var_type = "learned_range"
    diffusion.loss_type = "hybrid"
    diffusion.rescale_timesteps = True   # improved-diffusion's recipe: the network sees t / 4

    train = config.train
    train.batch_size = 128
    train.lr = 1e-4
    train.warmup_steps = 0               # improved-diffusion uses a constant learning rate
    train.grad_clip = 1.0
    train.ema_decay = 0.9999
    train.num_steps = 500_000
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
