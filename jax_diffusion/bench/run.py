"""--mode=bench: training, forward and sampling throughput on random data, compile times, and the
achieved FLOP/s and MFU from the analytic FLOP count (flops.py).

Timing for an asynchronous runtime: each function is compiled ahead of time with
jit(...).lower(...).compile(), timed on its own, then the compiled function runs
`warmup_steps` untimed calls and `windows` timed windows of `num_steps` calls, each window
ended by jax.block_until_ready on its outputs; the median window is reported. A sampler call
is a whole reverse chain, so sampling times one call per window after one warm-up call.

Human-readable lines go to the log (stderr); the result is one JSON line, last on stdout.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jax_diffusion import samplers
from jax_diffusion.bench.flops import train_flops_per_image, unet_forward_flops
from jax_diffusion.bench.options import parse_parts, parse_steps
from jax_diffusion.bench.peak_flops import peak_flops
from jax_diffusion.generation import sampling
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training.train_state import (TrainState, abstract_train_state, create_optimizer,
                                       create_train_state)
from jax_diffusion.training.train_step import make_train_step

# The accelerators the `eval` part projects --mode=eval onto: (table name, device_kind).
PROJECTION_CHIPS = (("H100 SXM", "h100"), ("A100", "a100"), ("TPU v4", "tpu v4"),
                    ("TPU v5e", "tpu v5e"), ("TPU v5p", "tpu v5p"))


def flop_rates(flops_per_img: int, img_per_s: float | None, device_kind: str,
               n_devices: int) -> tuple[float | None, float | None]:
    """(achieved TFLOP/s, MFU): analytic FLOPs per image x measured images per second, and
    that over the peak of all `n_devices`; MFU is None on a device without a known peak."""
    if img_per_s is None:
        return None, None
    achieved = flops_per_img * img_per_s
    peak = peak_flops(device_kind)
    return achieved / 1e12, (achieved / (peak * n_devices) if peak else None)


def peak_memory_bytes() -> int | None:
    """The largest peak_bytes_in_use over this process's devices; None where the backend
    keeps no memory statistics (the CPU)."""
    peaks = [stats["peak_bytes_in_use"] for stats in
             (d.memory_stats() for d in jax.local_devices())
             if stats and "peak_bytes_in_use" in stats]
    return max(peaks) if peaks else None


def compile_timed(jitted, *args) -> tuple[Callable, float]:
    """(compiled function, seconds to lower and compile it for `args`)."""
    start = time.perf_counter()
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - start


def warm_up(call: Callable[[], Any], calls: int) -> None:
    """Untimed calls, each waited for: first-run costs (allocation, thread pools) stay out."""
    for _ in range(calls):
        jax.block_until_ready(call())


def median_call_seconds(call: Callable[[], Any], calls: int, windows: int) -> float:
    """Median over `windows` of the seconds per call of `calls` calls of `call`, each window
    waiting (block_until_ready) for all its outputs: dispatch alone would time nothing."""
    per_call = []
    for _ in range(windows):
        start = time.perf_counter()
        outputs = [call() for _ in range(calls)]
        jax.block_until_ready(outputs)
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


def _random_batch(config: ml_collections.ConfigDict, batch_size: int, mesh, leading: tuple,
                  rng: np.random.Generator) -> dict:
    """Random images in [-1, 1] and labels, this process's rows as global sharded arrays."""
    local = batch_size // jax.process_count()
    size, channels = config.data.image_size, config.data.channels
    num_labels = max(config.model.num_classes, 1)
    host = {"image": rng.uniform(-1, 1, (*leading, local, size, size, channels)).astype(np.float32),
            "label": rng.integers(0, num_labels, (*leading, local)).astype(np.int32)}
    return parallel.global_batch(host, mesh, leading_axes=len(leading))


def _bench_train(config: ml_collections.ConfigDict, model: nn.Module, mesh,
                 rng: np.random.Generator) -> tuple[TrainState, dict]:
    """Train step throughput; returns the trained state (its input was donated)."""
    bench = config.bench
    tx = create_optimizer(config.train)
    state = create_train_state(config, model, tx, mesh)
    k = config.train.steps_per_jit  # one call runs k steps
    batches = _random_batch(config, bench.batch_size, mesh, (k,), rng)
    train_step = make_train_step(config, model, tx, mesh)
    compiled, compile_s = compile_timed(train_step, state, batches)
    logging.info("train: compiled in %.2f s", compile_s)

    def call():
        nonlocal state
        state, metrics = compiled(state, batches)
        return metrics  # depends on the state, so waiting for it waits for the step

    warm_up(call, bench.warmup_steps)
    step_s = median_call_seconds(call, bench.num_steps, bench.windows) / k
    img_per_s = bench.batch_size / step_s
    logging.info("train: %.1f ms/step, %.2f img/s (batch %d)", 1e3 * step_s, img_per_s,
                 bench.batch_size)
    return state, {"train_img_per_s": img_per_s, "train_step_ms": 1e3 * step_s,
                   "train_compile_s": compile_s}


def _bench_forward(config: ml_collections.ConfigDict, model: nn.Module, mesh, params,
                   rng: np.random.Generator) -> dict:
    """Model forward passes (train=False) at the sampling batch size."""
    bench = config.bench
    inputs = _random_batch(config, bench.sample_batch_size, mesh, (), rng)
    t = parallel.global_batch(
        rng.integers(0, config.diffusion.num_timesteps,
                     bench.sample_batch_size // jax.process_count()).astype(np.int32), mesh)
    y = inputs["label"] if config.model.num_classes > 0 else None

    def forward(params, x, t, y):
        return model.apply({"params": params}, x, t, y, train=False)

    batch = parallel.batch_sharded(mesh)
    jitted = jax.jit(forward, in_shardings=(parallel.replicated(mesh), batch, batch, batch),
                     out_shardings=batch)
    compiled, compile_s = compile_timed(jitted, params, inputs["image"], t, y)
    call = lambda: compiled(params, inputs["image"], t, y)  # noqa: E731
    warm_up(call, bench.warmup_steps)
    img_per_s = bench.sample_batch_size / median_call_seconds(call, bench.num_steps,
                                                              bench.windows)
    logging.info("fwd: compiled in %.2f s, %.2f img/s (batch %d)", compile_s, img_per_s,
                 bench.sample_batch_size)
    return {"fwd_img_per_s": img_per_s, "fwd_compile_s": compile_s}


def _bench_sample(config: ml_collections.ConfigDict, model: nn.Module, mesh, params,
                  sample_steps: tuple[int, ...]) -> dict:
    """Whole sampling chains, one compiled sampler per number of steps."""
    bench = config.bench
    labels = parallel.global_batch(
        sampling.default_labels(bench.sample_batch_size // jax.process_count(),
                                config.model.num_classes), mesh)
    key = jax.random.PRNGKey(bench.seed)
    img_per_s, compile_s = {}, {}
    for steps in sample_steps:
        sample_config = samplers.with_method(config, bench.method, steps)
        sample_fn = sampling.make_sample_fn(sample_config, model, mesh, bench.sample_batch_size)
        name = f"{bench.method}_{steps}"
        compiled, compile_s[name] = compile_timed(sample_fn, params, key, labels)
        call = lambda compiled=compiled: compiled(params, key, labels)  # noqa: E731
        warm_up(call, min(bench.warmup_steps, 1))
        img_per_s[name] = bench.sample_batch_size / median_call_seconds(call, 1, bench.windows)
        logging.info("sample %s: compiled in %.2f s, %.3f img/s (batch %d)", name,
                     compile_s[name], img_per_s[name], bench.sample_batch_size)
    return {"sample_img_per_s": img_per_s, "sample_compile_s": compile_s}


def run_bench(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=bench: measure the parts in config.bench.parts and print the result as one JSON
    line on stdout. `data` writes its dataset into `workdir` (unless config.bench.data_dir
    names one), `checkpoint` its checkpoints.

    Turns the persistent compilation cache off for the whole process (it must run before the
    process's first compile), so that the compile times are compiles, not cache reads.
    """
    jax.config.update("jax_enable_compilation_cache", False)
    bench = config.bench
    parts = parse_parts(bench.parts)
    # Imported only for their parts, which need the input pipeline (grain, tfds): train, fwd and
    # sample run without it (scripts/device_check.py).
    if {"data", "host", "checkpoint", "memory"} & set(parts):
        from jax_diffusion.bench import host as bench_host
    if "eval" in parts:
        from jax_diffusion.bench import evaluation as bench_eval
    sample_steps = parse_steps(bench.sample_steps) if "sample" in parts else ()
    mesh = parallel.create_mesh()
    model = create_model(config.model)
    device_kind, n_devices = jax.devices()[0].device_kind, mesh.devices.size
    size, channels = config.data.image_size, config.data.channels
    params = sum(int(np.prod(x.shape)) for x in
                 jax.tree.leaves(abstract_train_state(config, model).params))
    logging.info("bench: %s x %d, %s params, dtype %s, parts %s", device_kind, n_devices,
                 f"{params:,}", config.model.dtype, ",".join(parts))

    result: dict[str, Any] = {
        "device": device_kind, "platform": jax.devices()[0].platform, "n_devices": n_devices,
        "jax": jax.__version__, "dtype": config.model.dtype, "params": params,
        "batch": bench.batch_size, "sample_batch": bench.sample_batch_size,
        "num_steps": bench.num_steps, "warmup_steps": bench.warmup_steps,
        "windows": bench.windows, "train_img_per_s": None, "train_step_ms": None,
        "train_compile_s": None, "fwd_img_per_s": None, "fwd_compile_s": None,
        "sample_img_per_s": None, "sample_compile_s": None,
        "flops_per_train_img": train_flops_per_image(config.model, size, channels),
        "flops_per_fwd_img": unet_forward_flops(config.model, size, channels)}
    rng = np.random.default_rng(bench.seed)
    if "train" in parts:
        state, measured = _bench_train(config, model, mesh, rng)
        result.update(measured)
    elif {"fwd", "sample", "eval"} & set(parts):
        state = create_train_state(config, model, create_optimizer(config.train), mesh)
    if "fwd" in parts:
        result.update(_bench_forward(config, model, mesh, state.params, rng))
    if "sample" in parts:
        result.update(_bench_sample(config, model, mesh, state.params, sample_steps))
    if "data" in parts:
        result.update(bench_host.bench_data(config, workdir, mesh))
    if "host" in parts:
        result.update(bench_host.bench_host(config, mesh))
    if "checkpoint" in parts:
        result.update(bench_host.bench_checkpoint(config, workdir, mesh))
    if "memory" in parts:
        result.update(bench_host.bench_memory(config))
    if "eval" in parts:
        sampled = result["sample_img_per_s"] or {}
        chips = {name: peak_flops(kind) for name, kind in PROJECTION_CHIPS}
        result.update(bench_eval.bench_eval(config, mesh, model, state.params,
                                            max(sampled.values(), default=None), chips))

    peak = peak_flops(device_kind)
    result["peak_tflops"] = peak * n_devices / 1e12 if peak else None
    result["achieved_tflops"], result["mfu"] = flop_rates(
        result["flops_per_train_img"], result["train_img_per_s"], device_kind, n_devices)
    result["peak_memory_bytes"] = peak_memory_bytes()
    if result["achieved_tflops"] is not None:
        logging.info("train: %.3f TFLOP/s achieved, MFU %s", result["achieved_tflops"],
                     "n/a (no peak known for this device)" if result["mfu"] is None
                     else f"{100 * result['mfu']:.1f}%")
    print(json.dumps(result), flush=True)


