"""`make demo-distill`: distil the first demo's VP model (configs/digits_vp.py, trained into
runs/digits_vp when it is not there: distillation is written for vp models, and the demo itself
now trains a rectified flow) into a few-step student in runs/digits_distill with --mode=distill,
then score the 8- and 4-step students with the digits classifier (--mode=eval). Extra arguments
are passed to every main.py call.
"""
import json
import os
import sys
import time

from demo import ROOT, run_main

CONFIG = "digits_vp.py"
TEACHER = os.path.join(ROOT, "runs", "digits_vp")
WORKDIR = os.path.join(ROOT, "runs", "digits_distill")


def main() -> None:
    extra = sys.argv[1:]
    start = time.time()
    if not os.path.isdir(os.path.join(TEACHER, "checkpoints")):
        run_main("train", TEACHER, extra, CONFIG)
    run_main("distill", WORKDIR, ["--config.distill.method=progressive",
                                  f"--config.distill.teacher_workdir={TEACHER}", *extra], CONFIG)
    print(f"\ndistillation done in {time.time() - start:.0f} s; grids in {WORKDIR}/grids")
    for steps in (8, 4):
        run_main("eval", WORKDIR, ["--config.eval.metrics=digits",
                                   f"--config.sample.num_steps={steps}", *extra], CONFIG)
        with open(os.path.join(WORKDIR, "eval_digits.json")) as f:
            values = json.load(f)["values"]
        print(f"  {steps}-step student: classifier accuracy {values['accuracy']:.3f}, "
              f"Frechet distance {values['frechet']:.2f}")


if __name__ == "__main__":
    main()
