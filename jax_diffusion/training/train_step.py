"""One compiled training call: `make_train_step` (k steps per call, as a lax.scan or a Python
unroll) and `next_batches`, which stacks the k host batches it takes.

The step is one jit-compiled function over the device mesh: the batch is sharded on "data", the
state replicated and donated, and XLA averages the gradients across devices. Random numbers
(noise levels, noise, dropout, label drop) are drawn for the global batch from
fold_in(state.rng, step), so they do not depend on the device count.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from operator import itemgetter

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jax_diffusion.runtime import parallel
from jax_diffusion.training import power_ema
from jax_diffusion.training.objective import training_objective
from jax_diffusion.training.train_state import TrainState, learning_rate_schedule


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
    """min(decay, (1 + step) / (10 + step)): early on the EMA follows the parameters closely, so
    it does not keep a large share of the random initialisation (0.999^1500 = 22% without this)."""
    step = step.astype(jnp.float32)
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def halflife_ema_decay(train_config: ml_collections.ConfigDict
                       ) -> Callable[[jax.Array], jax.Array] | None:
    """EDM's (Karras et al. 2022) EMA, as step -> decay, when config.train.ema_halflife_kimg > 0:
    beta = 0.5^(B / h) for a batch of B images, h = the half-life in images, capped at
    ema_rampup_ratio x the images seen after this step when that ratio is > 0, so that a short
    run does not keep its initialisation. None when off (the bare config.train.ema_decay)."""
    halflife_kimg, rampup = train_config.ema_halflife_kimg, train_config.ema_rampup_ratio
    if halflife_kimg <= 0:
        return None
    batch = float(train_config.batch_size)

    def decay(step: jax.Array) -> jax.Array:
        halflife = jnp.float32(halflife_kimg * 1000.0)
        if rampup > 0:
            halflife = jnp.minimum(halflife, rampup * (step.astype(jnp.float32) + 1.0) * batch)
        return 0.5 ** (batch / jnp.maximum(halflife, 1e-8))
    return decay


STEP_LOOPS = ("auto", "scan", "unroll")


def resolve_step_loop(step_loop: str, backend: str | None = None) -> str:
    """config.train.step_loop as "scan" or "unroll": "auto" unrolls on the CPU (whose scan is
    slow, see make_train_step) and scans elsewhere (GPU, TPU). `backend` defaults to JAX's."""
    if step_loop != "auto":
        return step_loop
    return "unroll" if (backend or jax.default_backend()) == "cpu" else "scan"


def make_train_step(config: ml_collections.ConfigDict, model: nn.Module,
                    tx: optax.GradientTransformation,
                    mesh) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(state, batches) -> (state, metrics), running `steps_per_jit` steps in one call, as
    a lax.scan or a Python unroll per config.train.step_loop (`resolve_step_loop`).

    `batches` hold a leading steps axis: image [k, B, H, W, C], label [k, B]. A step whose loss
    or gradient is not finite leaves the state unchanged and reports finite=0, so the host can
    stop the run with nothing corrupt in the state.
    """
    train_config = config.train
    num_classes = config.model.num_classes
    lr_schedule = learning_rate_schedule(train_config)
    objective = training_objective(config)

    def one_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        images = batch["image"]
        key = jax.random.fold_in(state.rng, state.step)
        t_key, noise_key, dropout_key, label_key = jax.random.split(key, 4)
        levels = objective.sample_levels(t_key, images.shape[0])
        labels = None
        if num_classes > 0:
            # Label dropout trains the null label, the unconditional branch of guidance.
            drop = jax.random.uniform(label_key, batch["label"].shape)
            labels = jnp.where(drop < train_config.label_dropout, num_classes, batch["label"])

        def loss_fn(params):
            def model_fn(x, timesteps):
                return model.apply({"params": params}, x, timesteps, labels, train=True,
                                   rngs={"dropout": dropout_key})
            terms = objective.losses(model_fn, images, levels, noise_key)
            return jnp.mean(terms["loss"]), terms

        (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, grad_norm, finite = apply_if_finite(
            state, grads, loss, tx, halflife_ema_decay(train_config) or train_config.ema_decay,
            power_ema.tracked_sigma_rels(train_config))
        metrics = {name: jnp.mean(value) for name, value in terms.items()}
        metrics.update(loss=loss, grad_norm=grad_norm, lr=lr_schedule(state.step),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return jit_steps(one_step, mesh, train_config.step_loop)


def apply_if_finite(state: TrainState, grads, loss: jax.Array,
                    tx: optax.GradientTransformation,
                    decay: float | Callable[[jax.Array], jax.Array],
                    power_sigma_rels: Sequence[float] = ()
                    ) -> tuple[TrainState, jax.Array, jax.Array]:
    """(new state, gradient norm, finite): one optimizer and EMA update, or the state unchanged
    when the loss or the gradient is not finite, so the host can stop with nothing corrupt.
    `decay`: the EMA's bare decay (see ema_decay) or a function step -> decay; the power EMAs
    of `power_sigma_rels` (state.power_emas) are updated too."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(state: TrainState) -> TrainState:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step_size = 1.0 - (decay(state.step) if callable(decay) else ema_decay(decay, state.step))
        ema_params = optax.incremental_update(params, state.ema_params, step_size)
        power_emas = power_ema.update_power_emas(state.power_emas, params, power_sigma_rels,
                                                 state.step + 1)
        return state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                             opt_state=opt_state, power_emas=power_emas)

    # A cond, not a select of new against old: with the select, both states are live at once
    # and XLA copied every donated buffer (91 ms of copies in a 1.4 s CPU step).
    return jax.lax.cond(finite, update, lambda state: state, state), grad_norm, finite


def jit_steps(one_step: Callable, mesh, step_loop: str, num_inputs: int = 0) -> Callable:
    """jit(state, *inputs, batches) -> (state, metrics stacked on a steps axis), running
    `one_step(state, *inputs, batch)` once per entry of the batches' leading steps axis, as a
    lax.scan or a Python unroll (`resolve_step_loop(step_loop)`). The state is replicated and
    donated, the `num_inputs` inputs (e.g. a teacher's parameters) replicated, the batches
    sharded on "data"."""

    def unrolled_steps(state: TrainState, *rest):
        # XLA:CPU ran the step ~25x slower inside a scan, even an unrolled one (9.1 s vs 0.36 s
        # per digits step), so the CPU gets k copies of the step; compile time grows with k.
        *inputs, batches = rest
        all_metrics = []
        for i in range(batches["image"].shape[0]):
            state, metrics = one_step(state, *inputs, jax.tree.map(itemgetter(i), batches))
            all_metrics.append(metrics)
        return state, jax.tree.map(lambda *m: jnp.stack(m), *all_metrics)

    def scanned_steps(state: TrainState, *rest):
        # One copy of the step in the program whatever k: compile time does not grow with k.
        *inputs, batches = rest
        return jax.lax.scan(lambda s, batch: one_step(s, *inputs, batch), state, batches)

    multi_step = {"scan": scanned_steps, "unroll": unrolled_steps}[resolve_step_loop(step_loop)]
    inputs = (parallel.replicated(mesh),) * num_inputs
    return jax.jit(multi_step, donate_argnums=0,
                   in_shardings=(parallel.replicated(mesh), *inputs,
                                 parallel.batch_sharded(mesh, 1)),
                   out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)))


def next_batches(iterator, k: int, mesh) -> dict:
    """k host batches stacked on a leading axis, as global arrays sharded on "data"."""
    batches = [next(iterator) for _ in range(k)]
    local = {name: np.stack([b[name] for b in batches]) for name in batches[0]}
    return parallel.global_batch(local, mesh, leading_axes=1)
