"""The training state (params, EMA params, optimizer state, RNG, step) and the optimizer."""
from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jax_diffusion.errors import ConfigError
from jax_diffusion.models import example_inputs
from jax_diffusion.runtime import parallel


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    ema_params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key data, so that checkpoints hold plain arrays
    # config.train.ema="power": one power-function EMA per config.train.ema_sigma_rels width
    power_emas: tuple = ()


LR_SCHEDULES = ("constant", "cosine")


def learning_rate_schedule(train_config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `lr_schedule`:
    "constant" (as DDPM), or "cosine": lr (1 + cos(pi s / S)) / 2 at s steps after warmup, with
    S = num_steps - warmup_steps, reaching 0 at num_steps.
    """
    name, lr, warmup = train_config.lr_schedule, train_config.lr, train_config.warmup_steps
    if name not in LR_SCHEDULES:
        raise ConfigError(f"config.train.lr_schedule={name!r} is unknown; allowed: "
                          f"{', '.join(LR_SCHEDULES)}")
    if name == "cosine":
        if train_config.epochs > 0:
            raise ConfigError("config.train.lr_schedule='cosine' decays over "
                              "config.train.num_steps, but config.train.epochs > 0 sets the run "
                              "length: set epochs=0 and num_steps, or use lr_schedule 'constant'")
        if train_config.num_steps <= warmup:
            raise ConfigError(f"config.train.lr_schedule='cosine' needs config.train.num_steps="
                              f"{train_config.num_steps} > config.train.warmup_steps={warmup}")
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, train_config.num_steps, 0.0)
    if warmup <= 0:
        return optax.constant_schedule(lr)
    return optax.linear_schedule(0.0, lr, warmup)


def create_optimizer(train_config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """clip_by_global_norm then AdamW with the warmup schedule."""
    return optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(learning_rate_schedule(train_config), b1=0.9, b2=0.999, eps=1e-8,
                    weight_decay=train_config.weight_decay))


def _init_fn(config: ml_collections.ConfigDict, model: nn.Module,
             tx: optax.GradientTransformation):
    def init() -> TrainState:
        rng = jax.random.PRNGKey(config.train.seed)
        init_rng, train_rng = jax.random.split(rng)
        params = model.init(init_rng, *example_inputs(config), train=False)["params"]
        power_emas = ((params,) * len(config.train.ema_sigma_rels)
                      if config.train.ema == "power" else ())
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=tx.init(params), rng=train_rng, power_emas=power_emas)
    return init


def create_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                       tx: optax.GradientTransformation, mesh) -> TrainState:
    """A fresh TrainState, replicated over the mesh; EMA starts equal to the params."""
    return jax.jit(_init_fn(config, model, tx), out_shardings=parallel.replicated(mesh))()


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module) -> TrainState:
    """The TrainState's shapes and dtypes, without computing anything (a restore target)."""
    return jax.eval_shape(_init_fn(config, model, create_optimizer(config.train)))
