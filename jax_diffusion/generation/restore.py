"""Restoring a workdir for sampling: the parameters of the chosen checkpoint onto the current
devices, and for a distilled student the sampler its checkpoint records."""
from __future__ import annotations

import logging

import flax.linen as nn
import ml_collections

from jax_diffusion.diffusion import check_trained_with
from jax_diffusion.errors import ConfigError
from jax_diffusion.runtime import parallel
from jax_diffusion.samplers import consistency
from jax_diffusion.training import checkpoints, power_ema
from jax_diffusion.training.train_state import abstract_train_state


def restore_for_sampling(config: ml_collections.ConfigDict, workdir: str, mesh,
                         model: nn.Module) -> tuple[object, int]:
    """(params, step): EMA (or raw, or the tracked power EMA of config.sample.ema_sigma_rel)
    parameters of the chosen checkpoint, replicated on `mesh`.
    A checkpoint trained with another diffusion (schedule, T, parametrisation, variance,
    timestep scaling) is refused: its network's output would be read wrongly."""
    manager = checkpoints.create_manager(workdir, read_only=True)
    step = checkpoints.select_step(manager, config.sample.checkpoint_step)
    saved = checkpoints.restore_config(manager, step)
    check_trained_with(saved.get("diffusion", {}), config.diffusion,
                       f"{checkpoints.checkpoint_dir(workdir)}/{step}")
    template = abstract_train_state(config, model)
    if config.sample.ema_sigma_rel:   # a power EMA the run tracked
        params = power_ema.restore_tracked(manager, step, saved, template.params,
                                           parallel.replicated(mesh), config.sample.ema_sigma_rel)
        return params, step
    params = checkpoints.restore_params(manager, step, template, parallel.replicated(mesh),
                                        use_ema=config.sample.use_ema)
    return params, step


def student_config(config: ml_collections.ConfigDict, workdir: str
                   ) -> ml_collections.ConfigDict:
    """`config`, or for the workdir of a distilled student (--mode=distill) a copy that samples
    it as its checkpoint records: its parametrisation, sampler, eta, schedule and guidance,
    whatever config.sample says for teachers, with config.sample.num_steps steps.

    A progressive workdir keeps one student per stage: config.sample.num_steps picks the stage
    with that step count (config.sample.checkpoint_step >= 0 picks one directly), and a count no
    stage holds is a ConfigError naming the ones it holds. A consistency student samples with
    any config.sample.num_steps below its distill.num_scales (the levels it was trained on);
    another count is a ConfigError."""
    manager = checkpoints.create_manager(workdir, read_only=True)
    if not manager.all_steps():
        return config  # restore_for_sampling names the problem
    latest = checkpoints.restore_config(manager, manager.latest_step())
    if not latest.get("distill", {}).get("student_steps", 0):
        return config
    num_steps = config.sample.num_steps
    if config.sample.checkpoint_step >= 0:
        step = checkpoints.select_step(manager, config.sample.checkpoint_step)
    elif latest["sample"]["method"] == consistency.SAMPLER:
        step = manager.latest_step()
    else:
        per_stage = latest["distill"]["steps_per_stage"]
        stages = {checkpoints.restore_config(manager, s)["distill"]["student_steps"]: s
                  for s in manager.all_steps() if s % per_stage == 0}
        if num_steps not in stages:
            held = " or ".join(map(str, sorted(stages)))
            raise ConfigError(f"{workdir} holds distilled students that sample in {held} steps; "
                              f"config.sample.num_steps={num_steps} is not one of them: set "
                              f"--config.sample.num_steps to one of them")
        step = stages[num_steps]
    record = checkpoints.restore_config(manager, step)
    effective = ml_collections.ConfigDict(config.to_dict())
    effective.diffusion.mean_type = record["diffusion"]["mean_type"]
    for key in ("method", "eta", "num_steps", "schedule", "guidance_scale"):
        effective.sample[key] = record["sample"][key]
    effective.sample.checkpoint_step = step
    for key, value in record["distill"].items():   # the method and its parametrisation
        if key in effective.distill:
            effective.distill[key] = value
    if effective.sample.method == consistency.SAMPLER:
        levels = effective.distill.num_scales
        if not 1 <= num_steps < levels:
            raise ConfigError(f"{workdir} holds a consistency model trained on {levels} noise "
                              f"levels; config.sample.num_steps={num_steps} must lie in 1.."
                              f"{levels - 1}: set e.g. --config.sample.num_steps=1")
        effective.sample.num_steps = num_steps
    logging.info("Distilled student: checkpoint %d, %s with %d steps, eta %g", step,
                 effective.sample.method, effective.sample.num_steps, effective.sample.eta)
    return effective
