"""The host side of training, without timing anything: the batch-level flip against a
plain-integer SplitMix64, the decoded cache against the tfds records it was decoded from (every
batch bit-exact, any process count), the scan and unrolled step loops against each other,
the memory fit arithmetic, the new config checks, and that every bench part runs and reports
its JSON keys."""
import json
import pickle

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from cli_helpers import run_main
from test_data import _config, _take
from tiny_config import tiny_config

from jax_diffusion import data
from jax_diffusion.bench import run as bench
from jax_diffusion.bench import dataset as bench_dataset
from jax_diffusion.bench import host as bench_host
from jax_diffusion.config_validation import validate_config
from jax_diffusion.errors import ConfigError
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import train
from jax_diffusion.training import train_step

# Integration: datasets written, bench parts run. In `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

MASK64 = (1 << 64) - 1


def _splitmix64_top_bit(seed, position):
    """The flip coin written out with Python integers (Steele, Lea & Flood 2014's finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return bool(z >> 63)


def test_flip_mask_is_splitmix64_per_position():
    seed = 3_141_592_653
    positions = np.arange(10_000, 10_300)
    mask = data.flip_mask(seed, positions)
    assert mask.tolist() == [_splitmix64_top_bit(seed, int(p)) for p in positions]
    # A position's coin does not depend on what else is in the batch.
    np.testing.assert_array_equal(data.flip_mask(seed, positions[::7]), mask[::7])
    coins = data.flip_mask(seed, np.arange(100_000))
    assert abs(coins.mean() - 0.5) < 0.005  # sd 0.0016
    assert abs(np.mean(coins[1:] == coins[:-1]) - 0.5) < 0.005  # neighbours independent
    # Negative control: another seed gives other coins.
    assert np.mean(data.flip_mask(seed + 1, positions) == mask) < 0.7


@pytest.fixture(scope="module")
def bench_data_dir(tmp_path_factory):
    """The benchmark's CIFAR-shaped tfds dataset, 512 examples (built in a subprocess)."""
    data_dir = str(tmp_path_factory.mktemp("bench_data"))
    return bench_dataset.ensure_prepared(data_dir, num_examples=512, timeout=300)


def _bench_config(data_dir, decoded_cache, batch_size=24):
    config = _config(bench_dataset.NAME, 32, 3, batch_size=batch_size, random_flip=True,
                     tfds_data_dir=data_dir)
    config.data.decoded_cache = decoded_cache
    return config


@pytest.mark.parametrize("process_count", [1, 3])
def test_decoded_cache_gives_the_batches_of_the_tfds_records(bench_data_dir, process_count):
    """32 steps cross a 21-step epoch; each process's batches equal the undecoded pipeline's."""
    for p in range(process_count):
        kwargs = dict(seed=5, process_index=p, process_count=process_count)
        decoded = _take(data.create_train_iterator(_bench_config(bench_data_dir, True), **kwargs),
                        32)
        direct = _take(data.create_train_iterator(_bench_config(bench_data_dir, False),
                                                  **kwargs), 32)
        for a, b in zip(decoded, direct, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    images_path, labels_path = data.decoded_cache_paths(
        bench_dataset.version_dir(bench_data_dir), "train")
    images, labels = np.load(images_path, mmap_mode="r"), np.load(labels_path)
    assert images.shape == (512, 32, 32, 3) and images.dtype == np.uint8
    # Record j of the cache is tfds' record j, read on its own.
    source = tfds.data_source(bench_dataset.NAME, split="train", data_dir=bench_data_dir,
                              download=False, try_gcs=False)
    for j in (0, 17, 511):
        np.testing.assert_array_equal(images[j], source[j]["image"])
        assert labels[j] == source[j]["label"]
    assert sorted(np.bincount(labels).tolist()) == [51] * 8 + [52] * 2  # i % 10 for i < 512
    # Negative control: another seed reads other batches.
    other = next(data.create_train_iterator(_bench_config(bench_data_dir, True), seed=6))
    assert not np.array_equal(other["label"], decoded[0]["label"]) or process_count > 1


def test_decoded_source_pickles_as_its_paths(bench_data_dir):
    paths = data.decoded_cache_paths(bench_dataset.version_dir(bench_data_dir), "train")
    source = data.DecodedFileSource(*paths)
    pickled = pickle.dumps(source)
    assert len(pickled) < 2000  # the paths, not the 1.5 MB of images
    copy = pickle.loads(pickled)
    np.testing.assert_array_equal(copy.read_batch(np.array([3, 1]))[0], source.images[[3, 1]])


def test_resolve_step_loop():
    assert train_step.resolve_step_loop("auto", "cpu") == "unroll"
    assert train_step.resolve_step_loop("auto", "gpu") == "scan"
    assert train_step.resolve_step_loop("auto", "tpu") == "scan"
    assert train_step.resolve_step_loop("scan", "cpu") == "scan"
    assert train_step.resolve_step_loop("unroll", "tpu") == "unroll"


def test_scan_and_unroll_train_the_same_steps():
    """Three steps in one call as a scan and as an unroll end in the same state and metrics,
    up to round-off: the parameters' distance is < 1% of how far the three steps moved them (Adam
    turns round-off in a near-zero gradient into a visible step, so the check is on the whole
    update, not elementwise); a scan that dropped or repeated a step would be >= 1/3 off."""
    config = tiny_config(train__steps_per_jit=3)
    mesh = parallel.create_mesh(jax.devices()[:1])
    model = create_model(config.model)
    tx = train.create_optimizer(config.train)
    iterator = data.create_train_iterator(config, seed=0)
    batches = {k: np.stack([b[k] for b in _take(iterator, 3)]) for k in ("image", "label")}
    initial = jax.device_get(train.create_train_state(config, model, tx, mesh).params)
    results = {}
    for loop in ("scan", "unroll"):
        config.train.step_loop = loop
        state = train.create_train_state(config, model, tx, mesh)
        step = train_step.make_train_step(config, model, tx, mesh)
        results[loop] = jax.device_get(step(state, parallel.global_batch(batches, mesh, 1)))
    (scan_state, scan_metrics), (unroll_state, unroll_metrics) = results["scan"], results["unroll"]
    assert int(scan_state.step) == int(unroll_state.step) == 3

    def distance(a, b):
        return np.sqrt(sum(np.sum((np.asarray(x, np.float64) - y) ** 2)
                           for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)))

    moved = distance(unroll_state.params, initial)
    assert distance(scan_state.params, unroll_state.params) < 0.01 * moved
    assert distance(scan_state.ema_params, unroll_state.ema_params) < 0.01 * moved
    assert scan_metrics["loss"].shape == (3,)
    np.testing.assert_allclose(scan_metrics["loss"][0], unroll_metrics["loss"][0], rtol=1e-6)
    np.testing.assert_allclose(scan_metrics["loss"], unroll_metrics["loss"], rtol=1e-3)


def test_largest_batch_is_the_line_through_two_analyses():
    # 1 GB of state plus 3 MB per image.
    totals = {64: 1e9 + 64 * 3e6, 128: 1e9 + 128 * 3e6}
    assert bench_host.largest_batch(totals, 16e9) == 5000  # (16e9 - 1e9) / 3e6
    assert bench_host.largest_batch(totals, 1e9 + 3e6 * 10.5) == 10


@pytest.mark.parametrize("key, value, words", [
    ("train.step_loop", "loop", "train.step_loop"),
    ("bench.data_workers", "0,-1", "config.bench.data_workers"),
    ("bench.steps_per_jit", "0", "config.bench.steps_per_jit"),
    ("bench.gap_batches", 1, "bench.gap_batches"),
    ("bench.checkpoint_loop_calls", 0, "bench.checkpoint_loop_calls"),
])
def test_config_errors_name_the_key(key, value, words, tmp_path):
    config = tiny_config()
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ConfigError, match=words.replace(".", r"\.")):
        validate_config(config, "bench", str(tmp_path))


HOST_KEYS = ("data_img_per_s", "data_img_per_s_by_workers", "data_img_per_s_png_decode",
             "data_img_per_s_numpy_reference", "host_overhead_ms",
             "host_overhead_ms_by_steps_per_jit", "train_compile_s_scan",
             "train_compile_s_unroll", "checkpoint_save_s", "checkpoint_stall_s",
             "checkpoint_stall_ratio", "checkpoint_loop_delay_s", "checkpoint_save_s_blocking",
             "checkpoint_stall_s_blocking", "checkpoint_stall_ratio_blocking",
             "checkpoint_loop_delay_s_blocking", "checkpoint_loop_s", "memory")


def test_bench_host_parts_report_their_keys(bench_data_dir, tmp_path):
    """--mode=bench with parts data, host, checkpoint, memory on the tiny model and small
    settings: exit 0 and every key present with a positive figure (no figure is checked)."""
    result = run_main(str(tmp_path), "--mode=bench", timeout=900,
                      bench__parts="data,host,checkpoint,memory", bench__data_dir=bench_data_dir,
                      bench__data_batches=2, bench__data_workers="0,1", bench__windows=2,
                      bench__num_steps=1, bench__steps_per_jit="1", bench__memory_batches="2,4",
                      bench__checkpoint_loop_calls=100)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(HOST_KEYS) <= set(report), set(HOST_KEYS) - set(report)
    assert set(report["data_img_per_s_by_workers"]) == {"0", "1"}
    assert report["data_img_per_s"] == max(report["data_img_per_s_by_workers"].values()) > 0
    assert report["host_overhead_ms"] >= 0 and set(report["train_compile_s_scan"]) == {"1"}
    assert 0 < report["checkpoint_stall_s"] <= report["checkpoint_save_s"]
    assert 0 < report["checkpoint_stall_s_blocking"] <= report["checkpoint_save_s_blocking"]
    assert report["checkpoint_background"] is True  # one process: the loop's save path
    assert set(report["memory"]) == {"float32", "float32_remat", "bfloat16", "bfloat16_remat"}
    for variant in report["memory"].values():
        assert set(variant["by_batch"]) == {"2", "4"}
        assert set(variant["largest_batch"]) == {"16GB", "32GB", "80GB"}
        assert variant["by_batch"]["4"]["temp_bytes"] > variant["by_batch"]["2"]["temp_bytes"]


def test_bench_eval_part_reports_both_extractors(tmp_path):
    """--mode=bench with parts sample,eval at batch 2: both Inception sides measured (torch and
    torch-fidelity are in the test requirements), their ratio, the gaps between sampling
    batches, and the projected eval time, here and per accelerator (the FID arithmetic too, as
    eval.metrics asks for fid)."""
    result = run_main(str(tmp_path), "--mode=bench", timeout=900, bench__parts="sample,eval",
                      bench__sample_steps="2", bench__windows=1, eval__batch_size=2,
                      eval__num_samples=100, eval__metrics="fid", bench__sample_batch_size=8,
                      bench__gap_batches=3)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["inception_img_per_s"] > 0 and report["inception_torch_fidelity_img_per_s"] > 0
    assert report["inception_ratio_vs_torch_fidelity"] == pytest.approx(
        report["inception_img_per_s"] / report["inception_torch_fidelity_img_per_s"])
    sample = report["sample_img_per_s"]["ddim_2"]
    assert report["eval_projected_s"] == pytest.approx(
        100 / sample + 100 / report["inception_img_per_s"])
    assert report["eval_batch_gap_ms"] >= 0 and report["eval_batch_gap_ms_sequential"] >= 0
    assert report["eval_fid_arithmetic_s"] > 0
    # Inception-v3 at 299x299: ~5.7 G multiply-adds (Szegedy et al. 2016), 2 FLOPs each.
    assert 10e9 < report["inception_flops_per_img"] < 13e9
    projected = report["eval_projected_s_by_chip"]
    assert list(projected) == [name for name, _ in bench.PROJECTION_CHIPS]
    for row in projected.values():
        assert row["total_s"] == pytest.approx(row["sampling_s"] + row["inception_s"] +
                                               row["host_s"])
        assert row["host_s"] >= report["eval_fid_arithmetic_s"]
