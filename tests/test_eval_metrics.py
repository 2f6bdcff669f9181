"""--mode=eval's table of metrics in-process on a tiny checkpoint: all five metrics at once,
every single one and every pair, with a small random feature network standing in for the FID
Inception (the real network is tested against its references in test_evaluation.py)."""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_config import tiny_config

from jax_diffusion.evaluation import dinov2, metrics, precision_recall, run
from jax_diffusion.generation import restore, sampling
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import power_ema
from jax_diffusion.training import checkpoints
from jax_diffusion.training.train_state import create_optimizer, create_train_state

# Integration: eval runs over a checkpoint. In `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

ALL = ("digits", "fid", "is", "kid", "nll")
STEP = 3


def _config(metrics: str, samples_dir: str = ""):
    return tiny_config(eval__metrics=metrics, eval__num_samples=20, eval__nll_examples=8,
                       eval__nll_batch_size=8, eval__samples_dir=samples_dir,
                       diffusion__num_timesteps=100, sample__batch_size=16)


class RandomFeatures:
    """uint8 images -> (features [N, 16], logits [N, 10], spatial [N, 12]) through fixed random
    projections: a deterministic function of the pixels, counting how many image sets it was
    given."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.calls += 1
        flat = images.reshape(len(images), -1).astype(np.float64) / 255.0
        rng = np.random.default_rng(0)
        pool = np.tanh(flat @ rng.normal(size=(flat.shape[1], 16)) / 4.0)
        spatial = np.maximum(flat @ rng.normal(size=(flat.shape[1], 12)) / 4.0, 0.0)
        return pool, pool @ rng.normal(size=(16, 10)), spatial


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A workdir holding one checkpoint of the tiny model (random weights, its zero-initialised
    output layer perturbed so the model is not the trivial eps = 0)."""
    workdir = str(tmp_path_factory.mktemp("eval_run"))
    config = _config("nll")
    model = create_model(config.model)
    mesh = parallel.create_mesh()
    state = create_train_state(config, model, create_optimizer(config.train), mesh)
    noisy = jax.tree.map(lambda p: p + 0.01 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                         state.ema_params)
    manager = checkpoints.create_manager(workdir)
    checkpoints.save(manager, STEP, state.replace(ema_params=noisy), config, {})
    manager.wait_until_finished()
    return workdir


@pytest.fixture
def features(monkeypatch):
    extractor = RandomFeatures()
    monkeypatch.setattr(run, "inception_feature_fn", lambda config, mesh: extractor)
    return extractor


def _records(workdir, names):
    records = {}
    for name in names:
        with open(os.path.join(workdir, f"eval_{name}.json")) as f:
            records[name] = json.load(f)
    return records


def test_all_five_metrics_in_one_run_share_samples_and_features(checkpoint, features,
                                                                  monkeypatch):
    """digits,fid,is,kid,nll together: five JSON files with finite values; the samples are drawn
    once and the feature network runs twice (samples, reference set), whatever the count of
    metrics using them."""
    generated = []
    original = sampling.generate_samples

    def counting(*args, **kwargs):
        generated.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate_samples", counting)
    for name in ALL:
        path = os.path.join(checkpoint, f"eval_{name}.json")
        if os.path.exists(path):
            os.remove(path)
    run.run_eval(_config(",".join(ALL)), checkpoint)
    records = _records(checkpoint, ALL)
    assert len(generated) == 1 and features.calls == 2
    for name, record in records.items():
        assert record["checkpoint_step"] == STEP and record["params"] == "ema"
        assert all(np.isfinite(v) for v in record["values"].values()), (name, record)
    assert records["fid"]["num_samples"] == 20 and records["fid"]["source"] == "generated"
    assert records["fid"]["values"]["fid"] > 0 and records["is"]["values"]["is"] >= 1.0
    assert 0.0 <= records["digits"]["values"]["accuracy"] <= 1.0
    assert records["nll"]["num_examples"] == 8 and records["nll"]["values"]["bpd"] > 0
    assert records["fid"]["inception_preprocess"] == "tf1"
    assert os.path.exists(os.path.join(checkpoint, "reference_stats_digits_tf1.npz"))

    # Another Inception input convention never reuses these statistics: its own cache file.
    config = _config("fid")
    config.eval.inception_preprocess = "pytorch_fid"
    run.run_eval(config, checkpoint)
    assert features.calls == 4  # its samples and its own reference set
    assert os.path.exists(os.path.join(checkpoint, "reference_stats_digits_pytorch_fid.npz"))
    assert _records(checkpoint, ["fid"])["fid"]["inception_preprocess"] == "pytorch_fid"


@pytest.fixture(scope="module")
def samples_dir(checkpoint):
    """Samples written once by --mode=sample's writer, shared by the single and pair runs."""
    config = _config("nll")
    mesh = parallel.create_mesh()
    model = create_model(config.model)
    params, _ = restore.restore_for_sampling(config, checkpoint, mesh, model)
    labels = sampling.default_labels(20, 10)
    sample_fn = sampling.make_sample_fn(config, model, mesh, 16)
    images = sampling.generate_samples(sample_fn, params, labels, 16, 0, mesh, progress=False)
    folder = os.path.join(checkpoint, "samples")
    os.makedirs(folder, exist_ok=True)
    np.savez(os.path.join(folder, "samples_0.npz"), images=images, labels=labels)
    return folder


@pytest.mark.parametrize("names", [(name,) for name in ALL]
                         + list(itertools.combinations(ALL, 2)))
def test_every_single_metric_and_every_pair(checkpoint, samples_dir, features, tmp_path, names):
    """Each metric alone and each pair writes exactly its JSON files (the bug this guards:
    digits with fid raised UnboundLocalError after sampling)."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    os.symlink(os.path.join(checkpoint, "checkpoints"), os.path.join(workdir, "checkpoints"))
    run.run_eval(_config(",".join(names), samples_dir), workdir)
    written = sorted(f[len("eval_"):-len(".json")] for f in os.listdir(workdir)
                     if f.startswith("eval_"))
    assert written == sorted(names)
    for record in _records(workdir, names).values():
        assert all(np.isfinite(v) for v in record["values"].values())


def test_sweep_samples_every_setting_and_writes_table_plot(checkpoint, features, tmp_path):
    """config.eval.sweep: one row per (method, NFE), each scored by the sample metrics with the
    same seed; a JSON table and a PNG per value; the feature network and the reference
    statistics are shared (2 feature calls for the reference set and the first setting, then
    one per further setting)."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    os.symlink(os.path.join(checkpoint, "checkpoints"), os.path.join(workdir, "checkpoints"))
    config = _config("digits,fid")
    config.eval.sweep = "ddim:3,5;dpm_solver++3m:4;edm_heun:5"
    run.run_eval(config, workdir)
    assert features.calls == 2 + 3
    for value in ("accuracy", "frechet", "fid"):
        with open(os.path.join(workdir, "sweep", f"sweep_{value}.json")) as f:
            table = json.load(f)
        assert table["metric"] == value
        assert [(row["method"], row["nfe"]) for row in table["rows"]] == [
            ("ddim", 3), ("ddim", 5), ("dpm_solver++3m", 4), ("edm_heun", 5)]
        with open(os.path.join(workdir, "sweep", f"sweep_{value}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    fids = [row["fid"] for row in table["rows"]]
    assert len(set(fids)) == 4  # four different samplers, four different sample sets
    assert not any(name.startswith("eval_") for name in os.listdir(workdir))


def test_ema_sweep_rebuilds_every_width_and_writes_table_plot(checkpoint, features, tmp_path):
    """config.eval.ema_sweep: one row per width, each rebuilt from power-EMA snapshots (two
    tracked widths at steps 1..3, each a different perturbation of the checkpoint's weights)
    and scored with the same seed: different widths give different samples, hence different
    values; a JSON table and a PNG per value, at the latest snapshot's step."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    os.symlink(os.path.join(checkpoint, "checkpoints"), os.path.join(workdir, "checkpoints"))
    config = _config("digits,fid")
    mesh = parallel.create_mesh()
    params, _ = restore.restore_for_sampling(config, workdir, mesh,
                                              create_model(config.model))
    writer = power_ema.SnapshotWriter(workdir, (0.05, 0.1), every=1, last_step=STEP,
                                      resumed_step=0)
    for step in range(1, STEP + 1):
        emas = tuple(jax.tree.map(lambda p, s=step, i=i: p + 0.02 * s * (i - 0.5) * jnp.sign(p),
                                  params) for i in range(2))
        writer.after_step(step, emas)
    writer.close()
    config.eval.ema_sweep = "0.05,0.2,0.1"
    run.run_eval(config, workdir)
    assert features.calls == 2 + 2
    for value in ("accuracy", "frechet", "fid"):
        with open(os.path.join(workdir, "ema_sweep", f"ema_sweep_{value}.json")) as f:
            table = json.load(f)
        assert table["metric"] == value and table["step"] == STEP
        assert [row["sigma_rel"] for row in table["rows"]] == [0.05, 0.2, 0.1]
        with open(os.path.join(workdir, "ema_sweep", f"ema_sweep_{value}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len({row["fid"] for row in table["rows"]}) == 3
    assert not any(name.startswith("eval_") for name in os.listdir(workdir))


class RandomDINOv2:
    """A small random Flax DINOv2 (width 32, 2 blocks) through dinov2_features, sharded over the
    eval mesh like the real one, counting how many image sets it was given."""

    def __init__(self, mesh):
        self.calls, self.mesh = 0, mesh
        self.module = dinov2.DINOv2(width=32, depth=2, heads=2, mlp_hidden=64, grid=4)
        self.variables = self.module.init(jax.random.PRNGKey(5),
                                          np.zeros((1, 56, 56, 3), np.float32))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        self.calls += 1
        return dinov2.dinov2_features(self.module, self.variables, images, batch_size=8,
                                      mesh=self.mesh)


@pytest.fixture
def dinov2_features(monkeypatch):
    networks = []

    def make(config, mesh):
        networks.append(RandomDINOv2(mesh))
        return networks[-1]

    monkeypatch.setattr(run, "dinov2_feature_fn", make)
    return networks


FIELD = ("fid", "is", "kid", "pr", "sfid", "fd_dinov2")


def test_six_metrics_share_one_sampling_one_inception_and_one_dinov2_pass(
        checkpoint, features, dinov2_features, monkeypatch, tmp_path):
    """fid,is,kid,pr,sfid,fd_dinov2: six JSON files; the samples are drawn once, the Inception
    stand-in runs once on them (and once on the reference set), DINOv2 likewise; the values
    agree with the metric functions applied to the same features."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    os.symlink(os.path.join(checkpoint, "checkpoints"), os.path.join(workdir, "checkpoints"))
    generated = []
    original = sampling.generate_samples

    def counting(*args, **kwargs):
        generated.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate_samples", counting)
    run.run_eval(_config(",".join(FIELD)), workdir)
    records = _records(workdir, FIELD)
    assert len(generated) == 1 and features.calls == 2
    assert len(dinov2_features) == 1 and dinov2_features[0].calls == 2
    assert sorted(f for f in os.listdir(workdir) if f.startswith("eval_")) == sorted(
        f"eval_{name}.json" for name in FIELD)
    for name, record in records.items():
        assert record["checkpoint_step"] == STEP and record["num_samples"] == 20, name
        assert all(np.isfinite(v) for v in record["values"].values()), (name, record)
    assert set(records["pr"]["values"]) == {"precision", "recall"}
    assert 0.0 <= records["pr"]["values"]["precision"] <= 1.0 and records["pr"]["nearest_k"] == 3
    assert records["sfid"]["values"]["sfid"] > 0 and records["fd_dinov2"]["values"]["fd_dinov2"] > 0
    assert records["fd_dinov2"]["feature_network"] == "dinov2_vitl14"

    # The same numbers from the cached reference statistics and the features of the samples.
    reference = np.load(os.path.join(workdir, "reference_stats_digits_tf1.npz"))
    config = _config("fid")
    images = run.EvalContext(config, workdir, parallel.create_mesh(), *_restored(config,
                                                                                checkpoint)
                             ).samples[0]
    pool, _, spatial = RandomFeatures()(images)
    assert records["sfid"]["values"]["sfid"] == pytest.approx(metrics.frechet_distance(
        *metrics.feature_statistics(spatial), reference["spatial_mu"], reference["spatial_sigma"]))
    assert (records["pr"]["values"]["precision"], records["pr"]["values"]["recall"]) == \
        precision_recall.precision_recall(reference["features"], pool)
    dinov2_reference = np.load(os.path.join(workdir, "reference_stats_digits_dinov2.npz"))
    assert records["fd_dinov2"]["values"]["fd_dinov2"] == pytest.approx(metrics.frechet_distance(
        *metrics.feature_statistics(dinov2_features[0](images)), dinov2_reference["mu"],
        dinov2_reference["sigma"]), rel=1e-6)


def _restored(config, workdir):
    model = create_model(config.model)
    params, step = restore.restore_for_sampling(config, workdir, parallel.create_mesh(), model)
    return model, params, step


def test_sweep_scores_the_field_metrics_per_setting(checkpoint, features, dinov2_features,
                                                     tmp_path):
    """pr, sfid and fd_dinov2 in the NFE sweep: one table per value; each network runs on the
    reference set once and once per setting."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    os.symlink(os.path.join(checkpoint, "checkpoints"), os.path.join(workdir, "checkpoints"))
    config = _config("pr,sfid,fd_dinov2")
    config.eval.sweep = "ddim:3,5"
    run.run_eval(config, workdir)
    assert features.calls == 1 + 2 and dinov2_features[0].calls == 1 + 2
    for value in ("precision", "recall", "sfid", "fd_dinov2"):
        with open(os.path.join(workdir, "sweep", f"sweep_{value}.json")) as f:
            rows = json.load(f)["rows"]
        assert [(row["method"], row["nfe"]) for row in rows] == [("ddim", 3), ("ddim", 5)]
        assert all(np.isfinite(row[value]) for row in rows)
