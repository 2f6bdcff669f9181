"""Per-step coefficients of the ODE solvers, float64 numpy on the host (no JAX): the
multistep data-prediction solvers DPM-Solver++(2M/3M) and UniPC as linear combinations of the
last model outputs, and the EDM Heun sampler's noise levels. samplers.py casts them once and
runs them in one scan.
"""
from __future__ import annotations

import math

import numpy as np

from jax_diffusion.diffusion import GaussianDiffusion
from jax_diffusion.schedules import edm_sigmas

# Multistep data-prediction solvers (Lu et al. 2022; Zhao et al. 2023) and their highest order.
MULTISTEP_ORDERS = {"dpm_solver++": 2, "dpm_solver++3m": 3, "unipc": 3}
# The dpm-solver reference lowers the order of the final steps below this many steps.
LOWER_ORDER_FINAL_BELOW = 10
HISTORY = 4   # model outputs a step combines: m_i and the three before it (UniC-3)


def half_lambda(alphas_cumprod: np.ndarray) -> np.ndarray:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)), float64."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def multistep_orders(method: str, num_steps: int) -> np.ndarray:
    """The order of the step leaving each kept index i (to i-1), int [K].

    Warm-up: the step leaving K-1 is first order, the next second order, ... (no earlier model
    outputs yet). The step out of i = 0 goes to lambda = +inf and is first order. Lower orders at
    the end as the references do: DPM-Solver++(3M) below LOWER_ORDER_FINAL_BELOW steps (the
    dpm-solver reference's lower_order_final), UniPC always (its reference's lower_order_final).
    """
    top = MULTISTEP_ORDERS[method]
    i = np.arange(num_steps)
    orders = np.minimum(top, num_steps - i)
    if method == "unipc" or (method == "dpm_solver++3m" and num_steps < LOWER_ORDER_FINAL_BELOW):
        orders = np.minimum(orders, i + 1)
    orders[0] = 1
    return orders


def _dpm_solver_pp_row(lam: np.ndarray, sigma: np.ndarray, alpha: np.ndarray, i: int,
                       order: int) -> tuple[float, np.ndarray]:
    """(a, w): x_{i-1} = a x_i + sum_j w_j m_{i+j} for one DPM-Solver++ step of `order`.

    Lu et al. 2022, data prediction, h = lambda_{i-1} - lambda_i, phi_1 = e^{-h} - 1:
      1: x' = (sigma_s / sigma_t) x - alpha_s phi_1 m_i                         (= DDIM)
      2: ... - 0.5 alpha_s phi_1 D1,  D1 = (m_i - m_{i+1}) / r0,  r0 = h_0 / h    (2M)
      3: ... + alpha_s phi_2 D1 - alpha_s phi_3 D2 with phi_2 = phi_1 / h + 1,
         phi_3 = phi_2 / h - 1/2, D1_k = (m_{i+k} - m_{i+k+1}) / r_k,
         D1 = D1_0 + r0 / (r0 + r1) (D1_0 - D1_1) ~ h x0',
         D2 = 2 (D1_0 - D1_1) / (r0 + r1) ~ h^2 x0''                            (3M)
    D1 and D2 are the derivatives, times h and h^2, of the quadratic through the last three data
    predictions in lambda, so the step integrates that quadratic exactly (the Taylor form of Lu
    et al.'s eq. for the data prediction). The dpm-solver and diffusers multistep code omit the
    2 in D2, which leaves a local O(h^3) error and second-order convergence (measured in
    tests/test_solvers.py); their singlestep third-order solver has it.
    """
    h = lam[i - 1] - lam[i]
    alpha_s = alpha[i - 1]
    phi_1 = np.expm1(-h)
    w = np.zeros(HISTORY)
    w[0] = -alpha_s * phi_1
    if order >= 2:
        r0 = (lam[i] - lam[i + 1]) / h
        d1_0 = np.zeros(HISTORY)          # D1_0 as weights on the window
        d1_0[0], d1_0[1] = 1.0 / r0, -1.0 / r0
        if order == 2:
            w += -0.5 * alpha_s * phi_1 * d1_0
        else:
            r1 = (lam[i + 1] - lam[i + 2]) / h
            d1_1 = np.zeros(HISTORY)
            d1_1[1], d1_1[2] = 1.0 / r1, -1.0 / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = 2.0 * (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + 1.0
            phi_3 = phi_2 / h - 0.5
            w += alpha_s * phi_2 * d1 - alpha_s * phi_3 * d2
    return sigma[i - 1] / sigma[i], w


def _unipc_rhos(lam: np.ndarray, start: int, end: int, order: int,
                corrector: bool) -> tuple[np.ndarray, float]:
    """(rho, B(h)) of UniP (predictor) or UniC (corrector) with B(h) = e^h - 1 ("bh2"),
    for the step from kept index `start` to `end` = start - 1 (Zhao et al. 2023, Alg. 2-3).

    r_k = (lambda_{start+k} - lambda_start) / h for k < order, then r = 1; R[l, k] = r_k^l;
    with hh = -h (data prediction), b_l = (l+1)! h phi_{l+2}(hh) / B(h), where
    h phi_1 = e^hh - 1 and h phi_{k+1} = h phi_k / hh - 1/k!.
    The predictor solves R[:-1, :-1] rho = b[:-1] (rho = 1/2 at order 2), the corrector
    R rho = b (rho = 1/2 at order 1), as the reference implementation does.
    """
    h = lam[end] - lam[start]
    hh = -h
    b_h = np.expm1(hh)
    rks = np.array([(lam[start + k] - lam[start]) / h for k in range(1, order)] + [1.0])
    r_matrix = np.stack([rks ** power for power in range(order)])
    b = np.zeros(order)
    h_phi = np.expm1(hh) / hh - 1.0
    factorial = 1.0
    for l in range(order):  # noqa: E741
        b[l] = h_phi * factorial / b_h
        factorial *= l + 2
        h_phi = h_phi / hh - 1.0 / factorial
    if corrector:
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(r_matrix, b)
    elif order == 1:
        rho = np.zeros(0)
    else:
        rho = np.array([0.5]) if order == 2 else np.linalg.solve(r_matrix[:-1, :-1], b[:-1])
    return rho, b_h


def _unipc_row(lam, sigma, alpha, start: int, end: int, order: int, corrector: bool,
               offset: int) -> tuple[float, np.ndarray]:
    """(a, w): x_end = a x_start + sum_j w_j M_j for UniP (corrector=False) or UniC.

    The window M = [m_i, m_{i+1}, ...] with m_start at position `offset` (0 for the predictor,
    whose step starts at i; 1 for the corrector, which in iteration i corrects the step from
    i+1 to i using m_i at position 0):
      x_end = (sigma_end / sigma_start) x_start - alpha_end (e^{-h} - 1) m_start
              - alpha_end B(h) (sum_k rho_k D_k [+ rho_last (m_end - m_start), corrector]),
      D_k = (m_{start+k} - m_start) / r_k.
    """
    rho, b_h = _unipc_rhos(lam, start, end, order, corrector)
    h = lam[end] - lam[start]
    alpha_end = alpha[end]
    w = np.zeros(HISTORY)
    w[offset] = -alpha_end * np.expm1(-h)
    for k in range(1, order):
        r_k = (lam[start + k] - lam[start]) / h
        w[offset + k] += -alpha_end * b_h * rho[k - 1] / r_k
        w[offset] += alpha_end * b_h * rho[k - 1] / r_k
    if corrector:
        w[0] += -alpha_end * b_h * rho[-1]
        w[offset] += alpha_end * b_h * rho[-1]
    return sigma[end] / sigma[start], w


def multistep_table(method: str, alphas_cumprod: np.ndarray) -> dict[str, np.ndarray]:
    """Float64 coefficients of a multistep solver over the K kept steps, rows indexed by i.

    Iteration i evaluates m_i = x0(x_i, t_i) and combines the window M = [m_i .. m_{i+3}]:
      corrected x_i = keep[i] x_i + base[i] x_{i+1} + sum_j corr[i, j] M_j   (UniC; identity
                      for the DPM-Solvers and at the first step),
      x_{i-1}       = scale[i] x_i + sum_j pred[i, j] M_j                  (x_{-1} = m_0).
    """
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    num = len(abar)
    lam, alpha, sigma = half_lambda(abar), np.sqrt(abar), np.sqrt(1.0 - abar)
    orders = multistep_orders(method, num)
    table = {"keep": np.ones(num), "base": np.zeros(num), "corr": np.zeros((num, HISTORY)),
             "scale": np.zeros(num), "pred": np.zeros((num, HISTORY))}
    table["pred"][0, 0] = 1.0
    for i in range(1, num):
        if method == "unipc":
            table["scale"][i], table["pred"][i] = _unipc_row(lam, sigma, alpha, i, i - 1,
                                                             orders[i], False, 0)
        else:
            table["scale"][i], table["pred"][i] = _dpm_solver_pp_row(lam, sigma, alpha, i,
                                                                     orders[i])
    if method == "unipc":
        for i in range(num - 1):   # correct the step from i+1 to i, at its predictor's order
            table["keep"][i] = 0.0
            table["base"][i], table["corr"][i] = _unipc_row(lam, sigma, alpha, i + 1, i,
                                                            orders[i + 1], True, 1)
    return table


# ---------------------------------------------------------------- EDM Heun table
def edm_heun_table(diffusion: GaussianDiffusion, churn: float,
                   model_alphas_cumprod: np.ndarray | None
                   ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Karras et al. 2022, Alg. 1 (churn = 0) and Alg. 2 on the kept steps' sigmas, sigma =
    sqrt((1 - abar) / abar), x_EDM = x_VP sqrt(1 + sigma^2); S_tmin = 0, S_tmax = inf and
    S_noise = 1 (churn at every step, unit noise). Returns (table in execution order, j = 0 ..
    2K-2, and the sorted levels the model is evaluated at: original timesteps, or for a
    continuous model the noise levels sigma).

    Step m from sigma_m to sigma_{m+1} (0 after the last): gamma = min(churn / K, sqrt(2) - 1),
    sigma_hat = sigma_m (1 + gamma) snapped to the model's nearest discrete noise level in log
    sigma (the model is defined only there, as EDM does for its discrete iDDPM models; a
    continuous model, model_alphas_cumprod None, takes sigma_hat as it is), x_hat =
    x + sqrt(sigma_hat^2 - sigma_m^2) z. Even j: Euler, d = (x_hat - D(x_hat)) / sigma_hat,
    x' = x_hat + (sigma_{m+1} - sigma_hat) d (written as a convex combination, so x' = D exactly
    at sigma = 0); odd j: Heun, x' = x_hat + (sigma_{m+1} - sigma_hat) (d + d') / 2.
    """
    continuous = model_alphas_cumprod is None
    # a levels diffusion holds its sigmas exactly; abar's round trip would move them by ~1e-16
    sigma = (diffusion.model_levels.copy() if continuous
             else edm_sigmas(diffusion.alphas_cumprod))
    # ascending levels the model is called with: original timesteps, or the sigmas themselves
    kept = sigma.copy() if continuous else np.asarray(diffusion.timestep_map, dtype=np.int64)
    num = len(sigma)
    gamma = min(churn / num, math.sqrt(2.0) - 1.0)
    hat_t, sigma_hat = kept.copy(), sigma.copy()
    if gamma > 0 and continuous:
        sigma_hat = sigma * (1.0 + gamma)
        # A churned level within rounding of a grid level is that level: the levels the model
        # is evaluated at must be distinct.
        gap = np.abs(np.log(sigma_hat)[:, None] - np.log(sigma)[None, :])
        close = gap.min(axis=1) < 1e-9
        sigma_hat[close] = sigma[gap.argmin(axis=1)[close]]
        hat_t = sigma_hat
    elif gamma > 0:
        log_sigma_all = np.log(edm_sigmas(model_alphas_cumprod))
        targets = np.log(sigma * (1.0 + gamma))
        hat_t = np.argmin(np.abs(targets[:, None] - log_sigma_all[None, :]), axis=1)
        hat_t = np.maximum(hat_t, kept)   # never below the current level (rounding ties)
        # Where the snap lands on the current level itself there is no churn: sigma_hat stays
        # sigma exactly (an exact 0 noise, not the square root of a rounding difference).
        churned = hat_t != kept
        sigma_hat[churned] = np.exp(log_sigma_all[hat_t[churned]])
    evaluated = np.unique(np.concatenate([kept, hat_t]))
    index_of = {t.item(): n for n, t in enumerate(evaluated)}
    rows = []   # (t, sigma, vp_in, vp_out, noise, euler, ratio, half_dt)
    for k in range(num - 1, -1, -1):   # kept index of the current level
        s_hat = sigma_hat[k]
        s_next = sigma[k - 1] if k > 0 else 0.0
        vp_next = 1.0 / math.sqrt(1.0 + s_next ** 2)
        rows.append((index_of[hat_t[k].item()], s_hat, 1.0 / math.sqrt(1.0 + s_hat ** 2), vp_next,
                     math.sqrt(max(s_hat ** 2 - sigma[k] ** 2, 0.0)), True, s_next / s_hat, 0.0))
        if k > 0:
            rows.append((index_of[kept[k - 1].item()], s_next, vp_next, vp_next, 0.0, False, 0.0,
                         0.5 * (s_next - s_hat)))
    names = ("t", "sigma", "vp_in", "vp_out", "noise", "euler", "ratio", "half_dt")
    columns = zip(*rows, strict=True)
    table = {name: np.asarray(column) for name, column in zip(names, columns, strict=True)}
    table["start"] = np.array(math.sqrt(1.0 + sigma[-1] ** 2))
    return table, evaluated


