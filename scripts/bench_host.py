"""The host-side benchmark figures (steps per call, checkpoint stall, eval batch gaps), each
printed with the command that produced it:

  python scripts/bench_host.py [--workdir DIR]      (make bench runs it after bench_vs_torch.py)

  data        input pipeline img/s, CIFAR-shaped 50,000-image array_record set, batch 128,
              0/1/2 grain workers, with the plain-numpy reference of the same run
  host        host overhead per step and train-step compile times (scan, unroll), tiny model,
              steps_per_jit 1, 4, 16
  checkpoint  async Orbax save of the CIFAR train state: save duration and loop stall, the
              training loop's path (background) against Orbax's blocking part on the loop
  memory      XLA memory analysis of the CIFAR train step, batch 64 and 128 per device,
              float32/bfloat16, with and without remat; largest batch for 16/32/80 GB
  eval        Inception img/s, Flax vs torch-fidelity, same batch (torch-fidelity side only when
              torch and torch-fidelity are installed: requirements-test.txt); device idle time
              between sampling batches, overlapped and sequential; --mode=eval on 50,000
              samples projected per accelerator

Each is one `main.py --mode=bench` run; prints the machine's load (os.getloadavg) before each,
since this machine may be shared, and one JSON line with every result on stdout. The data set
is written once into <workdir>/bench_data (default .cache/bench) and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_vs_torch import REPO, log, run_json  # noqa: E402

TINY_MODEL = ("--config.model.ch=32", "--config.model.ch_mult=(1,)",
              "--config.model.num_res_blocks=1", "--config.model.attention_resolutions=()",
              "--config.data.image_size=8", "--config.train.batch_size=8")


def commands(workdir: str) -> dict[str, list[str]]:
    def main_py(config: str, parts: str, *flags: str) -> list[str]:
        return [sys.executable, os.path.join(REPO, "main.py"),
                f"--config={os.path.join(REPO, 'configs', config)}", f"--workdir={workdir}",
                "--mode=bench", f"--config.bench.parts={parts}", *flags]
    return {
        "data": main_py("cifar10.py", "data", "--config.bench.windows=5"),
        "host": main_py("digits.py", "host", *TINY_MODEL, "--config.bench.steps_per_jit=1,4,16",
                        "--config.bench.num_steps=4", "--config.bench.windows=3"),
        "checkpoint": main_py("cifar10.py", "checkpoint", "--config.bench.windows=5"),
        "memory": main_py("cifar10.py", "memory", "--config.bench.memory_batches=64,128"),
        "eval": main_py("cifar10.py", "eval", "--config.eval.batch_size=50",
                        "--config.bench.windows=3"),
    }


def figures(part: str, result: dict) -> list[str]:
    """The human-readable lines of one part's result."""
    if part == "data":
        workers = ", ".join(f"{w} workers {r:,.0f}" for w, r in
                            result["data_img_per_s_by_workers"].items())
        return [f"data_img_per_s {result['data_img_per_s']:,.0f} (best; {workers}); PNG decode "
                f"each epoch {result['data_img_per_s_png_decode']:,.0f}; plain numpy reference "
                f"{result['data_img_per_s_numpy_reference']:,.0f} img/s"]
    if part == "host":
        scan, unroll = result["train_compile_s_scan"], result["train_compile_s_unroll"]
        by_k = ", ".join(f"k={k}: {v:.2f}" for k, v in
                         result["host_overhead_ms_by_steps_per_jit"].items())
        return [f"host_overhead_ms {result['host_overhead_ms']:.2f} ({by_k}; loop "
                f"{result['host_step_loop']})",
                "compile s scan " + ", ".join(f"k={k}: {v:.1f}" for k, v in scan.items()) +
                "; unroll " + ", ".join(f"k={k}: {v:.1f}" for k, v in unroll.items()) +
                f"; scan k=16/k=1 {scan.get('16', 0) / scan.get('1', 1):.2f}x"]
    if part == "checkpoint":
        lines = [f"{result['checkpoint_bytes'] / 1e6:.0f} MB train state; medians of "
                 f"{result['windows']} saves each"]
        for suffix, name in (("", "background (the loop's path)"),
                             ("_blocking", "Orbax's blocking part on the loop")):
            lines.append(
                f"{name}: checkpoint_save_s{suffix} {result['checkpoint_save_s' + suffix]:.2f}, "
                f"checkpoint_stall_s{suffix} {result['checkpoint_stall_s' + suffix]:.3f}, "
                f"stall/save {100 * result['checkpoint_stall_ratio' + suffix]:.1f}%, a "
                f"{result['checkpoint_loop_s']:.2f} s host loop delayed "
                f"{result['checkpoint_loop_delay_s' + suffix]:.3f} s")
        return lines
    if part == "memory":
        lines = []
        for name, row in result["memory"].items():
            at = row["by_batch"].get("128") or next(iter(row["by_batch"].values()))
            lines.append(f"{name:15s} batch 128: argument {at['argument_bytes'] / 1e9:.2f} GB, "
                         f"output {at['output_bytes'] / 1e9:.2f} GB, temp "
                         f"{at['temp_bytes'] / 1e9:.2f} GB; largest batch "
                         f"{row.get('largest_batch')}")
        return lines
    ratio = result["inception_ratio_vs_torch_fidelity"]
    lines = [f"inception_img_per_s {result['inception_img_per_s']:.1f} (JAX), torch-fidelity "
             f"{result['inception_torch_fidelity_img_per_s'] or float('nan'):.1f}, ratio "
             f"{ratio if ratio is None else round(ratio, 2)} (batch {result['inception_batch']})",
             f"eval_batch_gap_ms {result['eval_batch_gap_ms']:.2f} (overlapped), "
             f"eval_batch_gap_ms_sequential {result['eval_batch_gap_ms_sequential']:.2f} "
             f"(sampling batch {result['sample_batch']})",
             f"--mode=eval, 50,000 samples, projected at 40% MFU: Inception "
             f"{result['inception_flops_per_img'] / 1e9:.2f} GFLOP/img, FID arithmetic on this "
             f"host {result['eval_fid_arithmetic_s']:.1f} s",
             "| chip | sampling | Inception | host | total |", "|---|---|---|---|---|"]
    for chip, row in result["eval_projected_s_by_chip"].items():
        lines.append(f"| {chip} | {row['sampling_s'] / 60:.1f} min | {row['inception_s']:.0f} s "
                     f"| {row['host_s']:.0f} s | {row['total_s'] / 60:.1f} min |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=os.path.join(REPO, ".cache", "bench"))
    parser.add_argument("--parts", default="data,host,checkpoint,memory,eval")
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    results = {}
    for part, command in commands(args.workdir).items():
        if part not in args.parts.split(","):
            continue
        load = os.getloadavg()[0]
        result = run_json(command)
        results[part] = {"load_1min": load, **result}
        log(f"--- {part} (load {load:.1f} on {os.cpu_count()} cores): $ {' '.join(command)}")
        for line in figures(part, result):
            log("    " + line)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
