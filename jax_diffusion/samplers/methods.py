"""The method table: one `SamplerSpec` row per value of config.sample.method.

A row says how the method runs (its `plan`), how many network evaluations (NFE) a chain over K
kept timesteps costs, and which of the per-method config.sample knobs it reads. Everything that
differs between methods (the sampler, the config check, the NFE sweep, the benchmark) reads it
from here, so adding a sampler is one module with its plan plus one `register` call.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np

from jax_diffusion.samplers.ancestral import ddim_plan, ddpm_plan, euler_plan
from jax_diffusion.samplers.heun import edm_heun_plan
from jax_diffusion.samplers.multistep import multistep_plan
from jax_diffusion.samplers.plan import Chain, Plan

# config.sample.schedule="auto", per process (docs/sampling.md, docs/recipes.md):
# the first-order ancestral and Euler steps on each process's own grid of time (DDIM's even
# timesteps on vp, even t on flow; EDM's rho-7 grid, as even s wastes them at high noise), the
# multistep solvers even in log-SNR, Heun on EDM's grid.
TIME_GRIDS = {"vp": "uniform", "edm": "karras", "flow": "uniform"}
LOGSNR_GRIDS = {"vp": "logsnr", "edm": "logsnr", "flow": "logsnr"}
KARRAS_GRIDS = {"vp": "karras", "edm": "karras", "flow": "karras"}

# The config.sample keys that only some methods read, with the value that means "unused".
KNOB_DEFAULTS = {"eta": 0.0, "churn": 0.0}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """One sampling method.

    plan: builds the method's scan from a `Chain`.
    knobs: the keys of KNOB_DEFAULTS it reads (every other knob must keep its default).
    evaluations_per_step: NFE of each kept timestep but the last, which costs one (Heun: 2, so
        K steps cost 2K - 1; every other method: 1, so K steps cost K).
    auto_schedules: the step schedule config.sample.schedule="auto" picks, per process.
    """
    name: str
    plan: Callable[[Chain], Plan]
    knobs: tuple[str, ...] = ()
    evaluations_per_step: int = 1
    auto_schedules: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: dict(TIME_GRIDS))

    def num_evaluations(self, num_steps: int) -> int:
        """NFE of a chain over `num_steps` kept timesteps."""
        return self.evaluations_per_step * (num_steps - 1) + 1

    def chain_steps(self, nfe: int) -> int:
        """The number K of kept timesteps a chain of `nfe` evaluations visits."""
        return (nfe - 1) // self.evaluations_per_step + 1

    def nfe_problem(self, nfe) -> str | None:
        """Why this method cannot spend exactly `nfe` network evaluations, or None if it can."""
        if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)) or nfe < 1:
            return "must be a positive integer"
        per_step = self.evaluations_per_step
        if (nfe - 1) % per_step:
            below = nfe - (nfe - 1) % per_step
            form = "odd" if per_step == 2 else f"{per_step} K - {per_step - 1}"
            return (f"must be {form} for {self.name} (each step costs {per_step} evaluations, "
                    f"the last one 1), e.g. {below} or {below + per_step}")
        return None


# Names used by checks outside the repository: the keys are the values of config.sample.method.
METHODS: dict[str, SamplerSpec] = {}


def register(spec: SamplerSpec) -> SamplerSpec:
    """Add a method to the table (a new name, or replace an existing row); returns the spec."""
    unknown = set(spec.knobs) - set(KNOB_DEFAULTS)
    if unknown:
        raise ValueError(f"sampler {spec.name!r} reads unknown knobs {sorted(unknown)}; "
                         f"known: {', '.join(KNOB_DEFAULTS)}")
    if spec.evaluations_per_step < 1:
        raise ValueError(f"sampler {spec.name!r}: evaluations_per_step must be >= 1")
    METHODS[spec.name] = spec
    return spec


def spec_of(method: str) -> SamplerSpec:
    """The row of `method`; ValueError naming the allowed ones for an unknown name."""
    if method not in METHODS:
        raise ValueError(f"unknown sampling method {method!r}; allowed: {', '.join(METHODS)}")
    return METHODS[method]


def methods_reading(knob: str) -> list[str]:
    """The methods that read `knob`."""
    return [name for name, spec in METHODS.items() if knob in spec.knobs]


register(SamplerSpec("ddpm", ddpm_plan))
register(SamplerSpec("ddim", ddim_plan, knobs=("eta",)))
register(SamplerSpec("euler", euler_plan))
register(SamplerSpec("dpm_solver++", multistep_plan, auto_schedules=LOGSNR_GRIDS))   # 2M
register(SamplerSpec("dpm_solver++3m", multistep_plan, auto_schedules=LOGSNR_GRIDS))
register(SamplerSpec("unipc", multistep_plan, auto_schedules=LOGSNR_GRIDS))  # UniPC-3 + UniC
register(SamplerSpec("edm_heun", edm_heun_plan, knobs=("churn",), evaluations_per_step=2,
                     auto_schedules=KARRAS_GRIDS))
