"""Deterministic against stochastic sampling on the test suite's Gaussian mixture, with the exact
denoiser and with an under-confident one: the responsibilities r_k(x_t) softened by a
temperature tau (softmax(log r / tau)), the way a briefly trained network is unsure which mode a
noisy input belongs to. Same noise for every setting, 8,192 samples.

    PYTHONPATH=$PWD python scripts/probe_tempered_mixture.py [--taus=1,2,3] \
        [--settings=ddim:50:0,ddim:50:1,ddim:1000:0,ddim:1000:1]

Prints per setting: the recovered component weights, the per-component variance ratios, and the
share of "blends": samples whose log-density under the true mixture is below the 2% quantile of
exact samples (the mixture's analogue of a digit that is neither a 3 nor a 9).
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
import gaussian_mixture as gm  # noqa: E402  (the tests' mixture and its exact denoiser)
import test_solvers  # noqa: E402  (its mixture, beta schedule and sampler config)

from jax_diffusion.samplers import sample_from_config  # noqa: E402

NUM = 8192
GMM, ABAR = test_solvers.GMM, test_solvers.ABAR


def tempered_eps(x_t: jax.Array, abar: jax.Array, tau: float) -> jax.Array:
    """gaussian_mixture.eps_star with responsibilities softmax(log r / tau); tau = 1 is exact."""
    x = x_t.reshape(x_t.shape[0], -1)
    a, s = jnp.sqrt(abar)[:, None], jnp.sqrt(1.0 - abar)[:, None]
    r = jax.nn.softmax(gm.log_responsibilities(GMM, x, a, s) / tau, axis=1)
    var = a ** 2 * jnp.asarray(GMM.stds, x.dtype) ** 2 + s ** 2
    diff = x[:, None, :] - a[:, :, None] * jnp.asarray(GMM.means, x.dtype)[None]
    return (s * jnp.sum((r / var)[:, :, None] * diff, axis=1)).reshape(x_t.shape)


def log_density(samples: np.ndarray) -> np.ndarray:
    """log p(x0) under the true mixture, [N]."""
    x = np.asarray(samples, np.float64).reshape(len(samples), -1)
    var = GMM.stds ** 2
    sq = ((x[:, None, :] - GMM.means[None]) ** 2).sum(-1)
    log_p = np.log(GMM.weights) - 0.5 * sq / var - 0.5 * x.shape[1] * np.log(2 * np.pi * var)
    return np.logaddexp.reduce(log_p, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--taus", default="1,2,3")
    parser.add_argument("--settings", default="ddim:50:0,ddim:50:1,ddim:1000:0,ddim:1000:1")
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    blend_below = np.quantile(log_density(GMM.sample(np.random.default_rng(0), NUM)), 0.02)
    for tau in (float(t) for t in args.taus.split(",")):
        for setting in args.settings.split(","):
            method, steps, eta = setting.split(":")
            config = test_solvers._config(method, int(steps), "uniform")
            config.sample.eta = float(eta)

            def model(x, t, tau=tau):
                return tempered_eps(x, jnp.asarray(ABAR)[t], tau)

            samples = jax.jit(lambda key, config=config, model=model: sample_from_config(
                model, config, (NUM,) + GMM.event_shape, key))(jax.random.key(11))
            recovery = gm.check_recovery(GMM, samples, 0.03, (0.9, 1.1))
            blends = float(np.mean(log_density(samples) < blend_below))
            print(f"tau={tau:g} {setting}: weights {np.round(recovery.weights, 3)} (true "
                  f"{GMM.weights}), variance ratios {np.round(recovery.var_ratios, 3)}, blends "
                  f"{blends:.3f} (exact samples: 0.020)", flush=True)


if __name__ == "__main__":
    main()
