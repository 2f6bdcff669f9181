"""Side-by-side throughput: this project's `--mode=bench` against its PyTorch yardstick
(jax_diffusion/bench/torch_yardstick.py: the same DDPM CIFAR-10 U-Net in PyTorch eager), on this
machine.

  python scripts/bench_vs_torch.py [--rounds 3]      (or: make bench)

Needs PyTorch in this Python (requirements-test.txt, which `make bench` installs). Runs,
`--rounds` times, alternating so that drifts of a shared machine hit both sides alike: the JAX
bench on one device (train batch 8, forward batch 16), the JAX forward pass again with its batch
split over one CPU device per core, and the PyTorch yardstick with the same batches, in float32
and in bfloat16. Each run's result is the last JSON line of its stdout. Prints the
medians over the rounds and the JAX/PyTorch ratios of train and forward img/s to stderr, and
one JSON summary line on stdout. Long: each run builds and times the 35.7M-parameter model.
Then runs scripts/bench_host.py (input pipeline, host loop, checkpoint saves, device memory,
Inception throughput), which prints each figure with its command; --skip-host leaves it out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("float32", "bfloat16")
METRICS = ("train_img_per_s", "fwd_img_per_s")
TRAIN_BATCH, FWD_BATCH = 8, 16
# One CPU device per core for the split forward run, as many as divide the forward batch.
CPU_DEVICES = max(d for d in range(1, min(os.cpu_count() or 1, FWD_BATCH) + 1)
                  if FWD_BATCH % d == 0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def last_json_line(stdout: str) -> dict:
    """The JSON object on the last non-empty line of a run's stdout."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise ValueError("the run printed nothing on stdout")
    try:
        result = json.loads(lines[-1])
    except json.JSONDecodeError as e:
        raise ValueError(f"the last stdout line is not JSON ({e}): {lines[-1][:200]!r}") from e
    if not isinstance(result, dict):
        raise ValueError(f"the last stdout line is not a JSON object: {lines[-1][:200]!r}")
    return result


def median_or_none(values: list[float | None]) -> float | None:
    """The median of the values that were measured (None when none was)."""
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(jax_runs: dict[str, list[dict]], torch_runs: dict[str, list[dict]],
              jax_split_runs: dict[str, list[dict]] | None = None) -> dict:
    """Per precision measured: medians over the rounds of each side's train and forward img/s,
    and the ratios JAX / PyTorch (None when a side has no measurement). `jax_split_runs`:
    forward-only JAX runs with the batch split over one CPU device per core (fwd_split_*)."""
    summary = {}
    for precision in jax_runs:
        row = {}
        for metric in METRICS:
            jax_value = median_or_none([run.get(metric) for run in jax_runs[precision]])
            torch_value = median_or_none([run.get(metric) for run in torch_runs[precision]])
            row[f"jax_{metric}"] = jax_value
            row[f"torch_{metric}"] = torch_value
            row[f"{metric.split('_')[0]}_ratio"] = _ratio(jax_value, torch_value)
        if jax_split_runs is not None:
            split = median_or_none([run.get("fwd_img_per_s") for run in jax_split_runs[precision]])
            row["jax_fwd_split_img_per_s"] = split
            row["fwd_split_ratio"] = _ratio(split, row["torch_fwd_img_per_s"])
        summary[precision] = row
    return summary


def format_summary(summary: dict) -> list[str]:
    """Human-readable lines: one per precision and metric."""
    def number(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)
    lines = []
    for precision, row in summary.items():
        for part in ("train", "fwd", "fwd_split"):
            if f"{part}_ratio" not in row:
                continue
            jax_value = number(row[f"jax_{part}_img_per_s"], "9.2f")
            torch_value = number(row[f"torch_{part.split('_')[0]}_img_per_s"], "9.2f")
            lines.append(f"{precision:9s} {part:9s} JAX {jax_value} img/s  PyTorch {torch_value}"
                         f" img/s  JAX/PyTorch {number(row[f'{part}_ratio'], '.2f')}")
    return lines


def jax_command(precision: str, workdir: str, split_forward: bool = False) -> list[str]:
    """parts=train,fwd on one device: the baseline measures no sampling. One window of 5 steps
    after 2 warm-up ones, as the baseline times; the rounds give the medians.

    `split_forward`: the forward pass alone with its batch split over CPU_DEVICES devices, one
    per core. XLA:CPU runs some ops on one thread; two devices run two programs side by side
    and keep both cores busy."""
    devices = CPU_DEVICES if split_forward else 1
    return [sys.executable, os.path.join(REPO, "main.py"),
            f"--config={os.path.join(REPO, 'configs', 'cifar10.py')}", f"--workdir={workdir}",
            "--mode=bench", f"--config.bench.parts={'fwd' if split_forward else 'train,fwd'}",
            f"--config.distributed.local_device_count={devices}",
            f"--config.bench.batch_size={TRAIN_BATCH}",
            f"--config.bench.sample_batch_size={FWD_BATCH}", "--config.bench.num_steps=5",
            "--config.bench.warmup_steps=2", "--config.bench.windows=1",
            f"--config.model.dtype={precision}"]


# PyTorch's OpenMP threads wait for work by spinning: on a machine shared with other processes
# they lost 20x (a tiny model's training step, 2 threads: 1.03 s spinning, 0.043 s passive).
# XLA's thread pool is not OpenMP, so this changes the PyTorch side only; a user's setting stays.
TORCH_ENV = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}


def torch_command(precision: str) -> list[str]:
    """The yardstick on the CPU, with the JAX bench's batches, steps and warm-up calls."""
    return [sys.executable, "-m", "jax_diffusion.bench.torch_yardstick",
            f"--config={os.path.join(REPO, 'configs', 'cifar10.py')}", "--device=cpu",
            f"--batch={TRAIN_BATCH}", f"--fwd-batch={FWD_BATCH}", "--steps=5", "--warmup=2",
            f"--dtype={precision}"]


def run_json(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Run a benchmark (its progress passes through to stderr); its last JSON stdout line."""
    log("$ " + " ".join(command))
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"bench_vs_torch: the command above failed (exit {result.returncode})")
    return last_json_line(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="comma-separated subset of float32,bfloat16 (PyTorch's bfloat16 "
                             "convolutions crawl on a CPU without AVX-512 BF16 or AMX)")
    parser.add_argument("--skip-host", action="store_true",
                        help="do not run scripts/bench_host.py (pipeline, host loop, "
                             "checkpoint, memory, Inception figures) afterwards")
    args = parser.parse_args()
    if importlib.util.find_spec("torch") is None:
        raise SystemExit("bench_vs_torch: PyTorch is not installed in this Python: pip install "
                         "-r requirements-test.txt (or run make bench)")
    precisions = args.precisions.split(",")
    if not precisions or not set(precisions) <= set(PRECISIONS):
        raise SystemExit(f"bench_vs_torch: --precisions={args.precisions} must name some of "
                         f"{','.join(PRECISIONS)}")
    jax_runs = {p: [] for p in precisions}
    jax_split_runs = {p: [] for p in precisions}
    torch_runs = {p: [] for p in precisions}
    with tempfile.TemporaryDirectory() as workdir:
        for round_index in range(args.rounds):
            for precision in precisions:
                log(f"--- round {round_index + 1}/{args.rounds}, {precision}")
                jax_runs[precision].append(run_json(jax_command(precision, workdir)))
                jax_split_runs[precision].append(run_json(
                    jax_command(precision, workdir, split_forward=True)))
                torch_runs[precision].append(run_json(torch_command(precision), TORCH_ENV))
    summary = summarize(jax_runs, torch_runs, jax_split_runs)
    for line in format_summary(summary):
        log(line)
    host = None if args.skip_host else run_json(
        [sys.executable, os.path.join(REPO, "scripts", "bench_host.py")])
    print(json.dumps({"rounds": args.rounds, "train_batch": TRAIN_BATCH, "fwd_batch": FWD_BATCH,
                      "split_forward_devices": CPU_DEVICES,
                      "device": jax_runs[precisions[0]][0].get("device"), **summary,
                      "host": host}), flush=True)


if __name__ == "__main__":
    main()
