"""--mode=bench parts for what runs around the compiled step on the host: the input pipeline
(`data`), the host's time per training step beyond the device's (`host`), asynchronous checkpoint
saves (`checkpoint`) and XLA's memory analysis of the train step (`memory`).

Figures are medians over `config.bench.windows` windows; each part returns a dict of JSON keys.
The CPU runs the device computation too, so `host` bounds what the host adds on an accelerator
from above.
"""
from __future__ import annotations

import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jax_diffusion import data
from jax_diffusion.bench import dataset as bench_dataset
from jax_diffusion.bench.options import parse_worker_counts
from jax_diffusion.config_files import comma_list
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import checkpoints
from jax_diffusion.training.train_state import (abstract_train_state, create_optimizer,
                                                create_train_state)
from jax_diffusion.training.train_step import make_train_step, next_batches, resolve_step_loop

# Device memory sizes the `memory` part reports the largest fitting batch for, in GB (1e9 B).
MEMORY_SIZES_GB = (16, 32, 80)


def _median_rate(work: Callable[[], int], windows: int) -> float:
    """Median over `windows` of (units `work()` reports) / (seconds it took)."""
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        units = work()
        rates.append(units / (time.perf_counter() - start))
    return statistics.median(rates)


def _pipeline_config(config: ml_collections.ConfigDict, data_dir: str, workers: int,
                     decoded_cache: bool) -> ml_collections.ConfigDict:
    """The CIFAR-10 recipe's pipeline (32x32x3, flips, batch config.bench.data_batch_size) over
    the benchmark's dataset."""
    piped = config.copy_and_resolve_references()
    piped.data.update(dataset=bench_dataset.NAME, tfds_data_dir=data_dir, image_size=32,
                      channels=3, random_flip=True, download=False, worker_count=workers,
                      decoded_cache=decoded_cache)
    piped.train.batch_size = config.bench.data_batch_size
    return piped


def _pipeline_img_per_s(config: ml_collections.ConfigDict, mesh, batches: int,
                        windows: int) -> float:
    """img/s of finished global batches: read, scaled, flipped and placed on the mesh (as the
    training loop does), after `batches` warm-up batches (worker start-up, first reads)."""
    iterator = data.create_train_iterator(config, seed=config.bench.seed)
    try:
        def window() -> int:
            for _ in range(batches):
                jax.block_until_ready(next_batches(iterator, 1, mesh))
            return batches * config.train.batch_size
        window()
        return _median_rate(window, windows)
    finally:
        iterator.close()


def _numpy_reference_img_per_s(images: np.ndarray, batch: int, batches: int,
                               windows: int) -> float:
    """img/s of the same work written as plain numpy on an in-memory array (random rows, scale,
    flip): what this machine allows, to judge the pipeline's figure under load."""
    rng = np.random.default_rng(0)

    def window() -> int:
        for _ in range(batches):
            rows = images[rng.integers(0, len(images), batch)]
            scaled = rows.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
            flip = rng.random(batch) < 0.5
            np.where(flip[:, None, None, None], scaled[:, :, ::-1], scaled)
        return batches * batch

    window()
    return _median_rate(window, windows)


def bench_data(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict:
    """`data`: the input pipeline's img/s for each worker count in config.bench.data_workers
    (decoded cache on), the same without the cache (PNG decoding every epoch, 0 workers), and
    the plain-numpy reference. Writes the CIFAR-shaped dataset into config.bench.data_dir or
    <workdir>/bench_data when it is not there."""
    bench = config.bench
    data_dir = bench.data_dir or os.path.join(workdir, "bench_data")
    start = time.perf_counter()
    bench_dataset.ensure_prepared(data_dir)
    logging.info("data: dataset ready in %s (%.0f s)", data_dir, time.perf_counter() - start)
    by_workers = {}
    for workers in parse_worker_counts(bench.data_workers):
        piped = _pipeline_config(config, data_dir, workers, decoded_cache=True)
        by_workers[str(workers)] = _pipeline_img_per_s(piped, mesh, bench.data_batches,
                                                       bench.windows)
        logging.info("data: %d workers, %.0f img/s", workers, by_workers[str(workers)])
    undecoded = _pipeline_img_per_s(_pipeline_config(config, data_dir, 0, decoded_cache=False),
                                    mesh, max(1, bench.data_batches // 10), bench.windows)
    images = data.DecodedFileSource(*data.decoded_cache_paths(
        bench_dataset.version_dir(data_dir), "train")).images
    reference = _numpy_reference_img_per_s(np.asarray(images), bench.data_batch_size,
                                           bench.data_batches, bench.windows)
    best = max(by_workers, key=by_workers.get)
    logging.info("data: best %s workers %.0f img/s; PNG decoding each epoch %.0f img/s; plain "
                 "numpy reference %.0f img/s", best, by_workers[best], undecoded, reference)
    return {"data_img_per_s": by_workers[best], "data_best_workers": int(best),
            "data_img_per_s_by_workers": by_workers, "data_img_per_s_png_decode": undecoded,
            "data_img_per_s_numpy_reference": reference,
            "data_batch": bench.data_batch_size}


def _host_loop_step_s(train_step, state, iterator, mesh, k: int, calls: int, log_every: int,
                      windows: int) -> tuple[Any, float]:
    """Seconds per step of the training loop's own work: next batches from the pipeline, the
    call, and a metrics fetch every `log_every` calls (train.train's loop without saving)."""
    per_step = []
    for _ in range(windows + 1):  # the first window warms the pipeline up
        start = time.perf_counter()
        pending = []
        for call in range(calls):
            state, metrics = train_step(state, next_batches(iterator, k, mesh))
            pending.append(metrics)
            if (call + 1) % log_every == 0:
                jax.device_get(pending)
                pending.clear()
        jax.device_get(pending)
        jax.block_until_ready(state)
        per_step.append((time.perf_counter() - start) / (calls * k))
    return state, statistics.median(per_step[1:])


def _device_step_s(train_step, state, batches, k: int, calls: int, windows: int
                   ) -> tuple[Any, float]:
    """Seconds per step of back-to-back calls on batches already on the devices."""
    per_step = []
    for _ in range(windows + 1):
        start = time.perf_counter()
        for _ in range(calls):
            state, _ = train_step(state, batches)
        jax.block_until_ready(state)
        per_step.append((time.perf_counter() - start) / (calls * k))
    return state, statistics.median(per_step[1:])


def bench_host(config: ml_collections.ConfigDict, mesh) -> dict:
    """`host`: for each steps_per_jit k in config.bench.steps_per_jit, the compile time of the
    train step as a scan and as an unroll, and the host overhead per step (the loop with the
    real input pipeline minus back-to-back calls on staged batches) with the step loop
    config.train.step_loop resolves to. `host_overhead_ms` is that at config.train.steps_per_jit."""
    bench = config.bench
    model = create_model(config.model)
    tx = create_optimizer(config.train)
    state = create_train_state(config, model, tx, mesh)
    ks = comma_list(bench.steps_per_jit, "config.bench.steps_per_jit", integers=True)
    ks = tuple(dict.fromkeys((*ks, config.train.steps_per_jit)))
    used_loop = resolve_step_loop(config.train.step_loop)
    compile_s = {"scan": {}, "unroll": {}}
    overhead_ms, step_ms = {}, {}
    for k in ks:
        looped = config.copy_and_resolve_references()
        looped.train.steps_per_jit = k
        iterator = data.create_train_iterator(looped, seed=bench.seed)
        batches = next_batches(iterator, k, mesh)
        for loop in ("scan", "unroll"):
            looped.train.step_loop = loop
            jitted = make_train_step(looped, model, tx, mesh)
            start = time.perf_counter()
            compiled = jitted.lower(state, batches).compile()
            compile_s[loop][str(k)] = time.perf_counter() - start
            if loop == used_loop:
                train_step = compiled
        calls = max(1, bench.num_steps * max(ks) // k)  # the same number of steps for every k
        state, device_s = _device_step_s(train_step, state, batches, k, calls, bench.windows)
        state, loop_s = _host_loop_step_s(train_step, state, iterator, mesh, k, calls,
                                          max(1, config.train.log_every // k), bench.windows)
        iterator.close()
        overhead_ms[str(k)] = 1e3 * max(loop_s - device_s, 0.0)
        step_ms[str(k)] = 1e3 * device_s
        logging.info("host: steps_per_jit %d: compile scan %.1f s, unroll %.1f s; device %.2f "
                     "ms/step, host overhead %.2f ms/step", k, compile_s["scan"][str(k)],
                     compile_s["unroll"][str(k)], step_ms[str(k)], overhead_ms[str(k)])
    return {"host_overhead_ms": overhead_ms[str(config.train.steps_per_jit)],
            "host_overhead_ms_by_steps_per_jit": overhead_ms,
            "host_device_step_ms_by_steps_per_jit": step_ms, "host_step_loop": used_loop,
            "train_compile_s_scan": compile_s["scan"],
            "train_compile_s_unroll": compile_s["unroll"]}


def _random_state(config: ml_collections.ConfigDict, mesh) -> Any:
    """A train state of config.model's shapes filled with random values (zeros would compress
    to nothing on disk), drawn with numpy on the host (no model initialisation to compile)."""
    rng = np.random.default_rng(config.bench.seed)

    def fill(leaf: jax.ShapeDtypeStruct) -> np.ndarray:
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            return rng.random(leaf.shape, dtype=np.float32).astype(leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    abstract = abstract_train_state(config, create_model(config.model))
    return jax.device_put(jax.tree.map(fill, abstract), parallel.replicated(mesh))


def _host_loop(calls: int) -> Callable[[], None]:
    """A stand-in for the training loop's own work: `calls` tiny jitted calls, each dispatched
    and waited for (Python and dispatch on the loop's thread, as in train.train)."""
    bump = jax.jit(lambda x: x + 1)
    start = jnp.zeros(())

    def loop() -> None:
        x = start
        for _ in range(calls):
            x = bump(x)
            x.block_until_ready()

    loop()
    return loop


def _timed_save(manager, save: Callable[[], None], loop: Callable[[], None]
                ) -> tuple[float, float, float]:
    """(seconds `save()` blocked its caller, seconds from its start until `loop()` run right
    after it ended, seconds until the files were complete on disk)."""
    start = time.perf_counter()
    save()
    stall = time.perf_counter() - start
    loop()
    looped = time.perf_counter() - start
    manager.wait_until_finished()
    return stall, looped, time.perf_counter() - start


def bench_checkpoint(config: ml_collections.ConfigDict, workdir: str, mesh) -> dict:
    """`checkpoint`: asynchronous saves of a train state of config.model's shapes (random
    values) through the training loop's save path (checkpoints.save): `checkpoint_stall_s` is
    how long the call blocks the loop, `checkpoint_save_s` from its start until the files are
    complete on disk (wait_until_finished). Alternating with each, the same save with Orbax's
    blocking part on the calling thread (`..._blocking` keys: the save path before background
    saves). Medians over config.bench.windows saves of each kind, and the median of the
    per-save stall/save ratios. `checkpoint_loop_delay_s[_blocking]`: how much longer a host
    loop of config.bench.checkpoint_loop_calls jitted calls takes when started with a save than
    alone (`checkpoint_loop_s`): the stall plus the background part's competition for the GIL
    and, on this CPU, for the cores that also run the device computation."""
    state = _random_state(config, mesh)
    jax.block_until_ready(state)
    size = sum(x.nbytes for x in jax.tree.leaves(state))
    # A fresh directory: Orbax does not save a step at or below one it finds there.
    directory = tempfile.mkdtemp(prefix="bench_checkpoint_", dir=workdir)
    manager = checkpoints.create_manager(directory, max_to_keep=1)
    kinds = {
        "background": lambda step: checkpoints.save(manager, step, state, config, {}),
        "blocking": lambda step: manager.save(
            step, args=checkpoints.save_args(state, config, {})),
    }
    loop = _host_loop(config.bench.checkpoint_loop_calls)
    times = {kind: [] for kind in kinds}
    alone = []
    step = 0
    try:
        for window in range(config.bench.windows + 1):  # the first saves warm Orbax up
            start = time.perf_counter()
            loop()
            alone.append(time.perf_counter() - start)
            for kind, save in kinds.items():
                step += 1
                timed = _timed_save(manager, lambda save=save, step=step: save(step), loop)
                if window:
                    times[kind].append(timed)
    finally:
        manager.close()
        shutil.rmtree(directory, ignore_errors=True)
    loop_s = statistics.median(alone[1:])
    result = {"checkpoint_bytes": size, "checkpoint_loop_s": loop_s,
              "checkpoint_background": isinstance(manager, checkpoints.BackgroundSavingManager)}
    for kind, suffix in (("background", ""), ("blocking", "_blocking")):
        stalls, looped, saves = zip(*times[kind], strict=True)
        result[f"checkpoint_stall_s{suffix}"] = statistics.median(stalls)
        result[f"checkpoint_save_s{suffix}"] = statistics.median(saves)
        result[f"checkpoint_stall_ratio{suffix}"] = statistics.median(
            stall / save for stall, _, save in times[kind])
        result[f"checkpoint_loop_delay_s{suffix}"] = statistics.median(looped) - loop_s
        logging.info("checkpoint (%s): %.0f MB state, save %.2f s, loop blocked %.3f s "
                     "(median ratio %.1f%%), a %.2f s host loop right after it delayed %.3f s",
                     kind, size / 1e6, statistics.median(saves), statistics.median(stalls),
                     100 * result[f"checkpoint_stall_ratio{suffix}"], loop_s,
                     result[f"checkpoint_loop_delay_s{suffix}"])
    return result


def _memory_analysis(config: ml_collections.ConfigDict, batch: int) -> dict:
    """XLA's memory analysis of the train step compiled for one device at `batch`."""
    mesh = parallel.create_mesh(jax.devices()[:1])
    model = create_model(config.model)
    tx = create_optimizer(config.train)
    train_step = make_train_step(config, model, tx, mesh)
    size, channels = config.data.image_size, config.data.channels
    batches = {"image": jax.ShapeDtypeStruct((1, batch, size, size, channels), jnp.float32),
               "label": jax.ShapeDtypeStruct((1, batch), jnp.int32)}
    analysis = train_step.lower(abstract_train_state(config, model), batches).compile() \
        .memory_analysis()
    return {"argument_bytes": analysis.argument_size_in_bytes,
            "output_bytes": analysis.output_size_in_bytes,
            "alias_bytes": analysis.alias_size_in_bytes,
            "temp_bytes": analysis.temp_size_in_bytes}


def largest_batch(bytes_at: dict[int, int], capacity: float) -> int:
    """The largest batch whose bytes fit `capacity`, from the total bytes at two batch sizes:
    a straight line through them (state and constants fixed, activations per image)."""
    (b0, m0), (b1, m1) = sorted(bytes_at.items())[:2]
    per_image = (m1 - m0) / (b1 - b0)
    return int((capacity - (m0 - per_image * b0)) // per_image)


def bench_memory(config: ml_collections.ConfigDict) -> dict:
    """`memory`: XLA's memory analysis (argument, output, temp bytes) of the train step of
    config.model on one device at each batch in config.bench.memory_batches, in float32 and
    bfloat16, with and without remat; and the largest per-device batch that fits
    MEMORY_SIZES_GB by that analysis (total = argument + output - aliased + temp, a line
    through the two smallest batches)."""
    batches = comma_list(config.bench.memory_batches, "config.bench.memory_batches",
                         integers=True)
    table = {}
    for dtype in ("float32", "bfloat16"):
        for remat in (False, True):
            variant = config.copy_and_resolve_references()
            variant.model.update(dtype=dtype, remat=remat)
            name = f"{dtype}{'_remat' if remat else ''}"
            per_batch = {b: _memory_analysis(variant, b) for b in batches}
            totals = {b: m["argument_bytes"] + m["output_bytes"] - m["alias_bytes"] +
                      m["temp_bytes"] for b, m in per_batch.items()}
            table[name] = {"by_batch": {str(b): {**m, "total_bytes": totals[b]}
                                        for b, m in per_batch.items()}}
            if len(batches) > 1:
                table[name]["largest_batch"] = {
                    f"{gb}GB": largest_batch(totals, gb * 1e9) for gb in MEMORY_SIZES_GB}
            logging.info("memory %s: %s", name, table[name])
    return {"memory": table}
