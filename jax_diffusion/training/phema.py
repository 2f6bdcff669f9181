"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", Sec. 3 and App. C): the math, in float64 numpy, and the config rules of its keys.

A power-function EMA of exponent gamma averages the parameters theta(tau) seen up to step t with
the profile

    p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 <= tau <= t,

whose width relative to t is sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). Tracked
during training by theta_hat_t = beta_t theta_hat_{t-1} + (1 - beta_t) theta_t with
beta_t = (1 - 1/t)^(gamma + 1), t = 1, 2, ... (beta_1 = 0: no share of the initialisation).

Any other profile (t_r, gamma_r) is rebuilt from stored snapshots (t_i, gamma_i) as the sum of
x_i theta_hat_i whose profile is nearest in L2: the Gram system A x = b with
A_ij = <p_i, p_j>, b_i = <p_i, p_r>, in closed form (`profile_inner_product`).

Time is measured in optimizer steps; the solve is invariant to the unit (A and b both scale by
1/c when every t does), so EDM2's image counts give the same coefficients.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from jax_diffusion.errors import ConfigError

# gamma -> 0 (a flat average of the whole run) gives the widest profile EDM2 allows; gamma <= 0
# would weigh the earliest (random) parameters at least as much as the latest.
MAX_SIGMA_REL = float(np.sqrt(1.0 / 12.0))   # sigma_rel(gamma=0) = 0.2887
EMA_FORMS = ("fixed", "power")


def sigma_rel_of_gamma(gamma: float | np.ndarray) -> np.ndarray:
    """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))): the standard deviation of
    p_{t,gamma} divided by t (EDM2 Eq. 123)."""
    gamma = np.asarray(gamma, np.float64)
    return np.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def gamma_of_sigma_rel(sigma_rel: float | np.ndarray) -> np.ndarray:
    """The exponent gamma > 0 with sigma_rel_of_gamma(gamma) = sigma_rel: squaring and clearing
    the denominator gives the cubic gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2) = 0
    (s = sigma_rel), whose largest real root is taken (EDM2 Eq. 126, Alg. 2)."""
    sigma_rel = np.asarray(sigma_rel, np.float64)
    if np.any(sigma_rel <= 0) or np.any(sigma_rel >= MAX_SIGMA_REL):
        raise ValueError(f"sigma_rel must lie in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel}")
    inv_sq = sigma_rel.ravel() ** -2.0
    gammas = [np.roots([1.0, 7.0, 16.0 - c, 12.0 - c]).real.max() for c in inv_sq]
    return np.asarray(gammas, np.float64).reshape(sigma_rel.shape)


def power_ema_step_size(gamma: float | np.ndarray, t: int | np.ndarray) -> np.ndarray:
    """1 - beta_t = 1 - (1 - 1/t)^(gamma + 1) at the t-th update (t >= 1), written as
    -expm1((gamma + 1) log1p(-1/t)) so that it keeps full precision for t in the millions."""
    t = np.asarray(t, np.float64)
    with np.errstate(divide="ignore"):   # t = 1: log1p(-1) = -inf, and the step size is 1
        return -np.expm1((np.asarray(gamma, np.float64) + 1.0) * np.log1p(-1.0 / t))


def profile_inner_product(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray,
                          gamma_b: np.ndarray) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> = integral over [0, min(t_a, t_b)] of the product,
    broadcast over the arguments. With t_a <= t_b the integral is

        (gamma_a + 1)(gamma_b + 1) / (gamma_a + gamma_b + 1) * (t_a / t_b)^gamma_b / t_b

    and symmetrically with the roles swapped (EDM2 Eq. 151)."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    a_first = t_a <= t_b
    ratio = np.where(a_first, t_a / t_b, t_b / t_a)
    exponent = np.where(a_first, gamma_b, gamma_a)
    later = np.maximum(t_a, t_b)
    return ((gamma_a + 1.0) * (gamma_b + 1.0) / (gamma_a + gamma_b + 1.0)
            * ratio ** exponent / later)


def reconstruction_coefficients(snapshot_steps: Sequence[int], snapshot_sigma_rels:
                                Sequence[float], step: int, sigma_rel: float) -> np.ndarray:
    """x [n]: the weights of the n snapshots (snapshot i is the power EMA of width
    snapshot_sigma_rels[i] after snapshot_steps[i] updates) whose sum approximates the power EMA
    of width `sigma_rel` after `step` updates: the least-squares solution of A x = b (module
    docstring), divided by its sum so that the result stays an average (the profiles each
    integrate to 1; the division removes the solve's small deficit, as EDM2 does)."""
    t = np.asarray(snapshot_steps, np.float64)
    gamma = gamma_of_sigma_rel(np.asarray(snapshot_sigma_rels, np.float64))
    if t.shape != gamma.shape or t.ndim != 1 or not len(t):
        raise ValueError("one step and one sigma_rel per snapshot, at least one snapshot")
    if np.any(t <= 0) or np.any(t > step):
        raise ValueError(f"snapshot steps must lie in [1, {step}], got {t.tolist()}")
    target = gamma_of_sigma_rel(sigma_rel)
    gram = profile_inner_product(t[:, None], gamma[:, None], t[None, :], gamma[None, :])
    rhs = profile_inner_product(t, gamma, float(step), target)
    # lstsq, not solve: two snapshots of (nearly) the same profile make A (nearly) singular,
    # and the minimum-norm solution then splits the weight between them.
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    return x / np.sum(x)


def parse_sigma_rels(text: str | Sequence[float], key: str) -> tuple[float, ...]:
    """A comma string or a sequence of widths as floats, each in (0, MAX_SIGMA_REL), none twice;
    ConfigError naming `key` otherwise."""
    parts = text.split(",") if isinstance(text, str) else list(text)
    values = []
    for part in parts:
        try:
            value = float(part)
        except (TypeError, ValueError):
            raise ConfigError(f"config.{key}: {part!r} is not a number; give widths such as "
                              f"'0.05,0.1'") from None
        check_sigma_rel(value, key)
        if value in values:
            raise ConfigError(f"config.{key}: {value:g} is given twice")
        values.append(value)
    if not values:
        raise ConfigError(f"config.{key}={text!r} is empty; give widths such as '0.05,0.1'")
    return tuple(values)


def check_sigma_rel(value: float, key: str) -> None:
    if not 0.0 < value < MAX_SIGMA_REL:
        raise ConfigError(f"config.{key}={value!r} must lie in (0, {MAX_SIGMA_REL:.4f}): the "
                          f"EMA width relative to the training time (EDM2 uses 0.05 and 0.1)")


def _check_train(config) -> None:
    train = config.train
    if train.ema not in EMA_FORMS:
        raise ConfigError(f"config.train.ema={train.ema!r} is unknown; allowed: "
                          f"{', '.join(EMA_FORMS)}")
    if train.ema_halflife_kimg < 0 or train.ema_rampup_ratio < 0:
        raise ConfigError("config.train.ema_halflife_kimg and ema_rampup_ratio must be >= 0 "
                          "(0 = off: the bare config.train.ema_decay)")
    if train.ema_rampup_ratio > 0 and train.ema_halflife_kimg == 0:
        raise ConfigError(f"config.train.ema_rampup_ratio={train.ema_rampup_ratio} caps the "
                          f"half-life of config.train.ema_halflife_kimg, which is 0 (off); set "
                          f"a half-life (EDM: 500) or rampup 0")
    if train.ema != "power":
        return
    parse_sigma_rels(train.ema_sigma_rels, "train.ema_sigma_rels")
    every, k = train.ema_snapshot_every, train.steps_per_jit
    if not isinstance(every, int) or every < 1 or every % k:
        raise ConfigError(f"config.train.ema_snapshot_every={every!r} must be a positive "
                          f"multiple of config.train.steps_per_jit={k}")


def validate_phema_config(config, mode: str, workdir: str) -> None:
    """The rules of config.train.ema*, config.sample.ema_sigma_rel, config.phema and
    config.eval.ema_sweep (its metrics: config_validation); ConfigError on the first broken one.
    Reads no checkpoint: whether a run tracked the asked width is checked when it is
    restored."""
    _check_train(config)
    sample_width = config.sample.ema_sigma_rel
    if sample_width:
        check_sigma_rel(sample_width, "sample.ema_sigma_rel")
        if not config.sample.use_ema:
            raise ConfigError(f"config.sample.ema_sigma_rel={sample_width} asks for a power EMA "
                              f"but config.sample.use_ema=False asks for the raw parameters; "
                              f"drop one")
    if mode == "eval" and config.eval.ema_sweep:
        parse_sigma_rels(config.eval.ema_sweep, "eval.ema_sweep")
        if config.eval.sweep:
            raise ConfigError("config.eval.ema_sweep and config.eval.sweep are both set; sweep "
                              "the EMA width or the sampler, one per --mode=eval run")
    if mode != "phema":
        return
    phema = config.phema
    check_sigma_rel(phema.sigma_rel, "phema.sigma_rel")
    output = phema.output_workdir
    if not output:
        raise ConfigError("config.phema.output_workdir is empty; name the new workdir that "
                          "receives the rebuilt EMA")
    if os.path.abspath(output) == os.path.abspath(workdir):
        raise ConfigError(f"config.phema.output_workdir={output!r} is --workdir itself; the "
                          f"rebuilt EMA needs a workdir of its own")
    if not isinstance(phema.step, int) or phema.step < -1 or phema.step == 0:
        raise ConfigError(f"config.phema.step={phema.step!r} must be a snapshot's step (> 0) or "
                          f"-1 for the latest")
