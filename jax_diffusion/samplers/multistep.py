"""The multistep solvers on data predictions: DPM-Solver++(2M), DPM-Solver++(3M) and UniPC-3
with its corrector UniC (coefficients from `tables.multistep_table`)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jax_diffusion.samplers.plan import Chain, Plan, batch_timesteps, cast_table
from jax_diffusion.samplers.tables import multistep_table


def multistep_plan(chain: Chain) -> Plan:
    diffusion, batch = chain.diffusion, chain.shape[0]
    table = multistep_table(chain.method, diffusion.alphas_cumprod)
    # The window the method uses (2M: 2 outputs, 3M: 3, UniPC: 4), so no image-sized zeros
    # are carried or multiplied.
    used = np.flatnonzero(np.any(table["pred"] != 0, axis=0) | np.any(table["corr"] != 0, axis=0))
    width = int(used[-1]) + 1
    c = cast_table(table, chain.dtype)
    corrects = chain.method == "unipc"

    def combine(weights, window):
        return sum(weights[j] * window[j] for j in range(width))

    def step(state, i):
        x, base, history = state
        m = diffusion.p_mean_variance(chain.model_fn, x, batch_timesteps(i, batch),
                                      chain.clip_denoised)["pred_xstart"]
        window = (m,) + history
        if corrects:
            x = c["keep"][i] * x + c["base"][i] * base + combine(c["corr"][i], window)
        x_next = c["scale"][i] * x + combine(c["pred"][i], window)
        return (x_next, x, window[:width - 1]), m

    def init(x_T):
        zeros = jnp.zeros_like(x_T)
        return x_T, zeros, (zeros,) * (width - 1)

    return Plan(diffusion.num_timesteps, init, step, lambda state, i: state[0])
