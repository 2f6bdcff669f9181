"""Multi-process start-up: one process per host (TPU pod worker, GPU node), joined by
`jax.distributed` before JAX touches a device.

Explicit: config.distributed.coordinator_address / num_processes / process_id, the same address
and count on every process. Automatic (config.distributed.cluster="auto" and no address given): a
SLURM job step with several tasks, or a Cloud TPU VM, calls `jax.distributed.initialize()` with no
arguments and JAX reads the topology from the environment. Anything else stays single-process.
"""
from __future__ import annotations

import glob
import os
import socket
import time
from collections.abc import Mapping

import jax
import ml_collections

from jax_diffusion.errors import ConfigError, DistributedSetupError

CLUSTERS = ("auto", "none")


def detected_cluster(environ: Mapping[str, str], tpu_chips_present: bool = False) -> str | None:
    """"slurm" or "tpu" when the environment is one that JAX's own detection handles, else None.

    SLURM counts only inside a job step (srun) of several tasks: a batch script of a job with
    several tasks runs once, as an ordinary single process. A Cloud TPU VM is recognised by its
    chips (/dev/accel*) or the variables its runtime sets; on a single host initialize() is
    harmless, on a pod it is required."""
    if int(environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1 and "SLURM_PROCID" in environ:
        return "slurm"
    if any(environ.get(name) for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
                                           "TPU_ACCELERATOR_TYPE")) or tpu_chips_present:
        return "tpu"
    return None


def validate_distributed_config(dist: ml_collections.ConfigDict) -> None:
    """config.distributed on its own; ConfigError names the key."""
    if dist.cluster not in CLUSTERS:
        raise ConfigError(f"config.distributed.cluster={dist.cluster!r} is unknown; allowed: "
                          f"{', '.join(CLUSTERS)}")
    if dist.local_device_count < 0:
        raise ConfigError(f"config.distributed.local_device_count={dist.local_device_count} must "
                          f"be >= 0 (0 leaves the device count alone)")
    if not (dist.coordinator_address or dist.num_processes > 1):
        return
    if not dist.coordinator_address or ":" not in dist.coordinator_address:
        raise ConfigError(f"config.distributed.coordinator_address={dist.coordinator_address!r} "
                          f"must be host:port of process 0, e.g. 10.0.0.2:1234, the same on "
                          f"every process")
    if dist.num_processes < 1:
        raise ConfigError(f"config.distributed.num_processes={dist.num_processes} must be the "
                          f"number of processes (>= 1) when coordinator_address is set")
    if not 0 <= dist.process_id < dist.num_processes:
        raise ConfigError(f"config.distributed.process_id={dist.process_id} must be in "
                          f"[0, {dist.num_processes}): a distinct id on every process")


def wait_for_coordinator(address: str, timeout: float) -> None:
    """Poll until process 0's coordinator accepts TCP connections at `address` (host:port).

    jaxlib aborts the process (no Python exception) when the coordinator cannot be reached, so
    the processes other than 0 check first and can fail with a message that says what to fix."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedSetupError(
                    f"no coordinator answered at config.distributed.coordinator_address={address} "
                    f"within config.distributed.initialization_timeout={timeout:g} s ({e}); start "
                    f"process 0 with the same address, and check the host name and that the "
                    f"port is open between the hosts") from None
            time.sleep(0.5)


def initialize(dist: ml_collections.ConfigDict,
               environ: Mapping[str, str] | None = None) -> bool:
    """Join the other processes when the run is multi-process; returns whether it is.

    Must run before anything touches a device. `dist` is config.distributed."""
    environ = os.environ if environ is None else environ
    validate_distributed_config(dist)
    if dist.local_device_count > 0:  # CPU only: tests and demos of multi-device code
        jax.config.update("jax_num_cpu_devices", dist.local_device_count)
    explicit = bool(dist.coordinator_address)
    cluster = None
    if dist.cluster == "auto" and not explicit:
        cluster = detected_cluster(environ, tpu_chips_present=bool(glob.glob("/dev/accel*")))
    if not explicit and cluster is None:
        return False
    # Host-side collectives (CPU devices) need an implementation across processes; GPU and TPU
    # devices use their own interconnect and ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit and dist.process_id > 0:
        wait_for_coordinator(dist.coordinator_address, dist.initialization_timeout)
    try:
        if explicit:
            jax.distributed.initialize(
                dist.coordinator_address, dist.num_processes, dist.process_id,
                initialization_timeout=dist.initialization_timeout,
                heartbeat_timeout_seconds=dist.heartbeat_timeout)
        else:
            jax.distributed.initialize(initialization_timeout=dist.initialization_timeout,
                                       heartbeat_timeout_seconds=dist.heartbeat_timeout)
    except Exception as e:  # noqa: BLE001  (jaxlib raises XlaRuntimeError / RuntimeError)
        where = dist.coordinator_address or f"the {cluster} cluster's coordinator"
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DistributedSetupError(
            f"could not join the other processes through {where} within "
            f"{dist.initialization_timeout} s ({cause}); start every process with the same "
            f"coordinator_address and num_processes and a distinct process_id, and check that "
            f"process 0 is running and the port is open") from None
    return True
