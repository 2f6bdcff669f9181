"""Reverse-process samplers: one table of methods, each run as one `jax.lax.scan`.

methods.py      the table: one `SamplerSpec` row per config.sample.method (plan, NFE rule,
                knobs); `register` adds a method
chain.py        `sample`: a method's plan run by one scan over the kept timesteps
plan.py         `Chain` (what a method is given) and `Plan` (how it runs)
steps.py        single steps: DDPM, DDIM, and the DDIM/Euler/Heun steps between two levels
ancestral.py    DDPM and DDIM chains
multistep.py    DPM-Solver++(2M/3M) and UniPC on data predictions
heun.py         EDM's Heun sampler (Alg. 1; Alg. 2 with churn)
tables.py       the float64 coefficient tables of the multistep and Heun samplers
guidance.py     classifier-free guidance as a model function
from_config.py  the sampler config.sample describes: checks, respacing, `sample_from_config`
consistency.py  multistep consistency sampling of consistency students

Adding a sampler is one module with its plan (`Chain -> Plan`) and one `register` call.
"""
from jax_diffusion.samplers.chain import sample
from jax_diffusion.samplers.from_config import (chain_diffusion, check_sample_config,
                                                sample_from_config, with_method)
from jax_diffusion.samplers.guidance import LabelModelFn, guided_model_fn
from jax_diffusion.samplers.methods import KNOB_DEFAULTS, METHODS, SamplerSpec, register, spec_of
from jax_diffusion.samplers.plan import Chain, Plan
from jax_diffusion.samplers.steps import ddim_step, ddpm_step

__all__ = ["KNOB_DEFAULTS", "METHODS", "Chain", "LabelModelFn", "Plan", "SamplerSpec",
           "chain_diffusion", "check_sample_config", "ddim_step", "ddpm_step",
           "guided_model_fn", "register", "sample", "sample_from_config", "spec_of",
           "with_method"]
