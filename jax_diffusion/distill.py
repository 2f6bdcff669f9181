"""--mode=distill: few-step students of a trained model, by progressive distillation (Salimans &
Ho 2022) or consistency distillation (Song et al. 2023). One loop (`distill`) runs either; what
differs is a row of the method table `METHODS`.

The teacher is the EMA weights of the latest checkpoint in config.distill.teacher_workdir. A
class-conditional teacher is distilled with the guidance scale config.distill.guidance_scale
baked in: the student takes the label and no w (its sampler runs unguided).

progressive: the teacher is sampled by DDIM (eta 0) with config.distill.teacher_steps steps on
the trailing grid (schedules.trailing_timesteps). Each of config.distill.num_halvings stages
trains a student, initialised from its teacher, to take in ONE step what its teacher takes in
two (distill_targets.progressive_target, x-space loss weighted by max(SNR, 1)), with the
parametrisation config.distill.mean_type and a fresh optimizer; the stage's EMA student is the
next stage's teacher.

consistency: one stage of config.distill.steps_per_stage steps trains the consistency model
f(x, sigma) = c_skip x + c_out F (consistency.py; F is the teacher's network and head, the
student starts as the teacher) so that f at a level t_{n+1} of the grid
distill_targets.consistency_timesteps (config.distill.num_scales levels) matches f of the
target network theta^- at the teacher's one ODE step (config.distill.solver: Heun or Euler =
DDIM) to the level t_n below, under the pseudo-Huber distance. theta^- is the EMA of the
student with decay config.distill.target_decay (mu; 0: the student itself under stop_gradient,
the paper's CIFAR-10 setting), kept in the optimizer state; the sampled student is the EMA with
config.distill.ema_decay, as in progressive. Sampled by the multistep consistency sampler with
any config.sample.num_steps (consistency.sample).

Checkpoints are ordinary training checkpoints in `workdir` at a global step (stage s ends at
(s + 1) * steps_per_stage; those are never deleted, so every stage's student stays). Each
records as its config the sampler the student needs (sample.method, eta 0, num_steps, schedule,
guidance 1, diffusion.mean_type and distill.student_steps), which `sampling.student_config`
reads for --mode=sample and --mode=eval. Batches, seed, gradient clipping, logging and
checkpoint intervals come from config.train; SIGTERM and NaN are handled as in training, and a
resumed run repeats the uninterrupted one bitwise.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax_diffusion import (checkpoints, consistency, data, distill_targets, loop_events, parallel,
                           samplers, sampling, tensorboard_writer)
from jax_diffusion.diffusion import GaussianDiffusion, create_diffusion, mean_flat
from jax_diffusion.errors import CheckpointError, ConfigError
from jax_diffusion.metric_window import MetricWindow
from jax_diffusion.models import create_model
from jax_diffusion.train_step import apply_if_finite, jit_steps
from jax_diffusion.train_state import TrainState, abstract_train_state, create_optimizer

# diffusion keys a teacher checkpoint must share with the config: they define its timesteps.
_DIFFUSION_KEYS = ("schedule", "num_timesteps", "mean_type", "var_type")


def student_steps_of_stage(config: ml_collections.ConfigDict, stage: int) -> int:
    """Sampling steps of the student that stage `stage` (0-based) trains."""
    return config.distill.teacher_steps // 2 ** (stage + 1)


def _student_record(config: ml_collections.ConfigDict, mean_type: str, sampler: str,
                    student_steps: int) -> ml_collections.ConfigDict:
    """The config a student's checkpoints record: its parametrisation, and its sampler on the
    trailing grid with eta 0 and no guidance (the teacher's guidance is distilled in)."""
    record = ml_collections.ConfigDict(config.to_dict())
    record.diffusion.mean_type = mean_type
    record.sample.method = sampler
    record.sample.eta = 0.0
    record.sample.num_steps = student_steps
    record.sample.schedule = "trailing"
    record.sample.guidance_scale = 1.0
    record.distill.student_steps = student_steps
    return record


def stage_config(config: ml_collections.ConfigDict, student_steps: int
                 ) -> ml_collections.ConfigDict:
    """The config a progressive stage's checkpoints record: the student in
    config.distill.mean_type, sampled by DDIM in `student_steps` steps."""
    return _student_record(config, config.distill.mean_type, "ddim", student_steps)


def _optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW at the constant config.distill.lr, clipped as in training."""
    return create_optimizer(ml_collections.ConfigDict({
        "lr": config.distill.lr, "warmup_steps": 0, "lr_schedule": "constant",
        "grad_clip": config.train.grad_clip, "weight_decay": config.train.weight_decay}))


def teacher_x0_fn(model: nn.Module, diffusion: GaussianDiffusion, params, labels,
                  config: ml_collections.ConfigDict) -> distill_targets.X0Fn:
    """x0_fn(x, original timesteps) of the teacher as its sampler sees it: guided with
    config.distill.guidance_scale for a class-conditional model, clipped per
    config.sample.clip_denoised. `diffusion` is the full T-step one in the teacher's
    parametrisation, so its indices are the original timesteps."""
    num_classes, scale = config.model.num_classes, config.distill.guidance_scale

    def conditional(x, t, y):
        return model.apply({"params": params}, x, t, y, train=False)

    if num_classes > 0 and scale != 1.0:
        model_fn = samplers.guided_model_fn(conditional, labels, num_classes, scale)
    else:
        model_fn = lambda x, t: conditional(x, t, labels)  # noqa: E731

    def x0_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        return diffusion.p_mean_variance(model_fn, x, t,
                                         config.sample.clip_denoised)["pred_xstart"]

    return x0_fn


def _with_mean_type(diffusion_config: ml_collections.ConfigDict, mean_type: str
                    ) -> ml_collections.ConfigDict:
    copy = ml_collections.ConfigDict(diffusion_config.to_dict())
    copy.mean_type = mean_type
    return copy


class _StepDraws(NamedTuple):
    """What one distillation step draws: the batch's images and labels, each example's level
    index in [0, num_levels), its noise and the dropout key."""
    x_start: jax.Array
    labels: jax.Array | None
    index: jax.Array
    noise: jax.Array
    dropout_key: jax.Array


def _draw(state: TrainState, batch: dict, num_classes: int, num_levels: int) -> _StepDraws:
    x_start = batch["image"]
    key = jax.random.fold_in(state.rng, state.step)
    index_key, noise_key, dropout_key = jax.random.split(key, 3)
    return _StepDraws(x_start, batch["label"] if num_classes > 0 else None,
                      jax.random.randint(index_key, (x_start.shape[0],), 0, num_levels),
                      jax.random.normal(noise_key, x_start.shape), dropout_key)


def make_distill_step(config: ml_collections.ConfigDict, model: nn.Module,
                      tx: optax.GradientTransformation, mesh, student_steps: int,
                      teacher_mean_type: str) -> Callable:
    """jit(state, teacher_params, batches) -> (state, metrics) for the stage whose student
    takes `student_steps` steps; one step per entry of the batches' leading axis."""
    num_timesteps = config.diffusion.num_timesteps
    teacher_diffusion = create_diffusion(_with_mean_type(config.diffusion, teacher_mean_type))
    student_diffusion = create_diffusion(_with_mean_type(config.diffusion,
                                                         config.distill.mean_type))
    alphas_cumprod = teacher_diffusion.alphas_cumprod
    num_classes = config.model.num_classes

    def one_step(state: TrainState, teacher_params, batch: dict):
        x_start, labels, index, noise, dropout_key = _draw(state, batch, num_classes,
                                                           student_steps)
        t, t_mid, t_end = distill_targets.stage_timesteps(num_timesteps, student_steps, index)
        x_t = teacher_diffusion.q_sample(x_start, t, noise)
        teacher_x0 = teacher_x0_fn(model, teacher_diffusion, teacher_params, labels, config)
        target = jax.lax.stop_gradient(distill_targets.progressive_target(
            teacher_x0, x_t, t, t_mid, t_end, alphas_cumprod))
        weight = distill_targets.truncated_snr_weight(
            jnp.asarray(alphas_cumprod, jnp.float32)[t])

        def loss_fn(params):
            output = model.apply({"params": params}, x_t, student_diffusion.timesteps_for_model(t),
                                 labels, train=True, rngs={"dropout": dropout_key})
            x0 = student_diffusion.p_mean_variance(None, x_t, t, clip_denoised=False,
                                                   model_output=output)["pred_xstart"]
            return jnp.mean(weight * mean_flat((x0 - target) ** 2))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new_state, grad_norm, finite = apply_if_finite(state, grads, loss, tx,
                                                       config.distill.ema_decay)
        return new_state, {"loss": loss, "grad_norm": grad_norm,
                           "finite": finite.astype(jnp.float32)}

    return jit_steps(one_step, mesh, config.train.step_loop, num_inputs=1)


class TargetNetwork(NamedTuple):
    """Optimizer state of `target_network`: the parameters theta^- of the target network."""
    params: Any


def target_network(decay: float) -> optax.GradientTransformation:
    """Passes the updates on and keeps theta^- <- decay theta^- + (1 - decay) theta in its state
    (Song et al. 2023, Alg. 2), theta being the updated student: last in a chain, params +
    updates is it. In the optimizer state, so checkpoints, resume and the skip of non-finite
    steps cover it as they cover Adam's moments."""

    def init(params) -> TargetNetwork:
        return TargetNetwork(jax.tree.map(jnp.copy, params))

    def update(updates, state: TargetNetwork, params=None):
        new_params = optax.apply_updates(params, updates)
        return updates, TargetNetwork(optax.incremental_update(new_params, state.params,
                                                               1.0 - decay))

    return optax.GradientTransformation(init, update)


def _consistency_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """The progressive optimizer, then the target network when target_decay > 0 (at 0 the
    target network is the student itself and nothing is stored)."""
    if config.distill.target_decay == 0:
        return _optimizer(config)
    return optax.chain(_optimizer(config), target_network(config.distill.target_decay))


def target_params(config: ml_collections.ConfigDict, state: TrainState):
    """theta^- of a consistency distillation state."""
    if config.distill.target_decay == 0:
        return state.params
    return state.opt_state[-1].params


def make_consistency_step(config: ml_collections.ConfigDict, model: nn.Module,
                          tx: optax.GradientTransformation, mesh) -> Callable:
    """jit(state, teacher_params, batches) -> (state, metrics) of consistency distillation
    (Song et al. 2023, Alg. 2): per example a level n of the grid, x at t_{n+1} from the data,
    x' = the teacher's ODE step to t_n, loss d(f_theta(x, t_{n+1}), f_theta^-(x', t_n)) with
    the pseudo-Huber d and uniform weights. The student and the target network see the same
    dropout mask (as the reference implementations run them)."""
    diffusion = create_diffusion(config.diffusion)   # the teacher's head, the student's too
    alphas_cumprod = diffusion.alphas_cumprod
    distill_config = config.distill
    grid = jnp.asarray(distill_targets.consistency_timesteps(
        diffusion.betas, distill_config.num_scales, distill_config.sigma_max), jnp.int32)
    ode_step = distill_targets.ODE_STEPS[distill_config.solver]
    num_classes = config.model.num_classes

    def one_step(state: TrainState, teacher_params, batch: dict):
        x_start, labels, n, noise, dropout_key = _draw(state, batch, num_classes, len(grid) - 1)
        t_high, t_low = grid[n + 1], grid[n]
        x_high = diffusion.q_sample(x_start, t_high, noise)
        teacher_x0 = teacher_x0_fn(model, diffusion, teacher_params, labels, config)
        x_low = ode_step(teacher_x0, x_high, t_high, t_low, alphas_cumprod)

        def consistency_fn(params, x, t):
            output = model.apply({"params": params}, x, diffusion.timesteps_for_model(t),
                                 labels, train=True, rngs={"dropout": dropout_key})
            return consistency.consistency_output(diffusion, distill_config.sigma_data, x, t,
                                                  output)

        target = jax.lax.stop_gradient(
            consistency_fn(target_params(config, state), x_low, t_low))

        def loss_fn(params):
            difference = consistency_fn(params, x_high, t_high) - target
            return jnp.mean(distill_targets.pseudo_huber(difference))

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        new_state, grad_norm, finite = apply_if_finite(state, grads, loss, tx,
                                                       distill_config.ema_decay)
        return new_state, {"loss": loss, "grad_norm": grad_norm,
                           "finite": finite.astype(jnp.float32)}

    return jit_steps(one_step, mesh, config.train.step_loop, num_inputs=1)


def consistency_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config a consistency student's checkpoints record: the teacher's head, the multistep
    consistency sampler, 1 step unless config.sample.num_steps asks for more
    (`sampling.student_config`)."""
    return _student_record(config, config.diffusion.mean_type, consistency.SAMPLER, 1)


@dataclasses.dataclass(frozen=True)
class Method:
    """What a distillation method gives the shared loop: its stage count, optimizer, compiled
    step of a stage (jit(state, teacher, batches)), the config a stage's checkpoints record, a
    log line for a stage, and the distill keys a resumed run must keep."""
    num_stages: Callable[[ml_collections.ConfigDict], int]
    optimizer: Callable[[ml_collections.ConfigDict], optax.GradientTransformation]
    make_step: Callable[..., Callable]        # (config, model, tx, mesh, stage)
    record: Callable[[ml_collections.ConfigDict, int], ml_collections.ConfigDict]
    describe: Callable[[ml_collections.ConfigDict, int], str]
    run_keys: tuple[str, ...]


def _progressive_step(config, model, tx, mesh, stage: int) -> Callable:
    teacher_mean_type = config.diffusion.mean_type if stage == 0 else config.distill.mean_type
    return make_distill_step(config, model, tx, mesh, student_steps_of_stage(config, stage),
                             teacher_mean_type)


# Keys: the values of config.distill.method.
METHODS: dict[str, Method] = {
    "progressive": Method(
        num_stages=lambda config: config.distill.num_halvings,
        optimizer=_optimizer,
        make_step=_progressive_step,
        record=lambda config, stage: stage_config(config, student_steps_of_stage(config, stage)),
        describe=lambda config, stage: (
            f"a {student_steps_of_stage(config, stage)}-step student from a "
            f"{2 * student_steps_of_stage(config, stage)}-step teacher"),
        run_keys=("teacher_steps", "steps_per_stage", "mean_type")),
    "consistency": Method(
        num_stages=lambda config: 1,
        optimizer=_consistency_optimizer,
        make_step=lambda config, model, tx, mesh, stage: make_consistency_step(config, model,
                                                                               tx, mesh),
        record=lambda config, stage: consistency_config(config),
        describe=lambda config, stage: (
            f"a consistency model on {config.distill.num_scales} levels, teacher "
            f"{config.distill.solver} steps"),
        run_keys=("steps_per_stage", "num_scales", "sigma_max", "sigma_data", "solver",
                  "target_decay")),
}


def load_teacher(config: ml_collections.ConfigDict, model: nn.Module, mesh):
    """The EMA parameters of the latest checkpoint in config.distill.teacher_workdir, checked
    against config.model and config.diffusion."""
    teacher_workdir = config.distill.teacher_workdir
    manager = checkpoints.create_manager(teacher_workdir, read_only=True)
    if not manager.all_steps():
        raise CheckpointError(
            f"config.distill.teacher_workdir={teacher_workdir!r} holds no checkpoint: train the "
            f"teacher first (--mode=train --workdir={teacher_workdir}) or point it at a "
            f"trained run")
    step = manager.latest_step()
    recorded = checkpoints.restore_config(manager, step)
    for key in _DIFFUSION_KEYS:
        have = recorded.get("diffusion", {}).get(key)
        if have is not None and have != config.diffusion[key]:
            raise ConfigError(
                f"the teacher in {teacher_workdir} was trained with diffusion.{key}={have!r} but "
                f"config.diffusion.{key}={config.diffusion[key]!r}; distil with the teacher's "
                f"config file")
    if recorded.get("distill", {}).get("student_steps", 0):
        raise ConfigError(
            f"config.distill.teacher_workdir={teacher_workdir!r} holds a distilled student, not "
            f"a --mode=train run; distil from the original teacher with more num_halvings")
    try:
        params = checkpoints.restore_params(manager, step, abstract_train_state(config, model),
                                            parallel.replicated(mesh), use_ema=True)
    except CheckpointError as e:
        raise CheckpointError(f"the teacher (config.distill.teacher_workdir) does not fit: "
                              f"{e}") from None
    logging.info("Teacher: %s at step %d", teacher_workdir, step)
    return params


def _check_same_run(config: ml_collections.ConfigDict, recorded: dict) -> None:
    """distill keys a resumed run must keep: they fix the stages and what the checkpoints hold."""
    for key in ("method",) + METHODS[config.distill.method].run_keys:
        have = recorded.get("distill", {}).get(key)
        if have != config.distill[key]:
            raise ConfigError(
                f"this workdir holds a distillation with distill.{key}={have!r} but "
                f"config.distill.{key}={config.distill[key]!r}; resume with the same settings or "
                f"use another --workdir")


def _fresh_stage(state: TrainState, teacher_params, tx: optax.GradientTransformation
                 ) -> TrainState:
    """The student at a stage's start: the teacher's weights (copies: the state is donated to
    the step, the teacher is not), its EMA equal to them, a new optimizer state."""
    params = jax.tree.map(jnp.copy, teacher_params)
    return state.replace(params=params, ema_params=jax.tree.map(jnp.copy, teacher_params),
                         opt_state=jax.jit(tx.init)(params))


def distill(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Run (or resume) every stage per `config` (validated); returns the final state."""
    mesh = parallel.create_mesh()
    parallel.check_divisible(config.train.batch_size, mesh, "config.train.batch_size")
    distill_config = config.distill
    method = METHODS[distill_config.method]
    per_stage = distill_config.steps_per_stage
    num_stages = method.num_stages(config)
    num_steps = num_stages * per_stage
    model = create_model(config.model)
    tx = method.optimizer(config)
    original_teacher = load_teacher(config, model, mesh)
    iterator = data.create_train_iterator(config, seed=config.train.seed,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count())
    manager = checkpoints.create_manager(workdir, config.train.max_to_keep,
                                         keep_period=per_stage)
    template = abstract_train_state(config, model)
    template = template.replace(opt_state=jax.eval_shape(tx.init, template.params))
    if manager.latest_step() is None:
        rng = jax.random.key_data(jax.random.PRNGKey(config.train.seed))
        state = TrainState(step=jnp.zeros((), jnp.int32), params=original_teacher,
                           ema_params=original_teacher, opt_state=None, rng=rng)
        state = jax.device_put(state, parallel.replicated(mesh))
    else:
        _check_same_run(config, checkpoints.restore_config(manager, manager.latest_step()))
        state, data_state = checkpoints.restore_train_state(
            manager, manager.latest_step(), template, parallel.replicated(mesh))
        iterator.set_state(data_state)
        logging.info("Resuming the distillation at step %d", int(state.step))
    step = int(state.step)

    writer = tensorboard_writer.create_writer(workdir, just_logging=jax.process_index() > 0)
    window = MetricWindow(step)
    teacher, step_fn, step_fn_stage, record = None, None, -1, None

    def nonfinite(bad: int) -> str:
        manager.wait_until_finished()
        return (f"the distillation loss or gradient became NaN/Inf at step {bad}; stopped "
                f"without saving. The last good checkpoint stays in "
                f"{checkpoints.checkpoint_dir(workdir)}. Try a lower --config.distill.lr")

    def flush_metrics() -> None:
        scalars = window.flush(step, nonfinite)
        if scalars is None:
            return
        scalars.update(stage=step_fn_stage, student_steps=record.distill.student_steps)
        writer.write_scalars(step, scalars)

    def save() -> None:   # the current step's state, with its stage's record
        checkpoints.save(manager, step, state, record, iterator.get_state())

    with loop_events.guarded_loop(manager, writer) as preemption:
        while step < num_steps:
            stage = step // per_stage
            if step % per_stage == 0:  # a stage starts: its teacher is the previous student
                teacher = original_teacher if stage == 0 else state.ema_params
                teacher = jax.tree.map(jnp.copy, teacher)
                state = _fresh_stage(state, teacher, tx)
            elif teacher is None:  # resumed inside a stage: its teacher is a kept checkpoint
                teacher = original_teacher if stage == 0 else checkpoints.restore_params(
                    manager, stage * per_stage, template, parallel.replicated(mesh))
            if step_fn is None or step_fn_stage != stage:
                step_fn = method.make_step(config, model, tx, mesh, stage)
                step_fn_stage = stage
                record = method.record(config, stage)
                logging.info("Stage %d of %d: %s", stage + 1, num_stages,
                             method.describe(config, stage))
            local = next(iterator)
            batches = parallel.global_batch({k: v[None] for k, v in local.items()}, mesh,
                                            leading_axes=1)
            state, metrics = step_fn(state, teacher, batches)
            step += 1
            window.add(metrics)
            preempted = preemption.requested(step)
            stage_end = step % per_stage == 0
            at_end = step >= num_steps or preempted or stage_end
            loop_events.log_and_save(config.train, step, at_end, flush_metrics, save)
            if stage_end:
                grid = sampling.GridSampler(record, model, mesh)
                grid.write(state.ema_params, step, workdir, writer)
                teacher = None
            if preempted:
                logging.info("Preempted: checkpoint saved at step %d", step)
                break
    return state


def run_distill(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=distill."""
    distill(config, workdir)
