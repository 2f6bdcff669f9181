"""Quality per training image: train each digits recipe with checkpoints along the way, score every
checkpoint with the digits metric for a fixed set of samplers, write the table and the plots.

    python scripts/recipe_curve.py --out=runs/recipe_curve            # every recipe, 3,000 steps
    python scripts/recipe_curve.py --out=DIR --steps=1500 --every=500 --recipes=edm,flow

Writes DIR/recipe_curve.json ({"recipes": {name: {"config", "overrides", "train_seconds",
"checkpoints": {step: {setting: {"accuracy", "frechet", ...}}}}}}), updated after every score so
an interrupted run resumes where it stopped, and DIR/recipe_curve_accuracy.png and
DIR/recipe_curve_frechet.png (one panel per sampler, one line per recipe, against images seen).
Each recipe trains in DIR/<recipe> through main.py --mode=train; a finished run is not retrained.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

# name -> (config file, overrides): the vp recipes spelled out whole, so that a later change of
# configs/digits_vp.py does not change what "vp_demo" (the first demo's recipe) means.
VP_KEYS = ("--config.diffusion.process=vp", "--config.diffusion.mean_type=v")
RECIPES = {
    "vp_demo": ("configs/digits_vp.py", VP_KEYS + (
        "--config.diffusion.loss_weighting=min_snr", "--config.train.noise_sampling=uniform",
        "--config.model.num_groups=32")),
    "vp_edm_weight": ("configs/digits_vp.py", VP_KEYS + (
        "--config.diffusion.loss_weighting=edm", "--config.train.noise_sampling=lognormal",
        "--config.model.num_groups=8")),
    "edm": ("configs/digits_edm.py", ()),
    "flow": ("configs/digits_flow.py", ()),
}
# (setting, method, NFE, eta); the 10-NFE solvers are scored alike, the best of them reported.
SETTINGS = (("ddim50_eta1", "ddim", 50, 1.0), ("ddim50_eta0", "ddim", 50, 0.0),
            ("dpm_solver++20", "dpm_solver++", 20, 0.0))
TEN_NFE = ("dpm_solver++", "dpm_solver++3m", "unipc")
PANELS = ("ddim50_eta1", "ddim50_eta0", "dpm_solver++20", "best10")


def train(name: str, args, record: dict) -> str:
    """Train recipe `name` into DIR/name (skipped when its last checkpoint exists)."""
    workdir = os.path.join(args.out, name)
    if os.path.isdir(os.path.join(workdir, "checkpoints", str(args.steps))):
        return workdir
    config, overrides = RECIPES[name]
    command = [sys.executable, os.path.join(ROOT, "main.py"), f"--config={config}",
               f"--workdir={workdir}", "--mode=train", f"--config.train.num_steps={args.steps}",
               f"--config.train.checkpoint_every={args.every}", "--config.train.max_to_keep=1000",
               "--config.train.sample_every=0", *overrides]
    print("+", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    record["train_seconds"] = round(time.perf_counter() - start, 1)
    return workdir


def score(workdir: str, step: int, args, done: dict, save) -> None:
    """Every setting at checkpoint `step` not yet in `done`, each saved as soon as it is known."""
    from jax_diffusion import Pipeline
    from jax_diffusion.evaluation import digits

    settings = [s for s in list(SETTINGS) + [(f"{m}10", m, 10, 0.0) for m in TEN_NFE]
                if s[0] not in done]
    pipe = Pipeline.from_workdir(workdir, step=step) if settings else None
    for setting, method, nfe, eta in settings:
        images, labels = pipe.sample(args.samples, method=method, num_steps=nfe, eta=eta,
                                     seed=0)
        done[setting] = digits.evaluate(images, labels)
        print(f"{os.path.basename(workdir)} step {step} {setting}: {done[setting]}", flush=True)
        save()
    best = max(TEN_NFE, key=lambda m: done[f"{m}10"]["accuracy"])
    done["best10"] = dict(done[f"{best}10"], method=best)
    save()


def figure(table: dict, metric: str, batch: dict) -> Figure:
    fig = Figure(figsize=(12.0, 3.4), dpi=100)
    for n, panel in enumerate(PANELS):
        axes = fig.add_subplot(1, len(PANELS), n + 1)
        for name, record in table["recipes"].items():
            steps = sorted(int(s) for s in record["checkpoints"]
                           if panel in record["checkpoints"][s])
            if steps:
                axes.plot([s * batch[name] / 1000 for s in steps],
                          [record["checkpoints"][str(s)][panel][metric] for s in steps],
                          marker="o", label=name)
        axes.set_title({"best10": "best solver, 10 NFE"}.get(panel, panel))
        axes.set_xlabel("training images (thousands)")
        axes.grid(True, alpha=0.3)
        if n == 0:
            axes.set_ylabel(metric)
            axes.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory of the runs, table and plots")
    parser.add_argument("--steps", type=int, default=3000, help="training steps of each recipe")
    parser.add_argument("--every", type=int, default=750, help="steps between scored checkpoints")
    parser.add_argument("--samples", type=int, default=1000, help="samples per setting")
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated subset")
    args = parser.parse_args()
    names = args.recipes.split(",")
    unknown = set(names) - set(RECIPES)
    if unknown:
        sys.exit(f"error: unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)}")
    if args.steps % args.every:
        sys.exit(f"error: --steps={args.steps} must be a multiple of --every={args.every}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "recipe_curve.json")
    table = {"steps": args.steps, "samples": args.samples, "recipes": {}}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)

    def save() -> None:
        with open(path + ".tmp", "w") as f:
            json.dump(table, f, indent=1)
        os.replace(path + ".tmp", path)

    for name in names:
        config, overrides = RECIPES[name]
        record = table["recipes"].setdefault(name, {"config": config,
                                                    "overrides": list(overrides),
                                                    "checkpoints": {}})
        workdir = train(name, args, record)
        save()
        for step in range(args.every, args.steps + 1, args.every):
            score(workdir, step, args, record["checkpoints"].setdefault(str(step), {}), save)
    from jax_diffusion import config_files
    batch = {name: config_files.load_config_file(os.path.join(ROOT, RECIPES[name][0]))
             .train.batch_size for name in table["recipes"]}
    for metric in ("accuracy", "frechet"):
        FigureCanvasAgg(figure(table, metric, batch)).print_png(
            os.path.join(args.out, f"recipe_curve_{metric}.png"))
    print(json.dumps({name: {s: r["checkpoints"][s].get("best10", {}).get("accuracy")
                             for s in r["checkpoints"]} for name, r in table["recipes"].items()}))


if __name__ == "__main__":
    main()
