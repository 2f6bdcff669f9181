"""The negative log-likelihood bound in bits per dimension (Ho et al. 2020, eq. 5), sharded."""
from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jax_diffusion.diffusion import create_diffusion
from jax_diffusion.runtime import parallel


def nll_bits_per_dim(config: ml_collections.ConfigDict, model: nn.Module, params,
                     images: np.ndarray, labels: np.ndarray, mesh, batch_size: int,
                     seed: int = 0) -> np.ndarray:
    """Per-image bound in bits/dim (`GaussianDiffusion.calc_bpd_loop` over all T steps), the
    batch sharded over the mesh; batch i draws its noise from fold_in(PRNGKey(seed), i)."""
    parallel.check_divisible(batch_size, mesh, "config.eval.nll_batch_size")
    diffusion = create_diffusion(config.diffusion)
    conditional = config.model.num_classes > 0
    batch_sharding = parallel.batch_sharded(mesh)

    def bpd(params, x, y, key):
        def model_fn(x_t, t):
            return model.apply({"params": params}, x_t, t, y if conditional else None)
        return diffusion.calc_bpd_loop(model_fn, x, key)["total_bpd"]

    bpd_fn = jax.jit(bpd, in_shardings=(parallel.replicated(mesh), batch_sharding,
                                        batch_sharding, parallel.replicated(mesh)),
                     out_shardings=batch_sharding)
    key = jax.random.PRNGKey(seed)
    return parallel.map_batches(
        lambda i, x, y: bpd_fn(params, x, y, jax.random.fold_in(key, i)),
        (images.astype(np.float32), labels.astype(np.int32)), batch_size, mesh, "nll")
