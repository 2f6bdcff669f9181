"""EDM's CIFAR-10 training recipe (Karras et al. 2022, their config F) on our 35.7M-parameter DDPM
U-Net: the continuous process x0 + s eps with EDM's preconditioning, ln s ~ N(-1.2, 1.2^2), EDM's
loss weight, batch 512, Adam at lr 1e-3 ramped up over the first 10 Mimg, dropout 0.13, an EMA
with a 0.5 Mimg half-life, 200 Mimg in all; sampled with their deterministic Heun at 35 NFE.

Not EDM's: their DDPM++ network (56M) and their non-leaking augmentation pipeline; the gradient
clipping of configs/cifar10.py is kept. docs/recipes.md projects its accelerator time."""
import ml_collections

from configs import cifar10

BATCH = 512
RAMPUP_IMAGES = 10_000_000
TRAINING_IMAGES = 200_000_000


def get_config() -> ml_collections.ConfigDict:
    config = cifar10.get_config()
    config.model.dropout = 0.13

    diffusion = config.diffusion
    diffusion.process = "edm"
    diffusion.loss_weighting = "edm"
    diffusion.sigma_data = 0.5
    diffusion.sigma_min = 0.002
    diffusion.sigma_max = 80.0

    train = config.train
    train.batch_size = BATCH
    train.lr = 1e-3
    train.warmup_steps = RAMPUP_IMAGES // BATCH          # 19,531 steps
    train.num_steps = TRAINING_IMAGES // BATCH           # 390,625 steps
    train.noise_sampling = "lognormal"
    train.lognormal_mean = -1.2
    train.lognormal_std = 1.2
    train.ema_halflife_kimg = 500.0
    train.ema_rampup_ratio = 0.05
    train.checkpoint_every = 5_000
    train.sample_every = 5_000

    config.sample.method = "edm_heun"
    config.sample.num_steps = 35
    config.sample.schedule = "auto"
    return config
