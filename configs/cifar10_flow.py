"""Rectified flow on CIFAR-10 (Liu et al. 2022; Lipman et al. 2023) with logit-normal t
(Esser et al. 2024), on our 35.7M-parameter DDPM U-Net and with the training budget of
configs/cifar10_edm.py (batch 512, lr 1e-3 ramped over 10 Mimg, dropout 0.13, 0.5 Mimg EMA
half-life, 200 Mimg), so that the two recipes compare at equal cost. docs/recipes.md projects
its accelerator time."""
import ml_collections

from configs import cifar10_edm


def get_config() -> ml_collections.ConfigDict:
    config = cifar10_edm.get_config()
    config.diffusion.process = "flow"
    config.diffusion.loss_weighting = "none"
    config.train.noise_sampling = "logit_normal"
    config.train.logit_normal_mean = 0.0
    config.train.logit_normal_std = 1.0
    config.sample.method = "dpm_solver++"   # deterministic, 20 NFE on the log-SNR grid
    config.sample.num_steps = 20
    config.sample.schedule = "auto"
    return config
