"""Where the deterministic (DDIM eta = 0) samples of a digits model go wrong: the measurements
behind docs/deterministic_sampling.md.

    PYTHONPATH=$PWD python scripts/probe_deterministic.py --workdir=/work/runs14b/base \
        [--config=configs/digits.py] [--parts=denoise,chain,variants] [--set section.key=value]

denoise:  the EMA model's denoising error on the real digits by timestep bucket: eps-MSE,
          x0-MSE (raw and clipped to [-1, 1]) and the classifier's accuracy on the x0-prediction.
chain:    DDIM-50 eta = 0 and eta = 1 from the same x_T and labels, and per step the classifier's
          verdict on the (clipped) x0-prediction, the share of saturated pixels and of images
          with speckles; which trajectories end wrong and where their x0-prediction turned.
variants: the deterministic path changed one thing at a time: no clipping, the chain started
          at t = T-1 instead of DDIM's t = 980, the last step, 1000 steps, DPM-Solver++.

The chains are written here as a Python loop over the library's step functions (`ddim_step`,
`dpm_solver_pp_step`), so that every intermediate x0-prediction can be scored.
"""
from __future__ import annotations

import argparse
import ast
import json

import jax
import jax.numpy as jnp
import numpy as np

from jax_diffusion import data, images, samplers, schedules
from jax_diffusion.runtime import parallel
from jax_diffusion.evaluation import digits as digits_metrics
from jax_diffusion.config_files import load_config_file
from jax_diffusion.diffusion import create_diffusion
from jax_diffusion.models import create_model
from jax_diffusion.generation.sampling import default_labels, restore_for_sampling

# A pixel that differs from the median of its 8 neighbours by more than this (in [-1, 1] units)
# is a speckle. No real digit at 16x16 has one (checked in `speckle_rate` on the data).
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


class Probe:
    def __init__(self, config, workdir: str):
        self.config = config
        self.mesh = parallel.create_mesh(jax.devices()[:1])
        self.model = create_model(config.model)
        self.params, self.step = restore_for_sampling(config, workdir, self.mesh, self.model)
        self.classifier = digits_metrics.train_classifier(config.data.image_size)
        self.real, self.real_labels = data.load_digits_arrays(config.data.image_size)
        self._apply = jax.jit(lambda p, x, t, y: self.model.apply({"params": p}, x, t, y,
                                                                  train=False))

    def model_fn(self, y):
        return lambda x, t: self._apply(self.params, x, t, y)

    def classify(self, x0: np.ndarray) -> np.ndarray:
        return self.classifier.predict(digits_metrics._features_in(np.clip(x0, -1, 1)))

    # ------------------------------------------------------------------ denoise
    def denoise(self, buckets=(0, 10, 25, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900,
                               950, 980, 999)) -> list[dict]:
        diffusion = create_diffusion(self.config.diffusion)
        x0 = jnp.asarray(self.real)
        y = jnp.asarray(self.real_labels)
        rows = []
        for t_value in buckets:
            key = jax.random.fold_in(jax.random.PRNGKey(1), t_value)
            noise = jax.random.normal(key, x0.shape)
            t = jnp.full((len(x0),), t_value, jnp.int32)
            x_t = diffusion.q_sample(x0, t, noise)
            out = diffusion.p_mean_variance(self.model_fn(y), x_t, t, clip_denoised=False)
            x0_raw = np.asarray(out["pred_xstart"])
            eps = np.asarray(diffusion.predict_eps_from_xstart(x_t, t, out["pred_xstart"]))
            abar = diffusion.alphas_cumprod[t_value]
            rows.append({
                "t": t_value, "abar": float(abar), "snr": float(abar / (1 - abar)),
                "eps_mse": float(np.mean((eps - np.asarray(noise)) ** 2)),
                "x0_mse": float(np.mean((x0_raw - self.real) ** 2)),
                "x0_mse_clipped": float(np.mean((np.clip(x0_raw, -1, 1) - self.real) ** 2)),
                "x0_saturated": float(np.mean(np.abs(x0_raw) > 1)),
                "x0_accuracy": float(np.mean(self.classify(x0_raw) == self.real_labels)),
            })
        return rows

    # ------------------------------------------------------------------ chains
    def run_chain(self, x_T, labels, kept, method="ddim", eta=0.0, clip=True, seed=0,
                  record=True):
        """x0 and, per step, the x0-prediction's stats; `kept`: the original timesteps."""
        diffusion = create_diffusion(self.config.diffusion, respacing=set(kept))
        y = jnp.asarray(labels)
        model_fn = self.model_fn(y)
        x = jnp.asarray(x_T)
        key = jax.random.PRNGKey(seed)
        if method != "ddim":  # DPM-Solver++(2M): the library's whole chain, not traced per step
            if record:
                raise ValueError("only DDIM chains are traced step by step; pass record=False")
            x0 = samplers.sample(model_fn, diffusion, x.shape, key, method="dpm_solver++",
                                 clip_denoised=clip, noise=x)
            return np.asarray(x0), []
        trace = []
        for i in range(diffusion.num_timesteps - 1, -1, -1):
            t = jnp.full((len(x),), i, jnp.int32)
            z = jax.random.normal(jax.random.fold_in(key, i), x.shape)
            x_next, x0 = samplers.ddim_step(diffusion, model_fn, x, t, z, eta, clip)
            if record:
                x0_np = np.asarray(x0)
                trace.append({"t": int(diffusion.timestep_map[i]),
                              "pred": self.classify(x0_np),
                              "saturated": np.mean(np.abs(x0_np) >= 0.999, axis=(1, 2, 3)),
                              "speckled": speckled(x0_np)})
            x = x_next
        return np.asarray(x), trace

    def score(self, x0, labels) -> dict:
        s = digits_metrics.evaluate(images.to_uint8(jnp.asarray(x0)), labels)
        s["speckled"] = float(np.mean(speckled(np.asarray(images.to_uint8(jnp.asarray(x0)),
                                                          np.float32) / 127.5 - 1)))
        return s


def ddim_kept(steps: int, total: int = 1000) -> list[int]:
    return sorted(schedules.space_timesteps(total, f"ddim{steps}"))


def chain_report(probe: Probe, n: int) -> dict:
    labels = default_labels(n, probe.config.model.num_classes)
    shape = (n, probe.config.data.image_size, probe.config.data.image_size,
             probe.config.data.channels)
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape))
    kept = ddim_kept(50)
    x_det, trace_det = probe.run_chain(x_T, labels, kept, eta=0.0)
    x_sto, trace_sto = probe.run_chain(x_T, labels, kept, eta=1.0)
    final_det = probe.classify(x_det) == labels
    final_sto = probe.classify(x_sto) == labels
    spk_det = speckled(x_det)
    wrong = ~final_det
    steps = []
    for a, b in zip(trace_det, trace_sto, strict=True):
        steps.append({"t": a["t"],
                      "acc_eta0": float(np.mean(a["pred"] == labels)),
                      "acc_eta1": float(np.mean(b["pred"] == labels)),
                      "acc_eta0_on_final_wrong": float(np.mean(a["pred"][wrong] == labels[wrong])),
                      "saturated_eta0": float(np.mean(a["saturated"])),
                      "saturated_eta1": float(np.mean(b["saturated"])),
                      "speckled_eta0": float(np.mean(a["speckled"])),
                      "speckled_eta1": float(np.mean(b["speckled"]))})
    # The first step (in decreasing t) from which a trajectory's speckle stays to the end.
    onset = []
    for j in np.flatnonzero(spk_det):
        t_on = None
        for a in reversed(trace_det):
            if not a["speckled"][j]:
                break
            t_on = a["t"]
        onset.append(t_on)
    return {"n": n, "final_acc_eta0": float(final_det.mean()),
            "final_acc_eta1": float(final_sto.mean()),
            "speckled_eta0": float(spk_det.mean()), "speckled_eta1": float(speckled(x_sto).mean()),
            "wrong_and_speckled": int(np.sum(wrong & spk_det)), "wrong": int(wrong.sum()),
            "speckle_onset_t": sorted(int(o) for o in onset if o is not None),
            "first_wrong_seeds": [int(j) for j in np.flatnonzero(wrong)[:20]],
            "steps": steps}


def variants_report(probe: Probe, n: int, names: list[str]) -> dict:
    labels = default_labels(n, probe.config.model.num_classes)
    shape = (n, probe.config.data.image_size, probe.config.data.image_size,
             probe.config.data.channels)
    x_T = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape))
    schedule = probe.config.diffusion.schedule
    all_settings = {
        "ddim50_eta1": dict(kept=ddim_kept(50), eta=1.0),
        "ddim50_eta0": dict(kept=ddim_kept(50)),
        "ddim50_eta0_noclip": dict(kept=ddim_kept(50), clip=False),
        "ddim50_eta0_from_T-1": dict(kept=sorted(set(ddim_kept(50)) | {999})),
        "ddim50_eta0_uniform_to_T-1": dict(kept=sorted(schedules.space_timesteps(1000, "50"))),
        "ddim10_eta0": dict(kept=ddim_kept(10)),
        "ddim10_eta1": dict(kept=ddim_kept(10), eta=1.0),
        "dpm++_20": dict(kept=sorted(schedules.logsnr_timesteps(1000, 20, schedule)),
                         method="dpm"),
        "dpm++_10": dict(kept=sorted(schedules.logsnr_timesteps(1000, 10, schedule)),
                         method="dpm"),
        "ddim1000_eta0": dict(kept=list(range(1000))),
    }
    settings = {name: all_settings[name] for name in names}
    out = {}
    for name, kwargs in settings.items():
        x0, _ = probe.run_chain(x_T, labels, record=False, **kwargs)
        out[name] = probe.score(x0, labels)
        print(name, json.dumps(out[name]), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--config", default="configs/digits.py")
    parser.add_argument("--parts", default="denoise,chain,variants")
    parser.add_argument("--num", type=int, default=500)
    parser.add_argument("--variants", default="ddim50_eta1,ddim50_eta0,ddim50_eta0_noclip,"
                        "ddim50_eta0_from_T-1,dpm++_20,ddim1000_eta0")
    parser.add_argument("--out", default="")
    parser.add_argument("--set", action="append", default=[], help="section.key=value")
    args = parser.parse_args()
    probe = Probe(load_config(args.config, args.set), args.workdir)
    print(f"checkpoint step {probe.step}; speckled real digits: "
          f"{speckled(probe.real).mean():.4f}", flush=True)
    report = {}
    parts = args.parts.split(",")
    if "denoise" in parts:
        report["denoise"] = probe.denoise()
        for row in report["denoise"]:
            print(json.dumps(row), flush=True)
    if "chain" in parts:
        report["chain"] = chain_report(probe, args.num)
        summary = {k: v for k, v in report["chain"].items() if k != "steps"}
        print(json.dumps(summary), flush=True)
        for row in report["chain"]["steps"]:
            print(json.dumps(row), flush=True)
    if "variants" in parts:
        report["variants"] = variants_report(probe, args.num, args.variants.split(","))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
