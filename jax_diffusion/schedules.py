"""Noise schedules and timestep respacing.

Everything here is plain float64 numpy: schedules are computed once on the host and cast to the
compute dtype where they are used.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import numpy as np

SCHEDULES = ("linear", "cosine")
STEP_SCHEDULES = ("uniform", "quadratic", "logsnr", "karras", "trailing")
# The schedules a continuous process (edm, flow) defines: every one spaced between two levels.
LEVEL_SCHEDULES = ("uniform", "quadratic", "logsnr", "karras")
KARRAS_RHO = 7.0   # Karras et al. 2022, eq. 5: rho = 7 spends the steps near sigma_min
# Karras et al. 2022, Table 1 ("ours", every model, the VP and cosine ones included): the largest
# sigma sampled, the default top of the sigma-based step schedules (logsnr, karras). A cosine
# schedule's last step has sigma ~ 2e4: a grid from there puts several of 10 steps above
# sigma = 300, where x_t is pure noise.
SIGMA_MAX = 80.0
SIGMA_SCHEDULES = ("logsnr", "karras")   # the step schedules spaced in sigma, bounded by it


def get_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas beta_1..beta_T as float64 [T].

    linear (Ho et al. 2020): evenly spaced from 1e-4 to 0.02, both scaled by 1000/T so that
        any T gives roughly the same total amount of noise.
    cosine (Nichol & Dhariwal 2021): abar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008,
        beta_t = 1 - abar(t+1)/abar(t), clipped at 0.999 to avoid the singularity at t = T.
    """
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps={num_timesteps!r} must be a positive integer")
    if name == "linear":
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        s = 0.008
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise ValueError(f"unknown beta schedule {name!r}; allowed: {', '.join(SCHEDULES)}")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The timesteps kept when respacing a T-step process, as in Improved DDPM.

    The T steps are cut into len(section_counts) equal sections (the first T % n one step
    longer); section i keeps section_counts[i] steps spread evenly from its first to its last
    step. section_counts is a list like [10, 15, 20], a string "10,15,20", or "ddimN": the
    stride-k set range(0, T, k) that has exactly N elements, as DDIM uses.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = _parse_int(section_counts[len("ddim"):], section_counts)
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            possible = sorted({len(range(0, num_timesteps, k))
                               for k in range(1, num_timesteps + 1)})
            raise ValueError(
                f"section_counts={section_counts!r}: no integer stride gives exactly {desired} "
                f"steps out of {num_timesteps}; allowed ddimN: N in "
                f"{', '.join(map(str, possible))}, or use a plain count such as '{desired}'")
        section_counts = [_parse_int(part, section_counts) for part in section_counts.split(",")]
    counts = list(section_counts)
    if not counts:
        raise ValueError("section_counts is empty; give at least one step count")
    size_per, extra = divmod(num_timesteps, len(counts))
    kept: set[int] = set()
    start = 0
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if not 1 <= count <= size:
            raise ValueError(
                f"section_counts={counts}: section {i} has {size} of the {num_timesteps} steps, "
                f"so its count must be between 1 and {size}, got {count}")
        stride = (size - 1) / (count - 1) if count > 1 else 1.0
        # Accumulate the fractional stride exactly as Improved DDPM does: round(j * stride)
        # differs from it where j * stride is x.5 (e.g. T=300, "10,15,20": 149, not 150).
        position = 0.0
        for _ in range(count):
            kept.add(start + round(position))
            position += stride
        start += size
    return kept


def logsnr_timesteps(num_timesteps: int, n: int, schedule: str | np.ndarray,
                     sigma_min: float = 0.0, sigma_max: float = math.inf) -> set[int]:
    """n timesteps of a T-step process spaced evenly in log-SNR, log(abar_t / (1 - abar_t)).

    DPM-Solver++ takes steps of equal size in lambda, so at few steps this spacing puts them
    where the solution changes. `schedule` is a schedule name or the betas themselves. The grid
    spans sigma = sqrt((1 - abar) / abar) from max(sigma_0, sigma_min) to min(sigma_{T-1},
    sigma_max) (by default t = 0 to t = T-1), each level at the timestep nearest by linear
    interpolation in log-SNR; nearby duplicates are pushed apart so exactly n distinct steps remain.
    """
    if isinstance(schedule, str):
        betas = get_beta_schedule(schedule, num_timesteps)
    else:
        betas = np.asarray(schedule, dtype=np.float64)
        if betas.shape != (num_timesteps,):
            raise ValueError(f"betas have shape {betas.shape}, expected ({num_timesteps},)")
    if not 2 <= n <= num_timesteps:
        raise ValueError(f"n={n} steps must be between 2 and num_timesteps={num_timesteps}")
    alphas_cumprod = np.cumprod(1.0 - betas)
    logsnr = np.log(alphas_cumprod) - np.log1p(-alphas_cumprod)  # decreasing in t
    lowest, highest = sigma_bounds(alphas_cumprod, sigma_min, sigma_max)
    targets = np.linspace(-2.0 * np.log(lowest), -2.0 * np.log(highest), n)
    # np.interp needs increasing x: interpolate t as a function of -lambda.
    ts = np.rint(np.interp(-targets, -logsnr, np.arange(num_timesteps)))
    return set(int(t) for t in _distinct(ts, num_timesteps))


def edm_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sigma_t = sqrt((1 - abar_t) / abar_t), float64: the noise level of x_t / sqrt(abar_t) in
    the EDM view (Karras et al. 2022) of a VP process."""
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    return np.sqrt((1.0 - abar) / abar)


def sigma_bounds(alphas_cumprod: np.ndarray, sigma_min: float,
                 sigma_max: float) -> tuple[float, float]:
    """(lowest, highest) sigma of a sigma-spaced grid: the process's own range [sigma_0,
    sigma_{T-1}] narrowed to [sigma_min, sigma_max]; ValueError when nothing is left."""
    sigma_0, sigma_last = edm_sigmas(np.asarray(alphas_cumprod)[[0, -1]])
    lowest, highest = max(sigma_0, sigma_min), min(sigma_last, sigma_max)
    if not lowest < highest:
        raise ValueError(f"sigma_min={sigma_min:g} and sigma_max={sigma_max:g} leave no range "
                         f"inside this process's sigmas [{sigma_0:.3g}, {sigma_last:.3g}]")
    return float(lowest), float(highest)


def trailing_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """The grid t_i = floor((i + 1) T / N) - 1, i = 0..N-1 (int64, ascending).

    It always starts sampling at t = T - 1 (pure noise; the few-step regime needs that), and it
    nests under halving: for even N the grid of N/2 steps is the odd-indexed half of the grid of
    N steps, so one student step spans exactly two teacher steps."""
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps={num_steps} must lie in [1, {num_timesteps}]")
    i = np.arange(1, num_steps + 1, dtype=np.int64)
    return i * num_timesteps // num_steps - 1


def step_timesteps(name: str, num_timesteps: int, count: int, betas: np.ndarray,
                   sigma_min: float = 0.0, sigma_max: float = SIGMA_MAX) -> np.ndarray:
    """The `count` timesteps a sampler visits, ascending int64, for the step schedule `name`.

    uniform:   even in t, as Improved DDPM respaces: the DDIM stride range(0, T, k) when one
               gives exactly `count` steps, else `count` even sections (space_timesteps).
    quadratic: t_j = (T-1) (j / (count-1))^2, dense near t = 0 (DDIM's CIFAR-10 spacing; DDIM
               stops at 0.8 T for its linear betas, here the grid spans all T steps so that
               every beta schedule starts from noise).
    logsnr:    even in log-SNR (logsnr_timesteps) between the sigma bounds below.
    karras:    sigma_j^(1/rho) even from sigma_max^(1/rho) to sigma_min^(1/rho), rho = 7
               (Karras et al. 2022, eq. 5), each mapped to the timestep nearest in log sigma.
    trailing:  t_i = floor((i + 1) T / count) - 1 (`trailing_timesteps`): starts at T - 1 and
               nests under halving; the grid progressive distillation trains students on.

    The sigma-spaced schedules (SIGMA_SCHEDULES) span sigma = sqrt((1 - abar) / abar) from
    max(sigma(t = 0), sigma_min) to min(sigma(t = T-1), sigma_max). The default sigma_max = 80
    is EDM's (their Table 1): a grid on linear betas (sigma_{T-1} = 157) or the cosine schedule
    (2e4) starts at the timestep nearest sigma = 80, from pure noise as DDIM's stride starts
    below T-1. A sigma_min above sigma(t = 0) ends the grid early (the last step then denoises
    from there), as the dpm-solver reference ends few-step chains earlier (t_end 1e-3 up to 15
    steps, 1e-4 above, for continuous-time models). The t-spaced schedules ignore both bounds.
    quadratic keeps t = 0 and t = T-1 (count >= 2); count = 1 is t = T-1 for every schedule
    but uniform. Coinciding steps are pushed apart so that exactly `count` distinct steps remain.
    """
    if not 1 <= count <= num_timesteps:
        raise ValueError(f"count={count} steps must be between 1 and num_timesteps={num_timesteps}")
    if name == "uniform":
        try:
            kept = space_timesteps(num_timesteps, f"ddim{count}")
        except ValueError:   # no integer stride gives exactly `count` steps
            kept = space_timesteps(num_timesteps, str(count))
        return np.array(sorted(kept), dtype=np.int64)
    if name not in STEP_SCHEDULES:
        raise ValueError(f"unknown step schedule {name!r}; allowed: {', '.join(STEP_SCHEDULES)}")
    if name == "trailing":
        return trailing_timesteps(num_timesteps, count)
    if count == 1:
        return np.array([num_timesteps - 1], dtype=np.int64)
    if name == "logsnr":
        return np.array(sorted(logsnr_timesteps(num_timesteps, count, betas, sigma_min,
                                                sigma_max)), dtype=np.int64)
    fraction = np.linspace(0.0, 1.0, count)
    if name == "quadratic":
        return _distinct(np.rint((num_timesteps - 1) * fraction ** 2), num_timesteps)
    abar = _alphas_cumprod(betas, num_timesteps)
    log_sigma = 0.5 * (np.log1p(-abar) - np.log(abar))   # increasing in t
    lowest, highest = sigma_bounds(abar, sigma_min, sigma_max)
    inv_rho = 1.0 / KARRAS_RHO
    targets = (highest ** inv_rho + fraction * (lowest ** inv_rho - highest ** inv_rho)
               ) ** KARRAS_RHO
    nearest = np.argmin(np.abs(np.log(targets)[:, None] - log_sigma[None, :]), axis=1)
    return _distinct(np.sort(nearest), num_timesteps)


def level_grid(name: str, count: int, lowest: float, highest: float,
               time: Callable[[np.ndarray], np.ndarray] = lambda s: s,
               level: Callable[[np.ndarray], np.ndarray] = lambda t: t) -> np.ndarray:
    """`count` noise levels s = sigma / alpha of a continuous process, ascending float64, from
    `lowest` to `highest` (count = 1: the highest alone). `time` maps a level to the process's
    own time and `level` back (EDM: t = s; rectified flow: t = s / (1 + s)).

    uniform:   even in the process's time (rectified flow's grid in t; even in s for EDM).
    quadratic: t_j = t_lo + (t_hi - t_lo) (j / (count - 1))^2, dense at the clean end.
    logsnr:    even in log s (= -log-SNR / 2), as DPM-Solver steps.
    karras:    s_j^(1/rho) even from highest^(1/rho) to lowest^(1/rho), rho = 7 (Karras et al.
               2022, eq. 5).
    """
    if name not in LEVEL_SCHEDULES:
        raise ValueError(f"step schedule {name!r} is not defined on a continuous process; "
                         f"allowed: {', '.join(LEVEL_SCHEDULES)}")
    if count < 1 or not 0.0 < lowest < highest:
        raise ValueError(f"need count >= 1 and 0 < lowest < highest, got {count}, {lowest}, "
                         f"{highest}")
    if count == 1:
        return np.array([highest], dtype=np.float64)
    fraction = np.linspace(0.0, 1.0, count)
    if name in ("uniform", "quadratic"):
        t_lo, t_hi = time(np.float64(lowest)), time(np.float64(highest))
        levels = level(t_lo + (t_hi - t_lo) * (fraction if name == "uniform" else fraction ** 2))
    elif name == "logsnr":
        levels = np.exp(np.linspace(np.log(lowest), np.log(highest), count))
    else:
        inv_rho = 1.0 / KARRAS_RHO
        levels = (highest ** inv_rho + fraction[::-1] * (lowest ** inv_rho - highest ** inv_rho)
                  ) ** KARRAS_RHO
    levels = np.asarray(levels, dtype=np.float64)
    levels[0], levels[-1] = lowest, highest   # exact ends, whatever the round trip through t
    return levels


def _alphas_cumprod(betas: np.ndarray, num_timesteps: int) -> np.ndarray:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.shape != (num_timesteps,):
        raise ValueError(f"betas have shape {betas.shape}, expected ({num_timesteps},)")
    return np.cumprod(1.0 - betas)


def _distinct(ts: np.ndarray, num_timesteps: int) -> np.ndarray:
    """Ascending ts made strictly increasing inside [0, T-1]: each step moved as little as
    needed (up from the first, then down from the last one, which stays unless the steps below
    it pushed it up; below the first only when the steps above it are too many)."""
    ts = np.asarray(ts, dtype=np.int64).copy()
    ts[0] = max(ts[0], 0)
    for i in range(1, len(ts)):
        ts[i] = max(ts[i], ts[i - 1] + 1)
    ts[-1] = min(ts[-1], num_timesteps - 1)
    for i in range(len(ts) - 2, -1, -1):
        ts[i] = min(ts[i], ts[i + 1] - 1)
    return ts


def respaced_betas(betas: np.ndarray, use_timesteps: Collection[int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the process that visits only `use_timesteps`, and the map to original steps.

    Keeps abar at the kept steps unchanged: beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}.
    """
    num_timesteps = len(betas)
    kept = sorted(set(int(t) for t in use_timesteps))
    if not kept:
        raise ValueError("use_timesteps is empty; keep at least one timestep")
    if kept[0] < 0 or kept[-1] >= num_timesteps:
        raise ValueError(
            f"use_timesteps must lie in [0, {num_timesteps - 1}], got {kept[0]}..{kept[-1]}")
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    kept_abar = alphas_cumprod[kept]
    previous = np.concatenate([[1.0], kept_abar[:-1]])
    return 1.0 - kept_abar / previous, np.asarray(kept, dtype=np.int64)


def _parse_int(text: str, whole: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f"section_counts={whole!r} is not understood; use 'ddimN' or comma-separated "
            f"integers such as '10,15,20'") from None
