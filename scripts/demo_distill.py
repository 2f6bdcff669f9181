"""`make demo-distill`: distil the demo model (runs/digits, from `make demo`) into a few-step
student in runs/digits_distill with --mode=distill, then score the 8- and 4-step students with
the digits classifier (--mode=eval). Extra arguments are passed to every main.py call.
"""
import json
import os
import sys
import time

from demo import ROOT, run_main

TEACHER = os.path.join(ROOT, "runs", "digits")
WORKDIR = os.path.join(ROOT, "runs", "digits_distill")


def main() -> None:
    if not os.path.isdir(os.path.join(TEACHER, "checkpoints")):
        sys.exit(f"error: no demo model in {TEACHER}: run `make demo` first")
    extra = sys.argv[1:]
    start = time.time()
    run_main("distill", WORKDIR, ["--config.distill.method=progressive",
                                  f"--config.distill.teacher_workdir={TEACHER}", *extra])
    print(f"\ndistillation done in {time.time() - start:.0f} s; grids in {WORKDIR}/grids")
    for steps in (8, 4):
        run_main("eval", WORKDIR, ["--config.eval.metrics=digits",
                                   f"--config.sample.num_steps={steps}", *extra])
        with open(os.path.join(WORKDIR, "eval_digits.json")) as f:
            values = json.load(f)["values"]
        print(f"  {steps}-step student: classifier accuracy {values['accuracy']:.3f}, "
              f"Frechet distance {values['frechet']:.2f}")


if __name__ == "__main__":
    main()
