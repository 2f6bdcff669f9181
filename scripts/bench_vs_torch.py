"""Side-by-side throughput: this project's `--mode=bench` against the PyTorch baseline
(../shared/bench/torch_baseline.py) on the same DDPM CIFAR-10 U-Net, on this machine.

  python scripts/bench_vs_torch.py [--rounds 3]      (or: make bench)

Creates .cache/torch-venv with torch==2.13.0, diffusers and numpy when it is missing, then runs,
`--rounds` times, alternating so that drifts of a shared machine hit both sides alike: the JAX
bench (train batch 8, forward batch 16) and the PyTorch baseline with the same batches, in
float32 and in bfloat16. Each run's result is the last JSON line of its stdout. Prints the
medians over the rounds and the JAX/PyTorch ratios of train and forward img/s to stderr, and
one JSON summary line on stdout. Long: each run builds and times the 35.7M-parameter model.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_BASELINE = os.path.normpath(os.path.join(REPO, "..", "shared", "bench", "torch_baseline.py"))
TORCH_VENV = os.path.join(REPO, ".cache", "torch-venv")
# Pinned: an unpinned torch pulls several GB.
TORCH_PACKAGES = ("torch==2.13.0", "diffusers", "numpy")
PRECISIONS = ("float32", "bfloat16")
METRICS = ("train_img_per_s", "fwd_img_per_s")
TRAIN_BATCH, FWD_BATCH = 8, 16


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


def summarize(jax_runs: dict[str, list[dict]], torch_runs: dict[str, list[dict]]) -> dict:
    """Per precision: medians over the rounds of each side's train and forward img/s, and the
    ratios JAX / PyTorch (None when a side has no measurement)."""
    summary = {}
    for precision in PRECISIONS:
        row = {}
        for metric in METRICS:
            jax_value = median_or_none([run.get(metric) for run in jax_runs[precision]])
            torch_value = median_or_none([run.get(metric) for run in torch_runs[precision]])
            row[f"jax_{metric}"] = jax_value
            row[f"torch_{metric}"] = torch_value
            row[f"{metric.split('_')[0]}_ratio"] = (
                jax_value / torch_value if jax_value is not None and torch_value else None)
        summary[precision] = row
    return summary


def format_summary(summary: dict) -> list[str]:
    """Human-readable lines: one per precision and metric."""
    def number(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)
    lines = []
    for precision, row in summary.items():
        for part in ("train", "fwd"):
            jax_value = number(row[f"jax_{part}_img_per_s"], "9.2f")
            torch_value = number(row[f"torch_{part}_img_per_s"], "9.2f")
            lines.append(f"{precision:9s} {part:5s} JAX {jax_value} img/s  PyTorch {torch_value}"
                         f" img/s  JAX/PyTorch {number(row[f'{part}_ratio'], '.2f')}")
    return lines


def ensure_torch_venv() -> str:
    """The torch venv's python, creating the venv first when it is missing or incomplete."""
    python = os.path.join(TORCH_VENV, "bin", "python")
    marker = os.path.join(TORCH_VENV, ".installed")  # written only after pip succeeded
    if not os.path.exists(marker):
        log(f"creating {TORCH_VENV} with {' '.join(TORCH_PACKAGES)}")
        subprocess.run([sys.executable, "-m", "venv", TORCH_VENV], check=True)
        subprocess.run([python, "-m", "pip", "install", "--quiet", *TORCH_PACKAGES], check=True)
        open(marker, "w").close()
    return python


def jax_command(precision: str, workdir: str) -> list[str]:
    # parts=train,fwd: the baseline measures no sampling. One window of 5 steps after 2
    # warm-up ones, as the baseline times; the rounds give the medians.
    return [sys.executable, os.path.join(REPO, "main.py"),
            f"--config={os.path.join(REPO, 'configs', 'cifar10.py')}", f"--workdir={workdir}",
            "--mode=bench", "--config.bench.parts=train,fwd",
            f"--config.bench.batch_size={TRAIN_BATCH}",
            f"--config.bench.sample_batch_size={FWD_BATCH}", "--config.bench.num_steps=5",
            "--config.bench.warmup_steps=2", "--config.bench.windows=1",
            f"--config.model.dtype={precision}"]


def torch_command(torch_python: str, precision: str) -> list[str]:
    return [torch_python, TORCH_BASELINE, "--arch=ddpm", "--batch", str(TRAIN_BATCH),
            "--fwd-batch", str(FWD_BATCH), *(["--bf16"] if precision == "bfloat16" else [])]


def run_json(command: list[str]) -> dict:
    """Run a benchmark (its progress passes through to stderr); its last JSON stdout line."""
    log("$ " + " ".join(command))
    result = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench_vs_torch: the command above failed (exit {result.returncode})")
    return last_json_line(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not os.path.exists(TORCH_BASELINE):
        raise SystemExit(f"bench_vs_torch: {TORCH_BASELINE} not found")
    torch_python = ensure_torch_venv()
    jax_runs = {p: [] for p in PRECISIONS}
    torch_runs = {p: [] for p in PRECISIONS}
    with tempfile.TemporaryDirectory() as workdir:
        for round_index in range(args.rounds):
            for precision in PRECISIONS:
                log(f"--- round {round_index + 1}/{args.rounds}, {precision}")
                jax_runs[precision].append(run_json(jax_command(precision, workdir)))
                torch_runs[precision].append(run_json(torch_command(torch_python, precision)))
    summary = summarize(jax_runs, torch_runs)
    for line in format_summary(summary):
        log(line)
    print(json.dumps({"rounds": args.rounds, "train_batch": TRAIN_BATCH, "fwd_batch": FWD_BATCH,
                      "device": jax_runs[PRECISIONS[0]][0].get("device"), **summary}), flush=True)


if __name__ == "__main__":
    main()
