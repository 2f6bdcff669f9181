"""`make demo`: train the class-conditional digits model, sample 100 images per digit, and score
them with a classifier trained on the real digits: `main.py` with --mode=train, sample, eval.

Extra arguments are passed to every main.py call, e.g. `--config.train.num_steps=500`.
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = os.path.join(ROOT, "runs", "digits")


def run_main(mode: str, workdir: str, extra: list[str], config: str = "digits.py") -> None:
    """main.py --mode=`mode` on configs/`config` in `workdir`, failing the demo if it fails."""
    command = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
               os.path.join(ROOT, "configs", config), f"--workdir={workdir}",
               f"--mode={mode}", *extra]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    extra = sys.argv[1:]
    times = {"start": time.time()}
    run_main("train", WORKDIR, extra)
    times["train"] = time.time()
    run_main("sample", WORKDIR, ["--config.sample.num_samples=1000", *extra])
    times["sample"] = time.time()
    samples_dir = os.path.join(WORKDIR, "samples")
    run_main("eval", WORKDIR, ["--config.eval.metrics=digits",
                               f"--config.eval.samples_dir={samples_dir}",
                               "--config.eval.num_samples=1000", *extra])
    with open(os.path.join(WORKDIR, "eval_digits.json")) as f:
        scores = json.load(f)
    print(f"\ndemo done in {time.time() - times['start']:.0f} s (train "
          f"{times['train'] - times['start']:.0f} s, "
          f"sample {times['sample'] - times['train']:.0f} s)")
    print(f"  {scores['num_samples']} samples: {samples_dir}/samples_0.npz")
    print(f"  grid (row = digit 0..9):  {WORKDIR}/samples_grid.png")
    print(f"  classifier accuracy on the samples' labels: {scores['values']['accuracy']:.3f}; "
          f"Frechet distance in the classifier's features: {scores['values']['frechet']:.2f} "
          f"({WORKDIR}/eval_digits.json)")
    print(f"  TensorBoard: tensorboard --logdir {WORKDIR}")


if __name__ == "__main__":
    main()
