"""The digits model trained as a rectified flow (Liu et al. 2022; Lipman et al. 2023):
x_t = (1 - t) x0 + t eps, the velocity loss, logit-normal t (Esser et al. 2024: logit t ~
N(0, 1)), on the demo's U-Net and data (docs/recipes.md): the comparison's `flow` run, which
configs/digits.py adopted and holds whole; sampled here with the flow's own Euler steps.
`--config=configs/digits_flow.py` alone trains it."""
import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.sample.method = "euler"     # the flow's own sampler, even in t
    config.sample.num_steps = 50
    config.sample.eta = 0.0
    return config
