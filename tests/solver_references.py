"""Test helper: float64 numpy references of the ODE solvers, written from the papers, that
tests/test_solvers.py (VP process) and tests/test_processes.py (every Gaussian path, each in its
own frame) share. They take generic per-level arrays (lambda, alpha, sigma) of a path
x = alpha x0 + sigma eps, so one reference serves every frame; no JAX."""
import math

import numpy as np


def half_lambda(abar):
    return np.log(np.sqrt(abar) / np.sqrt(1.0 - abar))


def dpm_orders(method, num):
    """Order of solver step s = 1..K (s = K - i leaves kept index i), as the dpm-solver
    reference's sample loop chooses it: warm-up min(order, s), lower_order_final below 10 steps
    (2M, 3M) or always (UniPC): min(order, K + 1 - s); the step to lambda = inf is first order."""
    top = {"dpm_solver++": 2, "dpm_solver++3m": 3, "unipc": 3}[method]
    orders = {}
    for s in range(1, num + 1):
        order = min(top, s)
        if method == "unipc" or num < 10:
            order = min(order, num + 1 - s)
        orders[num - s] = order
    return orders


def ref_dpm3m_step(x, models, lam, alpha, sigma, i, order, d2_scale=2.0):
    """Lu et al. 2022 (DPM-Solver++), data prediction, from lambda_i to lambda_{i-1}:
    x' = sigma'/sigma x + alpha' (1 - e^-h) x0 + alpha' phi_2 h x0' - alpha' phi_3 h^2 x0''
    with the derivatives of the polynomial through models = [m_i, m_{i+1}, m_{i+2}] in lambda.
    d2_scale = 1 is the dpm-solver / diffusers multistep code's D2 (half of h^2 x0'')."""
    h = lam[i - 1] - lam[i]
    out = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * np.expm1(-h) * models[0]
    if order == 1:
        return out
    h0 = lam[i] - lam[i + 1]
    if order == 2:   # Alg. 2 (2M): D = (1 + 1/(2r)) m_i - 1/(2r) m_{i+1}, r = h0 / h
        r = h0 / h
        d = (1 + 1 / (2 * r)) * models[0] - models[1] / (2 * r)
        return sigma[i - 1] / sigma[i] * x - alpha[i - 1] * np.expm1(-h) * d
    h1 = lam[i + 1] - lam[i + 2]
    # Newton form in lambda: slope at lambda_i and the second divided difference.
    f01 = (models[0] - models[1]) / h0
    f12 = (models[1] - models[2]) / h1
    f012 = (f01 - f12) / (h0 + h1)
    first = h * (f01 + f012 * h0)          # h x0'(lambda_i)
    second = d2_scale * h * h * f012       # h^2 x0'' (d2_scale = 2)
    phi_2 = np.expm1(-h) / h + 1.0
    phi_3 = phi_2 / h - 0.5
    return out + alpha[i - 1] * phi_2 * first - alpha[i - 1] * phi_3 * second


def ref_multistep_chain(method, abar, x_T, model, d2_scale=2.0):
    """`ref_multistep_chain_on_path` on the VP process over the kept steps' abar."""
    return ref_multistep_chain_on_path(method, np.sqrt(abar), np.sqrt(1.0 - abar), x_T, model,
                                       d2_scale)


def ref_multistep_chain_on_path(method, alpha, sigma, x_T, model, d2_scale=2.0):
    """Whole DPM-Solver++(2M / 3M) or UniPC chain, list-based as the papers' algorithms, on the
    path x = alpha x0 + sigma eps given at the K kept levels (index 0 the cleanest), in that
    path's frame; model(x, i) is the data prediction at kept index i. Returns every point handed
    to the model, then x0."""
    num = len(alpha)
    lam = np.log(alpha / sigma)
    orders = dpm_orders(method, num)
    x, models, last, points = x_T, [], None, [x_T]
    for i in range(num - 1, -1, -1):
        m = model(x, i)
        if method == "unipc" and last is not None:   # UniC on the step from i+1 to i
            x = ref_unipc_update(last, [m] + models, lam, alpha, sigma, i + 1, orders[i + 1],
                                 corrector=True)
        models = [m] + models
        if i == 0:
            x = m
        elif method == "unipc":
            last = x
            x = ref_unipc_update(x, models, lam, alpha, sigma, i, orders[i], corrector=False)
        else:
            x = ref_dpm3m_step(x, models, lam, alpha, sigma, i, orders[i], d2_scale)
        points.append(x)
    return np.stack(points)


def phi(k, z):
    """phi_k(z) = int_0^1 e^{(1-s) z} s^{k-1} / (k-1)! ds: phi_1 = (e^z - 1)/z,
    phi_{k+1} = (phi_k - 1/k!) / z."""
    value = np.expm1(z) / z
    for n in range(1, k):
        value = (value - 1.0 / math.factorial(n)) / z
    return value


def ref_unipc_update(x, models, lam, alpha, sigma, start, order, corrector):
    """Zhao et al. 2023 (UniPC), B(h) = e^h - 1 (bh2), data prediction, from kept index
    `start` to start - 1. models[0] is the new m_{start-1} for the corrector (UniC), else
    models[0] = m_start. With hh = -h, r_k = (lambda_{start+k} - lambda_start) / h, the paper's
    R_p rows r^0 .. r^{p-1} and g_n = hh phi_{n+1}(hh) n! / B(h); UniP-2 uses rho = 1/2 and
    UniC-1 rho = 1/2."""
    shift = 1 if corrector else 0
    m_start = models[shift]
    h = lam[start - 1] - lam[start]
    hh = -h
    b_h = np.expm1(hh)
    rks = [(lam[start + k] - lam[start]) / h for k in range(1, order)]
    diffs = [(models[shift + k] - m_start) / rks[k - 1] for k in range(1, order)]
    g = np.array([hh * phi(n + 1, hh) * math.factorial(n) / b_h for n in range(1, order + 1)])
    if corrector:
        rows = np.array([[r ** n for r in rks + [1.0]] for n in range(order)])
        rho = np.array([0.5]) if order == 1 else np.linalg.solve(rows, g)
        diffs = diffs + [models[0] - m_start]
    elif order == 1:
        rho = np.zeros(0)
    elif order == 2:
        rho = np.array([0.5])
    else:
        rows = np.array([[r ** n for r in rks] for n in range(order - 1)])
        rho = np.linalg.solve(rows, g[:-1])
    result = (sigma[start - 1] / sigma[start] * x - alpha[start - 1] * np.expm1(-h) * m_start)
    return result - alpha[start - 1] * b_h * sum(r * d for r, d in zip(rho, diffs, strict=True))


def ref_edm_chain(abar_kept, x_T, denoise, churn, model_abar, noises):
    """`ref_heun_chain` on the VP process's kept steps from x_T in the VP frame, sigma_hat
    snapped to the model's levels (model_abar); returns x0 (VP = EDM at sigma = 0)."""
    sig = np.sqrt((1.0 - abar_kept) / abar_kept)
    model_sig = np.sqrt((1.0 - model_abar) / model_abar)
    points = ref_heun_chain(sig, x_T * np.sqrt(1.0 + sig[-1] ** 2), denoise, churn, noises,
                            model_sig)
    return points[-1][1]


def ref_heun_chain(levels, y_T, denoise, churn, noises, snap_levels=None):
    """Karras et al. 2022, Alg. 2 (Alg. 1 at churn = 0) with S_tmin = 0, S_tmax = inf,
    S_noise = 1, in EDM's variables y = x / alpha and sigma = the ascending `levels` s = sigma /
    alpha; the last step is Euler to sigma = 0. sigma_hat = sigma (1 + gamma), gamma =
    min(churn / K, sqrt(2) - 1), snapped to the nearest of `snap_levels` in log sigma when given
    (a discrete model's levels). denoise(y, sigma) = D; noises[m] the z of step m.

    Returns [(level, y)]: y_T, then after each evaluation the point it leads to (Euler, then
    Heun, per step)."""
    num = len(levels)
    gamma = min(churn / num, math.sqrt(2.0) - 1.0)
    y, points = y_T, [(levels[-1], y_T)]
    for m, k in enumerate(range(num - 1, -1, -1)):
        s_cur = levels[k]
        s_hat = s_cur
        if gamma > 0:
            s_hat = s_cur * (1 + gamma)
            if snap_levels is not None:
                s_hat = snap_levels[np.argmin(np.abs(np.log(snap_levels) - np.log(s_hat)))]
        y_hat = y + np.sqrt(max(s_hat ** 2 - s_cur ** 2, 0.0)) * noises[m]
        s_next = levels[k - 1] if k > 0 else 0.0
        d = (y_hat - denoise(y_hat, s_hat)) / s_hat
        y = y_hat + (s_next - s_hat) * d
        points.append((s_next, y))
        if s_next > 0:
            d_next = (y - denoise(y, s_next)) / s_next
            y = y_hat + (s_next - s_hat) * 0.5 * (d + d_next)
            points.append((s_next, y))
    return points


def pf_ode_solution(x_T, u_start, u_end, denoise, steps=4000):
    """The probability-flow ODE from u = log sigma = u_start down to u_end by classic RK4 in
    float64, in y = x / alpha: dy/du = y - D(y; e^u) (Karras et al. eq. 3 with sigma = e^u),
    from x_T in the VP frame; returns D at the end, the quantity every solver outputs.
    denoise(y, sigma) = D."""
    u = np.linspace(u_start, u_end, steps + 1)

    def f(y, uu):
        return y - denoise(y, np.exp(uu))

    y = x_T * np.sqrt(1.0 + np.exp(2.0 * u[0]))
    for j in range(steps):
        h = u[j + 1] - u[j]
        k1 = f(y, u[j])
        k2 = f(y + 0.5 * h * k1, u[j] + 0.5 * h)
        k3 = f(y + 0.5 * h * k2, u[j] + 0.5 * h)
        k4 = f(y + h * k3, u[j + 1])
        y = y + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return denoise(y, np.exp(u[-1]))


def fitted_order(nfes, errors):
    """The slope of -log(error) against log(NFE): the measured order of convergence."""
    return -np.polyfit(np.log(nfes), np.log(errors), 1)[0]


def rms(a, b):
    return float(np.sqrt(np.mean((np.asarray(a) - b) ** 2)))
