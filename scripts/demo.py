"""`make demo`: train the class-conditional digits model, sample 100 images per digit with DDIM
through `main.py --mode=sample`, and score them with a classifier trained on the real digits.

Extra arguments are passed to both main.py calls, e.g. `--config.train.num_steps=500`.
"""
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKDIR = os.path.join(ROOT, "runs", "digits")


def run_main(mode: str, extra: list[str]) -> None:
    command = [sys.executable, os.path.join(ROOT, "main.py"), "--config",
               os.path.join(ROOT, "configs", "digits.py"), f"--workdir={WORKDIR}",
               f"--mode={mode}", *extra]
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    start = time.time()
    extra = sys.argv[1:]
    run_main("train", extra)
    trained = time.time()
    run_main("sample", ["--config.sample.num_samples=1000", *extra])
    sampled = time.time()

    sys.path.insert(0, ROOT)
    from jax_diffusion import digits_metrics
    samples = np.load(os.path.join(WORKDIR, "samples", "samples_0.npz"))
    scores = digits_metrics.evaluate(samples["images"], samples["labels"])
    print(f"\ndemo done in {time.time() - start:.0f} s (train {trained - start:.0f} s, "
          f"sample {sampled - trained:.0f} s)")
    print(f"  {scores['num_samples']} samples: {WORKDIR}/samples/samples_0.npz")
    print(f"  grid (row = digit 0..9):  {WORKDIR}/samples_grid.png")
    print(f"  classifier accuracy on the samples' labels: {scores['accuracy']:.3f}; "
          f"Frechet distance in the classifier's features: {scores['frechet']:.2f}")
    print(f"  TensorBoard: tensorboard --logdir {WORKDIR}")


if __name__ == "__main__":
    main()
