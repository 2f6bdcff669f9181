"""The device mesh and every sharding the project uses, in one place.

Data parallelism the jit way: one `Mesh` over all devices (of all processes) with a single axis
"data"; batches are sharded along it, the train state is replicated, and XLA inserts the
gradient all-reduce. Random numbers drawn under jit for the global batch do not depend on how
the batch is sharded, so a run gives the same numbers on 1 device or 8.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from jax_diffusion.errors import ConfigError

DATA_AXIS = "data"


def create_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state)."""
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Split the batch axis over "data"; `leading_axes` unsharded axes come first (e.g. the
    steps axis of a stacked multi-step batch)."""
    return NamedSharding(mesh, P(*([None] * leading_axes), DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
    """A global batch must split evenly over the devices of all processes."""
    n = mesh.devices.size
    if batch_size % n:
        processes = jax.process_count()
        where = (f"{n} devices: {processes} processes x {n // processes}" if processes > 1
                 else f"{n} devices")
        raise ConfigError(f"{what}={batch_size} must be divisible by the global number of devices "
                          f"({where}); pick a multiple of {n}")


def round_up_to_devices(n: int, mesh: Mesh) -> int:
    """The smallest multiple of the mesh's device count that is >= n."""
    devices = mesh.devices.size
    return -(-n // devices) * devices


def map_batches(fn: Callable[..., Any], arrays: tuple[np.ndarray, ...], batch_size: int,
                mesh: Mesh, progress: str | None = None, overlap: bool = True) -> Any:
    """fn(i, *batch_i) over batches of `batch_size` rows of the host `arrays`, each batch a global
    array sharded on "data"; the outputs (a pytree of [batch_size, ...] arrays) are fetched,
    concatenated and trimmed to the N input rows.

    Every process passes the same `arrays`, feeds only its own devices' rows, and gets all the
    outputs. The last batch is filled up by repeating rows, so one compiled `fn` serves every
    batch. `progress` names a progress bar (process 0 only); None shows none.

    With `overlap` (default), batch i+1 is dispatched before batch i is fetched: JAX runs it
    asynchronously, so the devices compute it while the host copies batch i out and places the
    next inputs, instead of idling between batches. The results are the same either way (every
    batch is the same call); overlap=False is the sequential reference (bench_eval.py times
    both)."""
    check_divisible(batch_size, mesh, "the batch size")
    num = len(arrays[0])
    num_batches = -(-num // batch_size)
    rows = np.resize(np.arange(num), num_batches * batch_size)

    def dispatch(i: int) -> Any:
        picked = rows[i * batch_size:(i + 1) * batch_size]
        out = fn(i, *(shard_global_array(a[picked], mesh) for a in arrays))
        if overlap:  # the copy to host starts as soon as the batch is done, not when fetched
            for leaf in jax.tree.leaves(out):
                if leaf.is_fully_addressable:
                    leaf.copy_to_host_async()
        return out

    outputs = []
    quiet = progress is None or jax.process_index() > 0
    ahead = dispatch(0) if overlap and num_batches else None
    for i in tqdm(range(num_batches), desc=progress, unit="batch", disable=quiet):
        if overlap:
            current, ahead = ahead, dispatch(i + 1) if i + 1 < num_batches else None
        else:
            current = dispatch(i)
        outputs.append(to_host(current))
    return jax.tree.map(lambda *parts: np.concatenate(parts)[:num], *outputs)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a host pytree on every device of the mesh."""
    return jax.device_put(tree, replicated(mesh))


def shard_global_array(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A batch-sharded global array from a host array that every process holds whole (labels to
    sample, images to score): each process places only its own devices' rows."""
    return jax.make_array_from_callback(array.shape, batch_sharded(mesh),
                                        lambda index: array[index])


def global_batch(local: Any, mesh: Mesh, leading_axes: int = 0) -> Any:
    """Assemble the global, batch-sharded arrays from this process's rows of the batch (training
    data: process p reads rows p*B/P:(p+1)*B/P of every global batch)."""
    sharding = batch_sharded(mesh, leading_axes)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def to_host(tree: Any) -> Any:
    """Fetch a (possibly sharded over several processes) pytree as numpy arrays, on every
    process."""
    def fetch(x):
        if x.is_fully_addressable:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(fetch, tree)
