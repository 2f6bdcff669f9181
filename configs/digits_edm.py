"""The digits model trained with EDM's recipe (Karras et al. 2022): the continuous process
x0 + s eps, EDM's preconditioning, ln s ~ N(-1.2, 1.2^2) and EDM's loss weight, on the demo's
U-Net, data and schedule (docs/recipes.md). `--config=configs/digits_edm.py` alone trains it."""
import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.diffusion.process = "edm"
    config.diffusion.loss_weighting = "edm"
    config.diffusion.sigma_data = 0.5
    config.train.noise_sampling = "lognormal"
    config.train.lognormal_mean = -1.2
    config.train.lognormal_std = 1.2
    config.sample.method = "edm_heun"  # EDM's deterministic Heun sampler on its rho-7 grid
    config.sample.num_steps = 35
    config.sample.eta = 0.0
    config.sample.schedule = "auto"
    return config
