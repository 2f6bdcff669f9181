"""The accelerator check: what this project does on one GPU or TPU, measured unattended in at most
8 minutes, with no network and no dataset.

  python scripts/device_check.py --out=DIR [--budget-s=420]
  python scripts/device_check.py --out=DIR --tiny        (tiny networks, on a CPU, for the tests)

--tiny runs the same code path with tiny networks, batch 4 and few steps, in float32 only
(XLA:CPU takes minutes to compile a bfloat16 training step, even a tiny one); its time is
mostly compiling.

Needs the JAX stack (jax, flax, optax, orbax-checkpoint), scikit-learn's scipy, and the small
pure-Python wheels of scripts/device_requirements.txt; PyTorch only for its yardstick part. The
package is imported from this checkout, not installed. Measures these parts (the first bench,
DDPM in bfloat16, before the smoke run, the other three after torch), each in
its own process (a crash, an out-of-memory or a hung compile loses that part only, JAX's GPU
memory preallocation never meets PyTorch's, and each part's peak memory is its own):

  info       device kind and count, platform, package versions
  bench      for the DDPM CIFAR-10 network (configs/cifar10.py, 35.7M) and the Improved DDPM
             one (configs/cifar10_improved.py, 52.6M), in bfloat16 and float32, at batch 128
             per device: `--mode=bench`'s train, forward and DDIM-50 sampling img/s, compile
             times and peak device memory (jax_diffusion.bench.run.run_bench), and MFU
  smoke      300 bfloat16 training steps of the DDPM network, batch 128 per device, constant
             learning rate 2e-4 (no warm-up), on 4 fixed batches of random CIFAR-shaped images:
             no step non-finite, and the mean loss of the last 20 steps below SMOKE_DROP times
             that of the first 20 (from ~1 at the zero-initialised output, the eps-loss falls
             even on random images: at large t, x_t is mostly the noise)
  checkpoint the trained state saved and restored through
             jax_diffusion.training.checkpoints, compared leaf by leaf
  torch      the same networks and batches in PyTorch eager
             (jax_diffusion/bench/torch_yardstick.py),
             for the JAX/PyTorch ratios; only where PyTorch sees a CUDA device (--tiny: the CPU)
  inception  FID Inception-v3 feature img/s (random weights: throughput only), batch 256

MFU: the analytic FLOPs of flops.py (3 x forward per training image) x train img/s over the peak
of the precision the chip's matrix units run the model at under JAX's default precision
(jax_diffusion/bench/peak_flops.py): bfloat16 for bfloat16; for float32, TF32 on NVIDIA GPUs, one
bfloat16 pass on TPUs. `mfu_precision` names it; `mfu_vs_bf16_peak` divides by the bfloat16 peak.

A global budget (--budget-s, default 420 s, under the 8 minutes with room for the start-up) is
shared by the parts: a part starts only with enough of it left and is stopped when it runs out;
a skipped, failed or stopped part is recorded with a one-line reason and the next one runs.
DIR/device_check.json is rewritten after every part, and printed as the last stdout line at the
end; each part's log is DIR/logs/<part>.log.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The checkout's package, not an installed one: the machine's Python may be one the package's
# metadata does not list, and nothing needs installing but the wheels of device_requirements.txt.
sys.path.insert(0, REPO)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

from bench_vs_torch import last_json_line  # noqa: E402

from jax_diffusion.bench.peak_flops import default_precision, peak_flops  # noqa: E402

NETWORKS = {"ddpm": "cifar10.py", "improved": "cifar10_improved.py"}
SMOKE_DROP = 0.8  # the last window's mean loss must be below this fraction of the first's
# One level, no down- or upsampling: the tiny networks compile fastest and keep the rest of each
# config (embedding conventions, AdaGN, heads, labels, learned sigma).
TINY_MODEL = {"ch": 32, "ch_mult": (1,), "num_res_blocks": 1, "attention_resolutions": ()}
TINY_IMAGE_SIZE = 8
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "ml_collections",
            "torch")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each part measures; `min_s`: the budget a part needs left to be started."""

    batch_per_device: int = 128
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    smoke_dtype: str = "bfloat16"
    sample_steps: int = 50
    timed_calls: int = 10
    warmup_calls: int = 2
    windows: int = 3
    smoke_steps: int = 300
    smoke_window: int = 20
    smoke_lr: float = 2e-4
    inception_batch: int = 256
    inception_batches: int = 4
    tiny: bool = False
    min_s: dict[str, float] = dataclasses.field(default_factory=lambda: {
        "info": 20, "bench": 90, "smoke": 75, "torch": 30, "inception": 40})


FULL = Sizes()
TINY = Sizes(batch_per_device=4, dtypes=("float32",), smoke_dtype="float32", timed_calls=2,
             warmup_calls=1, windows=1, smoke_steps=60, smoke_window=10, smoke_lr=1e-3,
             inception_batch=2, inception_batches=2, tiny=True,
             min_s={"info": 5, "bench": 5, "smoke": 5, "torch": 5, "inception": 5})


def last_line(text: str) -> str:
    """The last non-empty line of a log or message, trimmed: a failure's one-line reason."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ------------------------------------------------------------------------- worker side
# Workers import JAX (or PyTorch) inside: the parent never does, so it never holds the device.
def network_config(network: str, dtype: str, sizes: Sizes):
    """configs/<network>'s config, computing in `dtype`; the tiny networks with --tiny."""
    from jax_diffusion.config_files import load_config_file

    config = load_config_file(os.path.join(REPO, "configs", NETWORKS[network]))
    config.model.dtype = dtype
    if sizes.tiny:
        config.model.update(TINY_MODEL)
        config.data.image_size = TINY_IMAGE_SIZE
    return config


def worker_info(spec: dict, sizes: Sizes) -> dict:
    """The devices JAX sees and the versions of the stack."""
    import jax

    versions = {}
    for package in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    device = jax.devices()[0]
    return {"device_kind": device.device_kind, "device_count": jax.device_count(),
            "platform": device.platform, "python": sys.version.split()[0], "versions": versions}


def worker_bench(spec: dict, sizes: Sizes) -> None:
    """`--mode=bench`'s train, fwd and sample parts; run_bench prints its JSON line last."""
    import jax

    from jax_diffusion.bench.run import run_bench

    config = network_config(spec["network"], spec["dtype"], sizes)
    b = config.bench
    b.parts = "train,fwd,sample"
    b.batch_size = b.sample_batch_size = sizes.batch_per_device * jax.device_count()
    b.num_steps, b.warmup_steps, b.windows = (sizes.timed_calls, sizes.warmup_calls,
                                              sizes.windows)
    b.sample_steps, b.method = str(sizes.sample_steps), "ddim"
    with tempfile.TemporaryDirectory() as workdir:
        run_bench(config, workdir)


def _guarded(part: Callable[[], dict]) -> dict:
    """part()'s result, or {"ok": False, "reason": ...} when it raises."""
    try:
        return part()
    except Exception as e:  # noqa: BLE001  (a failed part is recorded, the check goes on)
        logging.exception("part failed")
        return {"ok": False, "reason": last_line(f"{type(e).__name__}: {e}")}


def worker_smoke(spec: dict, sizes: Sizes) -> dict:
    """A short bfloat16 training run on random images, then a checkpoint round-trip of its state."""
    import jax
    import numpy as np

    from jax_diffusion.training import checkpoints
    from jax_diffusion.runtime import parallel
    from jax_diffusion.models import create_model
    from jax_diffusion.training.train_state import (abstract_train_state, create_optimizer,
                                           create_train_state)
    from jax_diffusion.training.train_step import make_train_step

    config = network_config("ddpm", sizes.smoke_dtype, sizes)
    config.train.update(batch_size=sizes.batch_per_device * jax.device_count(), warmup_steps=0,
                        lr=sizes.smoke_lr, steps_per_jit=1)
    mesh = parallel.create_mesh()
    model = create_model(config.model)
    tx = create_optimizer(config.train)
    state = create_train_state(config, model, tx, mesh)
    rng = np.random.default_rng(0)
    size = config.data.image_size
    # A few fixed batches, cycled: the data costs nothing and the loss can only fall by learning.
    batches = [parallel.global_batch(
        {"image": rng.uniform(-1, 1, (1, config.train.batch_size, size, size, 3)).astype(
            np.float32), "label": np.zeros((1, config.train.batch_size), np.int32)},
        mesh, leading_axes=1) for _ in range(4)]
    step = make_train_step(config, model, tx, mesh)

    def smoke() -> dict:
        nonlocal state
        start = time.perf_counter()
        metrics = []
        for i in range(sizes.smoke_steps):
            state, m = step(state, batches[i % len(batches)])
            metrics.append(m)
        metrics = jax.device_get(metrics)  # one wait at the end: the steps run back to back
        seconds = time.perf_counter() - start
        losses = np.concatenate([m["loss"] for m in metrics])
        finite = bool(np.all(np.concatenate([m["finite"] for m in metrics]) == 1)
                      and np.all(np.isfinite(losses)))
        window = sizes.smoke_window
        first, last = float(losses[:window].mean()), float(losses[-window:].mean())
        return {"ok": True, "dtype": sizes.smoke_dtype, "steps": sizes.smoke_steps,
                "batch": config.train.batch_size, "seconds_with_compile": seconds,
                "finite": finite, "loss_first": first, "loss_last": last,
                "loss_decreased": finite and last < SMOKE_DROP * first}

    def roundtrip() -> dict:
        with tempfile.TemporaryDirectory() as workdir:
            start = time.perf_counter()
            manager = checkpoints.create_manager(workdir)
            step_number = int(state.step)
            checkpoints.save(manager, step_number, state, config, {"smoke": True})
            manager.wait_until_finished()
            save_s = time.perf_counter() - start
            start = time.perf_counter()
            restored, data_state = checkpoints.restore_train_state(
                checkpoints.create_manager(workdir, read_only=True), step_number,
                abstract_train_state(config, model), parallel.replicated(mesh))
            restore_s = time.perf_counter() - start
        saved_leaves, restored_leaves = (jax.tree.leaves(jax.device_get(tree))
                                         for tree in (state, restored))
        same = (len(saved_leaves) == len(restored_leaves) and data_state == {"smoke": True}
                and all(a.dtype == b.dtype and np.array_equal(a, b)
                        for a, b in zip(saved_leaves, restored_leaves, strict=True)))
        return {"ok": same, "step": step_number, "leaves": len(saved_leaves), "save_s": save_s,
                "restore_s": restore_s, **({} if same else {"reason": "restored state differs"})}

    return {"smoke": _guarded(smoke), "checkpoint": _guarded(roundtrip)}


def worker_inception(spec: dict, sizes: Sizes) -> dict:
    """FID Inception-v3 features of random uint8 CIFAR-sized images, as --mode=eval computes
    them (inception_features: resize, network, over all devices)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_diffusion.runtime import parallel
    from jax_diffusion.evaluation import inception

    module = inception.FIDInceptionV3()
    size = inception.INPUT_SIZE
    variables = jax.jit(module.init)(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
    mesh = parallel.create_mesh()
    batch = sizes.inception_batch * jax.device_count()
    images = np.random.default_rng(0).integers(
        0, 256, (batch * sizes.inception_batches, 32, 32, 3), dtype=np.uint8)

    def features(x: np.ndarray) -> float:
        start = time.perf_counter()
        jax.block_until_ready(inception.inception_features(module, variables, x, batch, mesh))
        return time.perf_counter() - start

    first_call_s = features(images[:batch])  # compiles
    seconds = features(images)
    return {"ok": True, "inception_img_per_s": len(images) / seconds, "inception_batch": batch,
            "inception_first_call_s": first_call_s}


def worker_torch(spec: dict, sizes: Sizes) -> dict:
    """The PyTorch yardstick's train and forward img/s for every network and dtype."""
    import torch

    from jax_diffusion.bench import torch_yardstick

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not sizes.tiny:  # the full networks on a CPU: minutes, no ratio
        return {"device": device, "runs": {}, "reason": "PyTorch sees no CUDA device"}
    runs = {}
    for network in NETWORKS:
        for dtype in sizes.dtypes:
            def run(network: str = network, dtype: str = dtype) -> dict:
                config = network_config(network, dtype, sizes)
                return {"ok": True, **torch_yardstick.benchmark(
                    config, sizes.batch_per_device, sizes.batch_per_device, dtype, device,
                    warmup=sizes.warmup_calls + 1, steps=sizes.timed_calls)}
            runs[f"{network}/{dtype}"] = _guarded(run)
            if device == "cuda":
                torch.cuda.empty_cache()
    return {"device": device, "runs": runs}


WORKERS: dict[str, Callable[[dict, Sizes], dict | None]] = {
    "info": worker_info, "bench": worker_bench, "smoke": worker_smoke,
    "inception": worker_inception, "torch": worker_torch}


def run_worker(name: str, spec: dict, sizes: Sizes) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's INFO lines, dozens a save
    result = WORKERS[name](spec, sizes)
    if result is not None:  # bench prints its own JSON line
        print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------- the check
class Check:
    """The parts run one after another in child processes, against one time budget; the
    report (`self.report`) is rewritten to DIR/device_check.json after each."""

    def __init__(self, out: str, sizes: Sizes, budget_s: float):
        self.out, self.sizes, self.budget_s = out, sizes, budget_s
        self.start = time.monotonic()
        os.makedirs(os.path.join(out, "logs"), exist_ok=True)
        self.report: dict[str, Any] = {
            "tiny": sizes.tiny, "budget_s": budget_s, "device_kind": None, "device_count": None,
            "platform": None, "batch_per_device": sizes.batch_per_device,
            "sample_method": f"ddim_{sizes.sample_steps}",
            "results": [self._empty_entry(n, d) for n in NETWORKS for d in sizes.dtypes],
            "smoke_loss_decreased": False, "checkpoint_roundtrip_ok": False,
            "smoke": None, "checkpoint": None, "inception": None, "torch_device": None,
            "parts": {}, "elapsed_s": 0.0}

    @staticmethod
    def _empty_entry(network: str, dtype: str) -> dict:
        keys = ("params", "train_img_per_s", "mfu", "forward_img_per_s", "sample_img_per_s",
                "train_compile_s", "fwd_compile_s", "sample_compile_s", "peak_memory_bytes",
                "torch_train_img_per_s", "torch_forward_img_per_s", "train_ratio_vs_torch",
                "forward_ratio_vs_torch")
        return {"network": network, "dtype": dtype, **dict.fromkeys(keys)}

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 1)
        path = os.path.join(self.out, "device_check.json")
        with open(path + ".tmp", "w") as file:
            json.dump(self.report, file, indent=1)
        os.replace(path + ".tmp", path)  # never a half-written report

    def part(self, name: str, kind: str, spec: dict | None = None) -> dict | None:
        """Run worker `kind` as part `name`: its JSON result, or None (skipped or failed, with
        the reason in report["parts"])."""
        record: dict[str, Any] = {"status": "skipped"}
        self.report["parts"][name] = record
        left = self.left_s()
        if left < self.sizes.min_s[kind]:
            record["reason"] = (f"budget: {left:.0f} s left, the part needs about "
                                f"{self.sizes.min_s[kind]:.0f} s")
            return None
        log_path = os.path.join(self.out, "logs", f"{name.replace('/', '_')}.log")
        command = [sys.executable, os.path.abspath(__file__), f"--worker={kind}",
                   f"--spec={json.dumps(spec or {})}", *(["--tiny"] if self.sizes.tiny else [])]
        print(f"device_check: {name} ({left:.0f} s of the budget left)", file=sys.stderr,
              flush=True)
        start = time.monotonic()
        result = None
        try:
            with open(log_path, "w") as log:
                done = subprocess.run(command, stdout=subprocess.PIPE, stderr=log, text=True,
                                      timeout=left, cwd=REPO)
            if done.returncode != 0:
                with open(log_path) as log:
                    raise RuntimeError(f"exit {done.returncode}: {last_line(log.read())}")
            result = last_json_line(done.stdout)
            record["status"] = "ok"
        except subprocess.TimeoutExpired:
            record.update(status="failed", reason="stopped: the time budget ran out")
        except (RuntimeError, ValueError) as e:
            record.update(status="failed", reason=last_line(str(e)))
        record["seconds"] = round(time.monotonic() - start, 1)
        self.write()
        return result

    def entry(self, network: str, dtype: str) -> dict:
        return next(e for e in self.report["results"]
                    if e["network"] == network and e["dtype"] == dtype)

    def record_bench(self, network: str, dtype: str, bench: dict) -> None:
        entry = self.entry(network, dtype)
        samples = bench.get("sample_img_per_s") or {}
        compiles = bench.get("sample_compile_s") or {}
        entry.update(params=bench.get("params"), batch=bench.get("batch"),
                     train_img_per_s=bench.get("train_img_per_s"),
                     train_step_ms=bench.get("train_step_ms"),
                     forward_img_per_s=bench.get("fwd_img_per_s"),
                     sample_img_per_s=samples.get(self.report["sample_method"]),
                     train_compile_s=bench.get("train_compile_s"),
                     fwd_compile_s=bench.get("fwd_compile_s"),
                     sample_compile_s=compiles.get(self.report["sample_method"]),
                     peak_memory_bytes=bench.get("peak_memory_bytes"),
                     flops_per_train_img=bench.get("flops_per_train_img"))
        entry.update(mfu_fields(entry["flops_per_train_img"], entry["train_img_per_s"],
                                self.report["device_kind"] or bench.get("device", ""),
                                self.report["platform"] or bench.get("platform", ""), dtype,
                                self.report["device_count"] or bench.get("n_devices", 1)))

    def record_torch(self, torch_result: dict) -> None:
        for key, run in torch_result["runs"].items():
            entry = self.entry(*key.split("/"))
            if not run.get("ok"):
                entry["torch_reason"] = run.get("reason")
                continue
            entry.update(torch_train_img_per_s=run["train_img_per_s"],
                         torch_forward_img_per_s=run["fwd_img_per_s"],
                         torch_params=run["params"])

    def record_ratios(self) -> None:
        """JAX / PyTorch img/s, where both sides measured."""
        for entry in self.report["results"]:
            entry.update(train_ratio_vs_torch=ratio(entry["train_img_per_s"],
                                                    entry["torch_train_img_per_s"]),
                         forward_ratio_vs_torch=ratio(entry["forward_img_per_s"],
                                                      entry["torch_forward_img_per_s"]))

    def run(self) -> dict:
        info = self.part("info", "info")
        if info:
            self.report.update(info)
        entries = [(network, dtype) for network in NETWORKS for dtype in self.sizes.dtypes]
        # The headline figure (the DDPM network in the first dtype) first, then the smoke run and
        # the round-trip, then PyTorch's eager runs, which compile nothing, and only then the
        # compile-bound parts, the first to miss the budget.
        self.run_bench(*entries[0])
        self.run_smoke()
        self.run_torch()
        for network, dtype in entries[1:]:
            self.run_bench(network, dtype)
        self.record_ratios()
        self.report["inception"] = self.part("inception", "inception")
        self.write()
        return self.report

    def run_bench(self, network: str, dtype: str) -> None:
        bench = self.part(f"bench/{network}/{dtype}", "bench", {"network": network, "dtype": dtype})
        if bench:
            self.record_bench(network, dtype, bench)

    def run_smoke(self) -> None:
        result = self.part("smoke", "smoke") or {}
        smoke, roundtrip = result.get("smoke") or {}, result.get("checkpoint") or {}
        self.report.update(smoke=smoke or None, checkpoint=roundtrip or None,
                           smoke_loss_decreased=bool(smoke.get("loss_decreased")),
                           checkpoint_roundtrip_ok=bool(roundtrip.get("ok")))

    def run_torch(self) -> None:
        if importlib.util.find_spec("torch") is None:
            self.report["parts"]["torch"] = {"status": "skipped",
                                             "reason": "PyTorch is not installed"}
            return
        torch_result = self.part("torch", "torch")
        if torch_result is None:
            return
        self.report["torch_device"] = torch_result["device"]
        if "reason" in torch_result:
            self.report["parts"]["torch"] = {"status": "skipped", "reason": torch_result["reason"]}
        self.record_torch(torch_result)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def mfu_fields(flops_per_img: float | None, img_per_s: float | None, device_kind: str,
               platform: str, dtype: str, n_devices: int) -> dict:
    """achieved TFLOP/s and MFU against the peak of the precision `dtype` runs at, and against
    the bfloat16 peak; None where a figure or the device's peak is unknown."""
    precision = default_precision(platform, dtype)
    peak, bf16_peak = peak_flops(device_kind, precision), peak_flops(device_kind)
    achieved = flops_per_img * img_per_s if flops_per_img and img_per_s else None
    return {"achieved_tflops": achieved / 1e12 if achieved else None,
            "mfu_precision": precision,
            "peak_tflops": peak * n_devices / 1e12 if peak else None,
            "mfu": achieved / (peak * n_devices) if achieved and peak else None,
            "mfu_vs_bf16_peak": achieved / (bf16_peak * n_devices)
            if achieved and bf16_peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="where device_check.json and logs/ are written")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny networks and few steps: the code path, on a CPU, in seconds")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds for all parts together; what does not fit is skipped")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = TINY if args.tiny else FULL
    if args.worker:
        run_worker(args.worker, json.loads(args.spec), sizes)
        return
    if not args.out:
        parser.error("--out=DIR is required")
    check = Check(args.out, sizes, args.budget_s)
    try:
        check.run()
    finally:
        check.write()
        print(json.dumps(check.report), flush=True)


if __name__ == "__main__":
    main()
