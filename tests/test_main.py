"""main.py through the command line: train, resume after SIGTERM, sample (twice), and the
one-line errors for bad flags, unknown config keys, a missing dataset, a non-finite loss, and
missing, corrupt or incompatible checkpoints; and --mode=bench's JSON line.

Few processes: one train run, one resume run (stopped by SIGTERM), two sample runs, one run
that diverges, and the error runs, which fail before compiling and run concurrently.
"""
import filecmp
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import numpy as np
import pytest
from cli_helpers import ENV, TIMEOUT, command, error_line, run_main
from tiny_config import DIGITS_CONFIG, ROOT

from jax_diffusion.config_files import load_config_file

pytestmark = pytest.mark.slow  # main.py end to end: training, resume, sampling runs

METRICS_LINE = re.compile(r"\] \[(\d+)\] .*loss=")


def _steps(workdir):
    folder = os.path.join(workdir, "checkpoints")
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _logged_steps(stderr):
    return [int(m.group(1)) for m in METRICS_LINE.finditer(stderr)]


def _tree_identical(a, b):
    """Same files with the same bytes under two folders."""
    compared = filecmp.dircmp(a, b)
    if compared.left_only or compared.right_only or compared.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, compared.common_files, shallow=False)
    return not mismatch and not errors and all(
        _tree_identical(os.path.join(a, d), os.path.join(b, d)) for d in compared.common_dirs)


# ------------------------------------------------------------------ fixtures: the runs
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints every 2 steps, and a pristine copy of its workdir."""
    workdir = str(tmp_path_factory.mktemp("run"))
    result = run_main(workdir, train__num_steps=4, train__checkpoint_every=2, train__log_every=2)
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot = str(tmp_path_factory.mktemp("snapshot") / "run")
    shutil.copytree(workdir, snapshot)
    return {"workdir": workdir, "snapshot": snapshot, "result": result}


@pytest.fixture(scope="module")
def error_runs(trained, tmp_path_factory):
    """The runs that must fail, started together (none of them trains or compiles more than
    the first steps), each on its own copy of the trained workdir when it needs one."""
    tmp = tmp_path_factory.mktemp("errors")

    def copy(name):
        target = str(tmp / name)
        shutil.copytree(trained["snapshot"], target)
        return target

    corrupt = copy("corrupt")
    ema_dir = os.path.join(corrupt, "checkpoints", "4", "ema_params")
    data_files = [os.path.join(d, f) for d, _, files in os.walk(ema_dir) for f in files]
    largest = max(data_files, key=os.path.getsize)  # the parameter bytes
    assert os.path.getsize(largest) > 100_000
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)
    empty_tfds = str(tmp / "empty_tfds")
    os.makedirs(empty_tfds)
    runs = {
        "bogus": (str(tmp / "w_bogus"), ["--bogus"], {}),
        "unknown_key": (str(tmp / "w_key"), ["--config.train.no_such_key=1"], {}),
        "no_dataset": (str(tmp / "w_cifar"), [], {"data__dataset": "cifar10",
                                                  "data__tfds_data_dir": empty_tfds,
                                                  "data__download": "False"}),
        "empty": (str(tmp / "w_empty"), ["--mode=sample"], {}),
        "corrupt": (corrupt, ["--mode=sample"], {}),
        "incompatible": (copy("incompatible"), ["--mode=sample"], {"model__ch": 64}),
        # Resumes at step 4; step 5 (loss from the good step-4 weights) is finite and throws
        # the weights to ~1e30; step 6 is not finite. The step-6 checkpoint must not appear.
        # No periodic logging: the check before saving is what has to catch it.
        "nan": (copy("nan"), [], {"train__num_steps": 8, "train__checkpoint_every": 2,
                                  "train__log_every": 0, "train__lr": "1e30"}),
    }
    processes = {name: subprocess.Popen(command(workdir, *args, **overrides), env=ENV, cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
                 for name, (workdir, args, overrides) in runs.items()}
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout,
                                                    stderr)
    return {"results": results, "workdirs": {name: r[0] for name, r in runs.items()},
            "empty_tfds": empty_tfds}


@pytest.fixture(scope="module")
def resumed(trained):
    """main.py again on the trained workdir with many more steps, sent SIGTERM once it has
    logged a step past 6."""
    workdir = trained["workdir"]
    log_path = os.path.join(workdir, "..", "resume_stderr.txt")
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command(workdir, train__num_steps=100000, train__checkpoint_every=1000,
                     train__log_every=1), env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
            stderr=log)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and process.poll() is None:
            with open(log_path) as f:
                logged = _logged_steps(f.read())
            if logged and max(logged) >= 6:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the run ended before it was signalled"
        assert logged and max(logged) >= 6, "no step past 6 logged in time"
        signalled_after = max(logged)
        sent = time.time()
        process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)
        exit_seconds = time.time() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    with open(log_path) as f:
        stderr = f.read()
    return {"workdir": workdir, "returncode": returncode, "exit_seconds": exit_seconds,
            "signalled_after": signalled_after, "stderr": stderr}


@pytest.fixture(scope="module")
def sampled(resumed):
    """--mode=sample on the resumed workdir (20 samples, seed 0)."""
    workdir = resumed["workdir"]
    result = run_main(workdir, "--mode=sample")
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(os.path.join(workdir, "samples", "samples_0.npz")) as f:
        arrays = {name: f[name] for name in f.files}
    with open(os.path.join(workdir, "samples_grid.png"), "rb") as f:
        grid = f.read()
    return {"workdir": workdir, "result": result, "arrays": arrays, "grid": grid}


# ------------------------------------------------------------------ train, resume, sample
def test_train_run_logs_and_checkpoints(trained):
    """A 4-step run exits 0, logs finite losses at steps 2 and 4, and leaves checkpoints 2
    and 4 with the four items (state, ema_params, config, data)."""
    result = trained["result"]
    assert _logged_steps(result.stderr) == [2, 4]
    assert "Traceback" not in result.stderr
    assert _steps(trained["workdir"]) == [2, 4]
    step_dir = os.path.join(trained["workdir"], "checkpoints", "4")
    assert {"state", "ema_params", "config", "data"} <= set(os.listdir(step_dir))
    losses = [float(x) for x in re.findall(r" loss=([0-9.eE+-]+)", result.stderr)]
    assert len(losses) == 2 and all(0.0 < x < 5.0 for x in losses)


def test_resume_then_sigterm_saves_and_exits_cleanly(trained, resumed):
    """Run again with more steps: it says "Resuming from <workdir>/checkpoints/4 at step 4",
    its first logged step is 5, and on SIGTERM it exits 0 within 60 s after saving a
    checkpoint at a step past the last one it logged (no periodic checkpoint is due before
    step 1000), keeping the older ones (max_to_keep=3)."""
    stderr = resumed["stderr"]
    checkpoint = os.path.join(os.path.abspath(trained["workdir"]), "checkpoints", "4")
    assert f"Resuming from {checkpoint} at step 4" in stderr
    assert _logged_steps(stderr)[0] == 5
    assert resumed["returncode"] == 0, stderr[-3000:]
    assert resumed["exit_seconds"] < 60
    assert "Traceback" not in stderr
    steps = _steps(trained["workdir"])
    assert steps[:2] == [2, 4] and len(steps) == 3
    saved = steps[-1]
    assert saved >= resumed["signalled_after"] > 4 and saved % 1000
    assert f"Preempted: checkpoint saved at step {saved}" in stderr
    assert set(_logged_steps(stderr)) == set(range(5, saved + 1))


def test_sample_writes_images_labels_and_grid(resumed, sampled):
    """--mode=sample restores the preemption checkpoint and writes samples/samples_0.npz with
    uint8 images [20, 8, 8, 1] and int32 labels cycling 0..9, and samples_grid.png."""
    saved = _steps(resumed["workdir"])[-1]
    assert f"Sampling 20 images from step {saved} (EMA params) with ddim, 5 steps" in \
        sampled["result"].stderr
    images, labels = sampled["arrays"]["images"], sampled["arrays"]["labels"]
    assert images.dtype == np.uint8 and images.shape == (20, 8, 8, 1)
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, np.arange(20) % 10)
    assert len(np.unique(images)) > 20  # images, not a constant
    assert sampled["grid"].startswith(b"\x89PNG")
    assert os.listdir(os.path.join(sampled["workdir"], "samples")) == ["samples_0.npz"]


def test_second_sample_run_replaces_the_files(sampled):
    """A second --mode=sample (30 samples, another seed) replaces samples_0.npz and the grid,
    and removes the files of an earlier run that it does not rewrite (samples_1.npz)."""
    workdir = sampled["workdir"]
    stale = os.path.join(workdir, "samples", "samples_1.npz")
    np.savez(stale, images=np.zeros((1, 8, 8, 1), np.uint8), labels=np.zeros((1,), np.int32))
    result = run_main(workdir, "--mode=sample", sample__num_samples=30, sample__seed=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(os.path.join(workdir, "samples")) == ["samples_0.npz"]
    with np.load(os.path.join(workdir, "samples", "samples_0.npz")) as f:
        images, labels = f["images"], f["labels"]
    assert images.shape == (30, 8, 8, 1) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(30) % 10)
    assert not np.array_equal(images[:20], sampled["arrays"]["images"])  # the new seed
    with open(os.path.join(workdir, "samples_grid.png"), "rb") as f:
        assert f.read() != sampled["grid"]


def test_eval_writes_digits_and_nll_json(sampled):
    """--mode=eval on the samples of --mode=sample: the digits metrics and the NLL bound each
    land in eval_<metric>.json with the checkpoint step, the sample count and their source."""
    import json
    workdir = sampled["workdir"]
    result = run_main(workdir, "--mode=eval", eval__metrics="digits,nll",
                  eval__samples_dir=os.path.join(workdir, "samples"), eval__num_samples=30,
                  eval__nll_examples=8, eval__nll_batch_size=8)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "eval_digits.json")) as f:
        digits = json.load(f)
    with open(os.path.join(workdir, "eval_nll.json")) as f:
        nll = json.load(f)
    step = _steps(workdir)[-1]
    assert digits["checkpoint_step"] == step and digits["params"] == "ema"
    assert digits["num_samples"] == 30 and digits["source"].endswith("samples")
    assert 0.0 <= digits["values"]["accuracy"] <= 1.0 and digits["values"]["frechet"] > 0.0
    assert nll["num_examples"] == 8 and 0.0 < nll["values"]["bpd"] < 20.0


def test_eval_without_inception_weights_names_the_file(sampled, tmp_path):
    """FID asked for with a weights path that does not exist: one line naming the file to get
    and the key. Offline with inception_weights=auto (the download server down): one line naming
    the URL, and nothing left in the cache."""
    missing = str(tmp_path / "missing.pth")
    line = error_line(run_main(sampled["workdir"], "--mode=eval", eval__metrics="fid",
                               eval__inception_weights=missing))
    assert "pt_inception-2015-12-05-6726825d.pth" in line
    assert "config.eval.inception_weights" in line and missing in line

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/pt_inception-2015-12-05-6726825d.pth"
    cache = tmp_path / "cache"
    result = subprocess.run(command(sampled["workdir"], "--mode=eval", eval__metrics="fid",
                                    eval__inception_url=url),
                            env={**ENV, "JAX_DIFFUSION_CACHE_DIR": str(cache)}, cwd=ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT)
    line = error_line(result)
    assert url in line
    assert not any(cache.rglob("*.pth*"))


# ------------------------------------------------------------------ one-line errors
def test_unknown_flag(error_runs):
    """--bogus: one error line naming the flag, nonzero exit, no traceback."""
    line = error_line(error_runs["results"]["bogus"])
    assert "bogus" in line


def test_unknown_config_key_lists_the_valid_keys(error_runs):
    """--config.train.no_such_key=1: one line naming the key and listing exactly the valid
    keys of config.train."""
    line = error_line(error_runs["results"]["unknown_key"])
    assert "config.train.no_such_key" in line
    listed = line.split("valid keys in config.train:", 1)[1].strip()
    assert listed.split(", ") == sorted(load_config_file(DIGITS_CONFIG).train.keys())


def test_missing_dataset_says_how_to_prepare_it(error_runs):
    """CIFAR-10 with an empty tfds data dir: one line naming the directory and the
    `tfds build cifar10` command to prepare it."""
    line = error_line(error_runs["results"]["no_dataset"])
    assert "tfds build cifar10 --file_format=array_record" in line
    assert error_runs["empty_tfds"] in line


BENCH_KEYS = ("device", "n_devices", "params", "batch", "dtype", "train_img_per_s",
              "train_step_ms", "train_compile_s", "sample_img_per_s", "sample_compile_s",
              "fwd_img_per_s", "flops_per_train_img", "achieved_tflops", "mfu",
              "peak_memory_bytes")


def test_bench_prints_one_json_line_with_every_key(tmp_path):
    """--mode=bench on the tiny model with small bench settings: exit 0, and the last stdout
    line is one JSON object with every documented key; sampling keyed <method>_<steps>,
    achieved TFLOP/s = FLOPs per image x img/s, and no MFU on a CPU (no known peak)."""
    result = run_main(str(tmp_path), "--mode=bench", bench__num_steps=2, bench__warmup_steps=1,
                  bench__windows=2, bench__sample_steps="2,4")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(BENCH_KEYS) <= set(report), set(BENCH_KEYS) - set(report)
    assert set(report["sample_img_per_s"]) == set(report["sample_compile_s"]) == {"ddim_2",
                                                                                 "ddim_4"}
    assert report["batch"] == 8 and report["dtype"] == "float32"
    assert report["train_img_per_s"] > 0 and report["fwd_img_per_s"] > 0
    assert report["train_img_per_s"] == pytest.approx(8e3 / report["train_step_ms"])
    assert report["achieved_tflops"] == pytest.approx(
        report["flops_per_train_img"] * report["train_img_per_s"] / 1e12)
    assert report["device"] == "cpu" and report["mfu"] is None


def test_sample_from_empty_workdir(error_runs):
    """--mode=sample with no checkpoint: one line "no checkpoint in <workdir>/checkpoints"."""
    line = error_line(error_runs["results"]["empty"])
    folder = os.path.join(os.path.abspath(error_runs["workdirs"]["empty"]), "checkpoints")
    assert f"no checkpoint in {folder}" in line


def test_sample_from_corrupt_checkpoint(error_runs):
    """A truncated parameter file in checkpoints/4/ema_params: one line naming the
    checkpoint and the damaged item, no traceback, and no samples written."""
    workdir = error_runs["workdirs"]["corrupt"]
    line = error_line(error_runs["results"]["corrupt"])
    checkpoint = os.path.join(os.path.abspath(workdir), "checkpoints", "4")
    assert f"checkpoint {checkpoint} " in line
    # TensorStore's cause, not Orbax's wrapper
    assert os.path.join(checkpoint, "ema_params") in line
    assert "truncated" in line
    assert not os.path.exists(os.path.join(workdir, "samples"))


def test_sample_with_another_model_config(error_runs):
    """Sampling with --config.model.ch=64 from a ch=32 checkpoint: one line naming the
    checkpoint and saying it does not match the model in the config."""
    workdir = error_runs["workdirs"]["incompatible"]
    line = error_line(error_runs["results"]["incompatible"])
    checkpoint = os.path.join(os.path.abspath(workdir), "checkpoints", "4")
    assert f"checkpoint {checkpoint} does not match the model in the config" in line


def test_nonfinite_loss_stops_without_saving(trained, error_runs):
    """lr=1e30 from the step-4 checkpoint: the run stops with one line naming step 6 and the
    last good checkpoint (step 4); no checkpoint after step 4 is written and checkpoint 4 is
    byte-for-byte the one the earlier run wrote."""
    workdir = error_runs["workdirs"]["nan"]
    line = error_line(error_runs["results"]["nan"])
    assert "NaN/Inf at step 6" in line
    assert "last good checkpoint (step 4)" in line
    assert _steps(workdir) == [2, 4]
    for step in ("2", "4"):
        assert _tree_identical(os.path.join(trained["snapshot"], "checkpoints", step),
                               os.path.join(workdir, "checkpoints", step))
