"""The digits metric of one checkpoint under several samplers, through the library's own sampling
path (`make_sample_fn`, `generate_samples`: what --mode=sample runs), same seed and labels each.

    python scripts/sampler_table.py --workdir=runs/digits \
        [--config=configs/digits.py] [--settings="ddim:50:1,ddim:50:0,dpm_solver++:20"] \
        [--num=1000] [--out=table.json] [--set diffusion.mean_type=v ...]

A setting is method:num_steps[:eta]. Prints one JSON line per setting: accuracy, Frechet
distance, share of speckled images (a pixel far from the median of its neighbours), seconds.
--eps_scale=L divides the network's noise prediction by L at every step (Ning et al. 2024,
"epsilon scaling" against exposure bias), for eps- and v-prediction models.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion import schedules
from jax_diffusion.config_files import load_config_file
from jax_diffusion.evaluation import digits as digits_metrics
from jax_diffusion.generation.restore import restore_for_sampling
from jax_diffusion.generation.sampling import default_labels, generate_samples, make_sample_fn
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel

DEFAULT_SETTINGS = ("ddim:50:1,ddim:50:0,ddim:10:0,ddim:10:1,dpm_solver++:20,dpm_solver++:10,"
                    "ddim:20:0")

# A pixel that differs from the median of its 8 neighbours by more than this (in [-1, 1] units)
# is a speckle. No real digit at 16x16 has one.
SPECKLE_JUMP = 1.2


def load_config(path: str, overrides: list[str] = ()):
    """The config file with `section.key=value` overrides (values as Python literals, or plain
    strings), e.g. diffusion.mean_type=eps to read a checkpoint trained before a recipe change."""
    config = load_config_file(path)
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        try:
            config[section][name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            config[section][name] = value
    return config


def speckled(x: np.ndarray) -> np.ndarray:
    """[N] bool: the image has a pixel far from the median of its 8 neighbours."""
    img = np.asarray(x, np.float32)[..., 0]
    padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = img.shape[1:]
    neighbours = np.stack([padded[:, 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
                           for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)])
    jump = np.abs(img - np.median(neighbours, axis=0))
    return jump.reshape(len(img), -1).max(axis=1) > SPECKLE_JUMP


def parse_setting(text: str) -> tuple[str, int, float]:
    parts = text.split(":")
    return parts[0], int(parts[1]), float(parts[2]) if len(parts) > 2 else 0.0


class EpsScaled:
    """The model with its noise prediction divided by `scale`, the x0 it implies kept consistent
    with x_t = a x0 + s eps; for v-prediction v = a eps - s x0 is rebuilt from the two."""

    def __init__(self, model, config, scale: float):
        self.model, self.scale, self.mean_type = model, scale, config.diffusion.mean_type
        if self.mean_type not in ("eps", "v"):
            raise SystemExit(f"--eps_scale needs an eps- or v-prediction model, not "
                             f"diffusion.mean_type={self.mean_type!r}")
        if config.diffusion.rescale_timesteps:
            raise SystemExit("--eps_scale reads abar at the timestep the network sees; it needs "
                             "diffusion.rescale_timesteps=False")
        betas = schedules.get_beta_schedule(config.diffusion.schedule,
                                            config.diffusion.num_timesteps)
        self.abar = jnp.asarray(np.cumprod(1.0 - betas), jnp.float32)

    def apply(self, variables, x, t, y, train=False):
        out = self.model.apply(variables, x, t, y, train=train)
        if self.mean_type == "eps":
            return out / self.scale
        a = jnp.sqrt(self.abar[t])[:, None, None, None]
        s = jnp.sqrt(1.0 - self.abar[t])[:, None, None, None]
        eps, x0 = s * x + a * out, a * x - s * out
        scaled = eps / self.scale
        return a * scaled - s * (x0 + (s / a) * (eps - scaled))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--settings", default=DEFAULT_SETTINGS)
    parser.add_argument("--num", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--out", default="")
    parser.add_argument("--save_dir", default="", help="also write <method>_<nfe>_<eta>.npz here")
    parser.add_argument("--eps_scale", type=float, default=1.0)
    parser.add_argument("--set", action="append", default=[],
                        help="section.key=value (Python literal) applied to the config")
    args = parser.parse_args()

    config = load_config(args.config, args.set)

    mesh = parallel.create_mesh()
    model = create_model(config.model)
    params, step = restore_for_sampling(config, args.workdir, mesh, model)
    if args.eps_scale != 1.0:
        model = EpsScaled(model, config, args.eps_scale)
    labels = default_labels(args.num, config.model.num_classes)
    batch = parallel.round_up_to_devices(min(args.batch, args.num), mesh)
    rows = []
    for setting in args.settings.split(","):
        method, steps, eta = parse_setting(setting)
        config.sample.method, config.sample.num_steps, config.sample.eta = method, steps, eta
        start = time.time()
        sample_fn = make_sample_fn(config, model, mesh, batch)
        samples = generate_samples(sample_fn, params, labels, batch, config.sample.seed, mesh,
                                   progress=False)
        scores = digits_metrics.evaluate(samples, labels)
        scores.update(method=method, nfe=steps, eta=eta, step=step, eps_scale=args.eps_scale,
                      speckled=float(np.mean(speckled(samples.astype(np.float32) / 127.5 - 1))),
                      seconds=round(time.time() - start, 1))
        rows.append(scores)
        if args.save_dir:
            os.makedirs(args.save_dir, exist_ok=True)
            np.savez(os.path.join(args.save_dir, f"{method}_{steps}_{eta:g}.npz"),
                     images=samples, labels=labels)
        print(json.dumps(scores), flush=True)
    if args.out and jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
