"""Multi-process runs for real: main.py started as two processes on localhost (2 forced CPU
devices each, joined by jax.distributed through a coordinator on 127.0.0.1, gloo collectives),
compared with one process on 4 devices.

- training: the pair's final state equals the single process's within 1e-5, only process 0
  logs, and the pair's checkpoint restores in this (single) test process;
- sampling: the pair writes exactly num_samples images with the requested labels, identical to
  single-process sampling with the same seed;
- failure: killing either process makes the other exit with JAX's "another task died" error
  within a bounded time, and restarting both resumes from the last complete checkpoint;
- preemption: SIGTERM to one process stops both after the same step, saved;
- a global batch that does not divide over both processes' devices is a one-line error.

The model is the tiny test model with ch=64. At ch=32 with 32 GroupNorm groups every group is
one channel, so the biases just before a GroupNorm have an exact gradient of zero; Adam turns
their round-off gradients into lr-sized steps, and those few weights differ by ~2e-5 between
any two reduction orders (measured; tests/test_train.py documents the same for 1 vs 8 devices).
At ch=64 every weight has a real gradient and the largest difference measured was 3.8e-6.

Every process runs in its own session, with a deadline, and is killed when a test ends.
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from cli_helpers import ENV, MAIN
from tiny_config import ROOT, tiny_config, tiny_flags

from jax_diffusion.models import create_model
from jax_diffusion.runtime import distributed
from jax_diffusion.runtime import parallel
from jax_diffusion.training import checkpoints
from jax_diffusion.training.train_state import abstract_train_state

pytestmark = pytest.mark.slow  # two real processes per run: minutes on a 2-core machine
TIMEOUT = 300        # seconds for any one run (two processes compiling on a loaded 2-core machine)
HEARTBEAT = 5        # config.distributed.heartbeat_timeout in these runs
# The eps recipe the tolerances below were measured with (digits now trains v with Min-SNR).
OVERRIDES = dict(model__ch=64, train__num_steps=4, train__log_every=1, train__checkpoint_every=2,
                 diffusion__mean_type="eps", diffusion__loss_weighting="none")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """main.py processes of one run, each logging to <log_dir>/<name>.err; all killed on exit."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, workdir, *args, count: int = 2, devices: int = 2,
              **overrides) -> None:
        """`count` processes (names <name>0, <name>1, ...) with `devices` CPU devices each."""
        port = _free_port()
        for process_id in range(count):
            joined = {} if count == 1 else {
                "distributed__coordinator_address": f"127.0.0.1:{port}",
                "distributed__num_processes": count, "distributed__process_id": process_id,
                "distributed__heartbeat_timeout": HEARTBEAT,
                "distributed__initialization_timeout": 60}
            command = [sys.executable, MAIN, f"--workdir={workdir}", *args, *tiny_flags(
                **{**OVERRIDES, **overrides, **joined, "distributed__local_device_count": devices})]
            with open(self.log(f"{name}{process_id}"), "w") as err:
                self.running[f"{name}{process_id}"] = subprocess.Popen(
                    command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                    start_new_session=True)

    def log(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.err")

    def stderr(self, name: str) -> str:
        with open(self.log(name)) as f:
            return f.read()

    def wait(self, name: str, timeout: float = TIMEOUT) -> int:
        return self.running[name].wait(timeout=timeout)

    def wait_ok(self, *names: str) -> None:
        for name in names:
            assert self.wait(name) == 0, f"{name} failed:\n{self.stderr(name)[-3000:]}"

    def kill(self, name: str) -> None:
        process = self.running[name]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def close(self) -> None:
        for name in self.running:
            self.kill(name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    processes = Processes(str(base))
    try:
        yield base, processes
    finally:
        processes.close()


@pytest.fixture(scope="module")
def trained(runs):
    """The same 4 training steps by a pair (2 x 2 devices) and by one process on 4 devices,
    then --mode=sample by a pair and by one process from the pair's final checkpoint."""
    base, processes = runs
    pair, single = base / "pair", base / "single"
    processes.start("pair_train", pair)
    processes.start("single_train", single, count=1, devices=4)
    processes.wait_ok("pair_train0", "pair_train1", "single_train0")
    shutil.copytree(pair, base / "pair_copy")
    processes.start("pair_sample", pair, "--mode=sample")
    processes.start("single_sample", base / "pair_copy", "--mode=sample", count=1, devices=4)
    processes.wait_ok("pair_sample0", "pair_sample1", "single_sample0")
    return {"pair": pair, "single": single, "single_sampled": base / "pair_copy"}


def _restore(workdir, step: int = -1):
    """The checkpoint of `workdir` at `step` (latest: -1), restored in this process onto its 8
    devices: (state on the host, data iterator state, all saved steps)."""
    config = tiny_config(model__ch=OVERRIDES["model__ch"])
    manager = checkpoints.create_manager(str(workdir), read_only=True)
    state, data_state = checkpoints.restore_train_state(
        manager, checkpoints.select_step(manager, step),
        abstract_train_state(config, create_model(config.model)),
        parallel.replicated(parallel.create_mesh()))
    return jax.device_get(state), data_state, manager.all_steps()


def _logged(stderr: str, name: str) -> list[float]:
    """The values of metric `name` in the metric lines ("[step] a=1, loss=0.5, ...")."""
    return [float(part.split("=")[1]) for line in stderr.splitlines() if "loss=" in line
            for part in line.split("] ")[-1].split(", ") if part.startswith(name + "=")]


def test_two_processes_train_like_one_with_the_same_devices(trained, runs):
    _, processes = runs
    pair, pair_data, pair_steps = _restore(trained["pair"])  # the pair's checkpoint restores here
    single, single_data, single_steps = _restore(trained["single"])
    assert sorted(pair_steps) == sorted(single_steps) == [2, 4]
    assert int(pair.step) == int(single.step) == 4
    assert pair_data == single_data  # the input position is global, not per process

    for part in ("params", "ema_params", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(pair, part)),
                        jax.tree.leaves(getattr(single, part)), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5,
                                       err_msg=part)
    # Two steps move the weights by ~2 lr = 2e-3, far above the tolerance: a lost or repeated
    # batch, or noise drawn per process, would show.
    earlier, _, _ = _restore(trained["pair"], step=2)
    moved = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(pair.params), jax.tree.leaves(earlier.params),
                                strict=True))
    assert moved > 5e-4, moved

    # Only process 0 writes metrics, with the single process's losses.
    pair_losses = _logged(processes.stderr("pair_train0"), "loss")
    single_losses = _logged(processes.stderr("single_train0"), "loss")
    assert len(pair_losses) == len(single_losses) == 4
    np.testing.assert_allclose(pair_losses, single_losses, rtol=1e-5)
    assert _logged(processes.stderr("pair_train1"), "loss") == []
    assert "Process 0 of 2: 2 local devices, 4 in all" in processes.stderr("pair_train0")


def test_two_processes_sample_like_one(trained):
    """Exactly num_samples images (20, in batches of 16: the last one padded), labels cycling
    through the classes as requested, bitwise equal to one process's with the same seed."""
    def load(workdir):
        folder = os.path.join(workdir, "samples")
        assert os.listdir(folder) == ["samples_0.npz"]  # gathered: one file, by process 0
        with np.load(os.path.join(folder, "samples_0.npz")) as f:
            return f["images"], f["labels"]

    pair_images, pair_labels = load(trained["pair"])
    single_images, single_labels = load(trained["single_sampled"])
    num_samples = tiny_config().sample.num_samples
    assert pair_images.shape == (num_samples, 8, 8, 1) and pair_images.dtype == np.uint8
    np.testing.assert_array_equal(pair_labels, np.arange(num_samples) % 10)
    np.testing.assert_array_equal(single_labels, pair_labels)
    np.testing.assert_array_equal(pair_images, single_images)
    # No duplicates: the padded last batch did not repeat images, the 20 differ pairwise.
    assert len({image.tobytes() for image in pair_images}) == num_samples


def _complete_steps(workdir) -> list[int]:
    """Finished checkpoints: Orbax renames a step's temporary folder to the bare number last."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _wait_for_steps(processes, name: str, workdir, steps: int) -> None:
    """Until process `name` has logged `steps` metric lines and a checkpoint is complete."""
    deadline = time.time() + TIMEOUT
    while not (len(_logged(processes.stderr(name), "loss")) >= steps and _complete_steps(workdir)):
        assert processes.running[name].poll() is None, processes.stderr(name)[-3000:]
        assert time.time() < deadline, f"{name} did not log {steps} steps in {TIMEOUT} s"
        time.sleep(0.2)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_killed", "coordinator_killed"])
def test_killing_one_process_stops_the_other_and_both_resume(runs, victim):
    """One process is killed (SIGKILL) mid-run; the survivor must exit with JAX's error naming a
    dead task within the heartbeat timeout plus a margin, never hang. Process 0 hosts the
    coordinator, so both directions are checked. Restarting both resumes from the last complete
    checkpoint and finishes the run."""
    base, processes = runs
    workdir = base / f"killed{victim}"
    name = f"long{victim}_"
    processes.start(name, workdir, train__num_steps=10_000)
    _wait_for_steps(processes, f"{name}0", workdir, 5)

    processes.kill(f"{name}{victim}")
    killed_at = time.time()
    survivor = f"{name}{1 - victim}"
    returncode = processes.wait(survivor, timeout=HEARTBEAT + 90)
    waited = time.time() - killed_at
    print(f"process {1 - victim} exited {waited:.1f} s after process {victim} was killed")
    stderr = processes.stderr(survivor)
    assert returncode != 0
    assert "another task died" in stderr, stderr[-3000:]
    assert waited < HEARTBEAT + 60, waited

    last = max(_complete_steps(workdir))
    processes.start(f"resume{victim}_", workdir, train__num_steps=last + 4)
    processes.wait_ok(f"resume{victim}_0", f"resume{victim}_1")
    stderr = processes.stderr(f"resume{victim}_0")
    assert f"at step {last}" in stderr, stderr[-3000:]
    assert len(_logged(stderr, "loss")) == 4  # steps last+1 .. last+4, nothing repeated
    assert max(_complete_steps(workdir)) == last + 4


def test_sigterm_to_one_process_stops_both_at_one_saved_step(runs):
    """A preemption notice (SIGTERM) reaching only process 1: JAX's preemption service makes
    both processes stop after the same step, save that checkpoint together and exit 0."""
    base, processes = runs
    workdir = base / "preempted"
    processes.start("term", workdir, train__num_steps=10_000, train__checkpoint_every=2)
    _wait_for_steps(processes, "term0", workdir, 3)
    processes.running["term1"].send_signal(signal.SIGTERM)
    processes.wait_ok("term0", "term1")
    stopped = len(_logged(processes.stderr("term0"), "loss"))
    assert max(_complete_steps(workdir)) == stopped  # the last step is saved, even off-interval
    assert f"Preempted: checkpoint saved at step {stopped}" in processes.stderr("term0")


def test_batch_that_does_not_divide_over_all_devices(runs):
    """6 images cannot be split over 2 processes x 2 devices: one error line, from each process."""
    base, processes = runs
    processes.start("odd", base / "odd", train__batch_size=6)
    for name in ("odd0", "odd1"):
        assert processes.wait(name) == 1
        last_line = processes.stderr(name).rstrip().splitlines()[-1]
        assert last_line == ("error: config.train.batch_size=6 must be divisible by the global "
                             "number of devices (4 devices: 2 processes x 2); pick a multiple of 4")


# ------------------------------------------------------------------ start-up configuration
def test_cluster_detection_from_the_environment():
    assert distributed.detected_cluster({}) is None
    assert distributed.detected_cluster({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) is None
    # The batch script of an 8-task job is not a job step: it runs once.
    assert distributed.detected_cluster({"SLURM_NTASKS": "8", "SLURM_PROCID": "0"}) is None
    slurm_step = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}
    assert distributed.detected_cluster(slurm_step) == "slurm"
    assert distributed.detected_cluster({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == "tpu"
    assert distributed.detected_cluster({}, tpu_chips_present=True) == "tpu"


def test_single_process_configs_do_not_initialize():
    """No address, no cluster: nothing to join (and nothing raised), even with cluster="auto"."""
    config = tiny_config()
    assert distributed.initialize(config.distributed, environ={}) is False
    config.distributed.cluster = "none"
    slurm_step = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "3"}
    assert distributed.initialize(config.distributed, environ=slurm_step) is False


@pytest.mark.parametrize("overrides, named", [
    (dict(cluster="mpi"), "config.distributed.cluster='mpi'"),
    (dict(num_processes=2), "config.distributed.coordinator_address=''"),
    (dict(coordinator_address="localhost"), "must be host:port"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=0), "num_processes=0"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), "process_id=2"),
    (dict(local_device_count=-1), "local_device_count=-1"),
])
def test_bad_distributed_settings_are_named(overrides, named):
    config = tiny_config()
    config.distributed.update(overrides)
    with pytest.raises(ValueError, match=re.escape(named)):
        distributed.initialize(config.distributed, environ={})


def test_no_coordinator_is_a_one_line_error(tmp_path):
    """Process 1 started alone: jaxlib would abort the process once its connect deadline passes,
    so the wait for the coordinator fails first, with a message that names the address."""
    command = [sys.executable, MAIN, f"--workdir={tmp_path}", *tiny_flags(
        distributed__coordinator_address=f"127.0.0.1:{_free_port()}",
        distributed__num_processes=2, distributed__process_id=1,
        distributed__initialization_timeout=2)]
    result = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 1
    last_line = result.stderr.rstrip().splitlines()[-1]
    assert last_line.startswith("error: no coordinator answered at "
                                "config.distributed.coordinator_address=127.0.0.1:"), last_line
    assert "within config.distributed.initialization_timeout=2 s" in last_line
