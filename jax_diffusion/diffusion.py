"""Gaussian diffusion (Ho et al. 2020; Nichol & Dhariwal 2021): forward process, posterior,
model mean and variance, training losses and the variational bound in bits per dimension.

Conventions: images are NHWC in [-1, 1]; `t` is an int array [B] of indices into this
diffusion's (possibly respaced) timesteps; `model_fn(x_t, timesteps)` is always called with the
ORIGINAL timesteps `timestep_map[t]`, so a model trained on T steps is sampled with fewer.
Schedule arrays are float64 numpy and are cast to the dtype of `x` where used, so everything is
float32 by default and float64 when JAX's x64 mode is on and the inputs are float64.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import log_ndtr, ndtr

from jax_diffusion import schedules
from jax_diffusion.config_checks import choice, positive_int, require
from jax_diffusion.errors import CheckpointError, ConfigError

MEAN_TYPES = ("eps", "x0", "v")
VAR_TYPES = ("fixed_small", "fixed_large", "learned_range")
LOSS_TYPES = ("mse", "hybrid", "kl")
LOSS_WEIGHTINGS = ("none", "min_snr", "edm")

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _check_choice(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; allowed: {', '.join(allowed)}")


def extract(arr: np.ndarray, t: jax.Array, x: jax.Array) -> jax.Array:
    """arr[t] in x's dtype (float32 for a non-float x), shaped [B, 1, 1, ...] to broadcast
    against x."""
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    values = jnp.asarray(arr, dtype=dtype)[t]
    return values.reshape(t.shape + (1,) * (x.ndim - 1))


def mean_flat(x: jax.Array) -> jax.Array:
    """Mean over every axis but the batch axis."""
    return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array,
                                        log_scales: jax.Array) -> jax.Array:
    """log P(x) per element for 8-bit data in [-1, 1] under N(means, exp(log_scales)^2).

    Each pixel value owns a bin of width 2/255; the two edge bins extend to -inf and +inf
    (Ho et al. 2020, eq. 13). Uses the exact normal CDF, in log space in the tails.
    """
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    plus_in = inv_stdv * (centered + 1.0 / 255.0)
    min_in = inv_stdv * (centered - 1.0 / 255.0)
    log_cdf_plus = log_ndtr(plus_in)            # log P(X <= upper edge), for the lowest bin
    log_one_minus_cdf_min = log_ndtr(-min_in)   # log P(X >= lower edge), for the highest bin
    tiny = jnp.asarray(1e-12, x.dtype)
    # Take the CDF difference in the tail the bin lies in: above the mean, Phi(plus) - Phi(min)
    # cancels (both near 1; in float32 a bin 6 sigma above the mean got the 1e-12 floor, while
    # its mirror image below the mean was exact), so use Phi(-min) - Phi(-plus) there.
    cdf_delta = jnp.where(centered > 0, ndtr(-min_in) - ndtr(-plus_in),
                          ndtr(plus_in) - ndtr(min_in))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_delta, tiny))
    return jnp.where(x < -0.999, log_cdf_plus,
                     jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


class GaussianDiffusion:
    """A T-step Gaussian diffusion, optionally respaced to the steps in `use_timesteps`.

    Precomputed float64 arrays (index i = step i of this diffusion):
      betas, alphas_cumprod (abar_t), alphas_cumprod_prev (abar_{t-1}, 1 at t=0),
      posterior_variance  = beta_t (1 - abar_{t-1}) / (1 - abar_t),
      posterior_log_variance_clipped (log of it, with posterior_variance[1] at t=0),
      posterior_mean_coef1 = beta_t sqrt(abar_{t-1}) / (1 - abar_t)      (multiplies x0),
      posterior_mean_coef2 = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) (multiplies x_t).
    """

    def __init__(self, betas: np.ndarray, model_mean_type: str = "eps",
                 model_var_type: str = "fixed_large", loss_type: str = "mse",
                 use_timesteps: Collection[int] | None = None, rescale_timesteps: bool = False,
                 loss_weighting: str = "none", min_snr_gamma: float = 5.0,
                 sigma_data: float = 0.5, model_levels: np.ndarray | None = None):
        _check_choice(model_mean_type, MEAN_TYPES, "model_mean_type")
        _check_choice(model_var_type, VAR_TYPES, "model_var_type")
        _check_choice(loss_type, LOSS_TYPES, "loss_type")
        if loss_type == "mse" and model_var_type == "learned_range":
            raise ValueError("loss_type 'mse' does not train a learned variance: use loss_type "
                             "'hybrid' or 'kl' with model_var_type 'learned_range'")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.original_num_steps = len(betas)
        if use_timesteps is None:
            self.timestep_map = np.arange(len(betas), dtype=np.int64)
        else:
            betas, self.timestep_map = schedules.respaced_betas(betas, use_timesteps)
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.num_timesteps = len(betas)
        # A continuous process's chain (processes.levels_diffusion): the model is called with
        # the noise level of each step, not a timestep.
        self.model_levels = None if model_levels is None else np.asarray(model_levels, np.float64)

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        self.posterior_variance = (betas * (1.0 - self.alphas_cumprod_prev)
                                   / (1.0 - self.alphas_cumprod))
        # At t=0 the posterior variance is 0; improved-diffusion uses the t=1 value there.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = (betas * np.sqrt(self.alphas_cumprod_prev)
                                     / (1.0 - self.alphas_cumprod))
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        # fixed_large: sigma_t^2 = beta_t, with the t=1 posterior variance at t=0 so that the
        # decoder log-likelihood stays finite (Ho et al.).
        self.fixed_large_variance = np.append(first, betas[1:])
        self.loss_weights = loss_weights(self.alphas_cumprod, model_mean_type, loss_weighting,
                                         min_snr_gamma, loss_type, sigma_data)

    # ---------------------------------------------------------------- helpers
    def _check(self, x: jax.Array, t: jax.Array, *others: jax.Array) -> None:
        if x.ndim < 2:
            raise ValueError(f"x must be batched [B, ...], got shape {x.shape}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [batch] = ({x.shape[0]},), got {t.shape}")
        for other in others:
            if other.shape != x.shape:
                raise ValueError(f"shape mismatch: {other.shape} vs x {x.shape}")

    def timesteps_for_model(self, t: jax.Array) -> jax.Array:
        """What model_fn receives for index t: the original timestep it stands for (int32), or
        with rescale_timesteps that timestep * 1000 / T (float32; improved-diffusion's recipe, so
        the network always sees [0, 1000) whatever T). A levels diffusion passes its noise levels
        (JAX's default float dtype)."""
        if self.model_levels is not None:
            return jnp.asarray(self.model_levels)[t]
        if self.rescale_timesteps:
            scaled = self.timestep_map * (1000.0 / self.original_num_steps)
            return jnp.asarray(scaled, dtype=jnp.float32)[t]
        return jnp.asarray(self.timestep_map, dtype=jnp.int32)[t]

    # ---------------------------------------------------------------- forward process
    def q_mean_variance(self, x_start: jax.Array, t: jax.Array):
        """q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I): (mean, variance, log_variance)."""
        self._check(x_start, t)
        mean = extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = extract(np.log1p(-self.alphas_cumprod), t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        self._check(x_start, t, noise)
        return (extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior_mean_variance(self, x_start: jax.Array, x_t: jax.Array, t: jax.Array):
        """q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, posterior_variance):
        (mean, variance, log_variance_clipped)."""
        self._check(x_t, t, x_start)
        mean = (extract(self.posterior_mean_coef1, t, x_t) * x_start
                + extract(self.posterior_mean_coef2, t, x_t) * x_t)
        variance = extract(self.posterior_variance, t, x_t)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ---------------------------------------------------------------- conversions
    def predict_xstart_from_eps(self, x_t, t, eps):
        """x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t, t, x_start):
        """eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)."""
        return ((extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start)
                / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    def predict_xstart_from_v(self, x_t, t, v):
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v, for
        v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        return (extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v)

    def v_target(self, x_start, t, noise):
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022)."""
        return (extract(self.sqrt_alphas_cumprod, t, x_start) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)

    # ---------------------------------------------------------------- reverse process
    def split_model_output(self, output: jax.Array, x: jax.Array):
        """(mean part, variance part or None): learned_range puts [mean C | v C] on the last
        axis."""
        channels = x.shape[-1]
        if self.model_var_type == "learned_range":
            if output.shape != x.shape[:-1] + (2 * channels,):
                raise ValueError(f"model output has shape {output.shape}; learned_range needs "
                                 f"{x.shape[:-1] + (2 * channels,)} ([mean | v] channels)")
            return output[..., :channels], output[..., channels:]
        if output.shape != x.shape:
            raise ValueError(f"model output has shape {output.shape}, expected {x.shape} "
                             f"for model_var_type {self.model_var_type!r}")
        return output, None

    def p_mean_variance(self, model_fn: ModelFn, x_t: jax.Array, t: jax.Array,
                        clip_denoised: bool = True, model_output: jax.Array | None = None) -> dict:
        """p(x_{t-1} | x_t): dict with mean, variance, log_variance, pred_xstart, model_output.

        mean is the posterior mean q(x_{t-1} | x_t, x_0 = pred_xstart); pred_xstart is clipped to
        [-1, 1] when clip_denoised. `model_output` skips the model call when already computed.
        """
        self._check(x_t, t)
        if model_output is None:
            model_output = model_fn(x_t, self.timesteps_for_model(t))
        mean_part, var_part = self.split_model_output(model_output, x_t)
        if self.model_var_type == "learned_range":
            min_log = extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = extract(np.log(self.betas), t, x_t)
            frac = (var_part.astype(x_t.dtype) + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = jnp.exp(log_variance)
        else:
            table = (self.fixed_large_variance if self.model_var_type == "fixed_large"
                     else self.posterior_variance)
            log_table = (np.log(self.fixed_large_variance) if self.model_var_type == "fixed_large"
                         else self.posterior_log_variance_clipped)
            variance = jnp.broadcast_to(extract(table, t, x_t), x_t.shape)
            log_variance = jnp.broadcast_to(extract(log_table, t, x_t), x_t.shape)

        mean_part = mean_part.astype(x_t.dtype)
        if self.model_mean_type == "eps":
            pred_xstart = self.predict_xstart_from_eps(x_t, t, mean_part)
        elif self.model_mean_type == "x0":
            pred_xstart = mean_part
        else:
            pred_xstart = self.predict_xstart_from_v(x_t, t, mean_part)
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance,
                "pred_xstart": pred_xstart, "model_output": model_output}

    # ---------------------------------------------------------------- losses and bounds
    def vb_terms_bpd(self, model_fn: ModelFn, x_start: jax.Array, x_t: jax.Array, t: jax.Array,
                     clip_denoised: bool = True, model_output: jax.Array | None = None) -> dict:
        """The bound term L_t in bits per dimension, [B]: {"output", "pred_xstart"}.

        L_t = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0, and the discretized
        Gaussian decoder -log p(x_0 | x_1) at t = 0.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(model_fn, x_t, t, clip_denoised, model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, out["mean"], 0.5 * out["log_variance"]))
        output = jnp.where(t == 0, decoder_nll, kl) / math.log(2.0)
        return {"output": output, "pred_xstart": out["pred_xstart"]}

    def training_losses(self, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                        key: jax.Array, noise: jax.Array | None = None) -> dict:
        """Per-example losses [B]: {"loss", and the terms "mse" and/or "vb"}.

        mse:    L_simple = ||target - output||^2 averaged over pixels; the target is eps, x0 or v.
        hybrid: L_simple + lambda L_vlb with lambda = 0.001 and L_vlb estimated as T L_t, i.e.
                vb = L_t (bits) * T / 1000; the mean part is stop-gradient'ed inside the vb
                term so that it trains only the variance (Nichol & Dhariwal 2021, sec. 3.1).
        kl:     L_vlb alone, estimated as T L_t, training mean and variance.
        """
        if noise is None:
            noise = jax.random.normal(key, x_start.shape, x_start.dtype)
        x_t = self.q_sample(x_start, t, noise)
        output = model_fn(x_t, self.timesteps_for_model(t))
        if self.loss_type == "kl":
            vb = self.vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=False,
                                   model_output=output)["output"] * self.num_timesteps
            return {"loss": vb, "vb": vb}

        mean_part, var_part = self.split_model_output(output, x_t)
        target = {"eps": noise, "x0": x_start,
                  "v": self.v_target(x_start, t, noise)}[self.model_mean_type]
        mse = mean_flat((target - mean_part.astype(x_t.dtype)) ** 2)
        # "mse" stays the plain error (comparable across weightings); "loss" is what trains.
        terms = {"mse": mse, "loss": extract(self.loss_weights, t, mse) * mse}
        if self.loss_type == "hybrid":
            frozen = jax.lax.stop_gradient(mean_part)
            frozen_output = frozen if var_part is None else jnp.concatenate([frozen, var_part], -1)
            vb = self.vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised=False,
                                   model_output=frozen_output)["output"]
            terms["vb"] = vb * self.num_timesteps / 1000.0
            terms["loss"] = terms["loss"] + terms["vb"]
        return terms

    def prior_bpd(self, x_start: jax.Array) -> jax.Array:
        """KL(q(x_T | x_0) || N(0, I)) in bits per dimension, [B]. Not trained; near 0."""
        t = jnp.full((x_start.shape[0],), self.num_timesteps - 1, dtype=jnp.int32)
        mean, _, log_variance = self.q_mean_variance(x_start, t)
        zeros = jnp.zeros((), x_start.dtype)
        return mean_flat(normal_kl(mean, log_variance, zeros, zeros)) / math.log(2.0)

    def calc_bpd_loop(self, model_fn: ModelFn, x_start: jax.Array, key: jax.Array,
                      clip_denoised: bool = True) -> dict:
        """The full variational bound in bits per dimension, [B] per example.

        Returns {"total_bpd", "prior_bpd", "vb" [B, K], "xstart_mse" [B, K], "mse" [B, K]};
        total_bpd = prior_bpd + sum_t L_t. One lax.scan over the K timesteps (compile time does
        not grow with K); the noise at step t is drawn from fold_in(key, t).
        """
        batch = x_start.shape[0]

        def step(carry, t_index):
            t = jnp.full((batch,), t_index, dtype=jnp.int32)
            noise = jax.random.normal(jax.random.fold_in(key, t_index), x_start.shape,
                                      x_start.dtype)
            x_t = self.q_sample(x_start, t, noise)
            out = self.vb_terms_bpd(model_fn, x_start, x_t, t, clip_denoised)
            eps = self.predict_eps_from_xstart(x_t, t, out["pred_xstart"])
            return carry, (out["output"], mean_flat((out["pred_xstart"] - x_start) ** 2),
                           mean_flat((eps - noise) ** 2))

        timesteps = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
        _, (vb, xstart_mse, mse) = jax.lax.scan(step, None, timesteps)
        # Scanned from t = K-1 down to 0; report in increasing t as [B, K].
        vb, xstart_mse, mse = (jnp.flip(a, 0).T for a in (vb, xstart_mse, mse))
        prior = self.prior_bpd(x_start)
        return {"total_bpd": jnp.sum(vb, axis=1) + prior, "prior_bpd": prior, "vb": vb,
                "xstart_mse": xstart_mse, "mse": mse}


def loss_weights(alphas_cumprod: np.ndarray, mean_type: str, weighting: str = "none",
                 gamma: float = 5.0, loss_type: str = "mse", sigma_data: float = 0.5
                 ) -> np.ndarray:
    """Per-timestep weights of the mean-squared-error term, float64 [K].

    "none": 1 (L_simple, Ho et al. 2020). "min_snr": Min-SNR-gamma (Hang et al. 2023), with
    SNR_t = abar_t / (1 - abar_t): the x0-space error weighted by min(SNR_t, gamma), which for
    the three parameterisations is min(SNR, gamma) / SNR (eps), min(SNR, gamma) / (SNR + 1) (v)
    and min(SNR, gamma) (x0). It caps the weight of the nearly clean timesteps, where L_simple
    for eps spends most of its effort, so the noisy ones are learned as well.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(f"config.diffusion.loss_weighting={weighting!r} is unknown; allowed: "
                          f"{', '.join(LOSS_WEIGHTINGS)}")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    if weighting == "none":
        return np.ones_like(abar)
    if loss_type == "kl":
        raise ConfigError(f"config.diffusion.loss_weighting={weighting!r} weights the MSE term, "
                          "which config.diffusion.loss_type='kl' does not have: use loss_type "
                          "'mse' or 'hybrid', or loss_weighting 'none'")
    if weighting == "edm":
        s2 = (1.0 - abar) / abar
        lam = (s2 + sigma_data ** 2) / (s2 * sigma_data ** 2)
        return {"eps": lam * s2, "v": lam * s2 / (1.0 + s2), "x0": lam}[mean_type]
    if not gamma > 0:
        raise ConfigError(f"config.diffusion.min_snr_gamma={gamma} must be > 0 "
                          f"(Hang et al. 2023 use 5)")
    snr = abar / (1.0 - abar)
    clipped = np.minimum(snr, gamma)
    return {"eps": clipped / snr, "v": clipped / (snr + 1.0), "x0": clipped}[mean_type]


# The keys that fix what a trained network's output means; sampling with other values is silently
# wrong (an eps network read as v gives noise), so a checkpoint must be sampled with its own.
OUTPUT_DEFINING_KEYS = ("process", "schedule", "num_timesteps", "mean_type", "var_type",
                        "rescale_timesteps", "sigma_data")


def check_trained_with(saved_diffusion: Mapping, diffusion_config, where: str) -> None:
    """Raise CheckpointError if `diffusion_config` differs from the config a checkpoint was
    trained with (`saved_diffusion`: its config's "diffusion" section) in a key that changes
    what the network's output means. `where` names the checkpoint in the message. A continuous
    process (edm, flow) reads none of vp's keys: there only the process and sigma_data count."""
    keys = OUTPUT_DEFINING_KEYS
    if getattr(diffusion_config, "process", "vp") != "vp":
        keys = ("process", "sigma_data")
    for key in keys:
        if key in saved_diffusion and saved_diffusion[key] != diffusion_config[key]:
            raise CheckpointError(
                f"checkpoint {where} was trained with diffusion.{key}="
                f"{saved_diffusion[key]!r} but the config says {diffusion_config[key]!r}: pass "
                f"--config.diffusion.{key}={saved_diffusion[key]} to sample it")


def create_diffusion(diffusion_config, respacing: str | Collection[int] | None = None
                     ) -> GaussianDiffusion:
    """The GaussianDiffusion that `config.diffusion` describes, optionally respaced.

    `respacing` is anything space_timesteps accepts ("50", "ddim50", [10, 20]) or a set of kept
    steps; None keeps all T steps.
    """
    betas = schedules.get_beta_schedule(diffusion_config.schedule, diffusion_config.num_timesteps)
    if isinstance(respacing, (str, list, tuple)):
        respacing = schedules.space_timesteps(diffusion_config.num_timesteps, respacing)
    return GaussianDiffusion(betas, diffusion_config.mean_type, diffusion_config.var_type,
                             diffusion_config.loss_type, use_timesteps=respacing,
                             # absent from configs saved before the keys existed: the defaults
                             rescale_timesteps=getattr(diffusion_config, "rescale_timesteps",
                                                       False),
                             loss_weighting=getattr(diffusion_config, "loss_weighting", "none"),
                             min_snr_gamma=getattr(diffusion_config, "min_snr_gamma", 5.0),
                             sigma_data=getattr(diffusion_config, "sigma_data", 0.5))


def validate_diffusion_config(diffusion) -> None:
    """config.diffusion's rules."""
    choice(diffusion.schedule, "diffusion.schedule", schedules.SCHEDULES)
    positive_int(diffusion, "num_timesteps", "diffusion")
    choice(diffusion.mean_type, "diffusion.mean_type", MEAN_TYPES)
    choice(diffusion.var_type, "diffusion.var_type", VAR_TYPES)
    choice(diffusion.loss_type, "diffusion.loss_type", LOSS_TYPES)
    choice(diffusion.loss_weighting, "diffusion.loss_weighting", LOSS_WEIGHTINGS)
    require(diffusion.min_snr_gamma > 0, "diffusion.min_snr_gamma", diffusion.min_snr_gamma,
             "must be > 0 (5 in Hang et al. 2023)")
    require(isinstance(diffusion.rescale_timesteps, bool), "diffusion.rescale_timesteps",
             diffusion.rescale_timesteps, "must be True or False")
    require(not (diffusion.loss_type == "mse" and diffusion.var_type == "learned_range"),
             "diffusion.loss_type", diffusion.loss_type,
             "does not train a learned variance: use 'hybrid' or 'kl' with "
             "config.diffusion.var_type='learned_range'")
