"""--mode=eval: the metrics in `config.eval.metrics` for a checkpoint, each written to
`<workdir>/eval_<metric>.json` and to TensorBoard.

  fid, is, kid  FID Inception-v3 features of generated samples against reference statistics
                of the training set (evaluation/reference_stats.py)
  pr, sfid      improved precision/recall (k = 3) on the same pool features, and the Frechet
                distance of its spatial features (ADM's evaluator), from the same Inception pass
  fd_dinov2     the Frechet distance of DINOv2 ViT-L/14 features (dgm-eval, EDM2)
  digits        classifier accuracy and Frechet distance for the offline digits model
  nll           the variational bound in bits/dim on the eval split

Every metric is a small function of one `EvalContext`, which produces what the metrics share
(the samples, their Inception and DINOv2 features, the reference statistics) lazily, each at
most once.
Adding a metric is one function and one entry in `METRICS`. Samples come from
`config.eval.samples_dir` (the samples_*.npz of --mode=sample) or are generated with the
sampler in `config.sample`.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from jax_diffusion import data, downloads
from jax_diffusion.config_checks import positive_int, require
from jax_diffusion.config_files import comma_list
from jax_diffusion.data.digits import DIGITS
from jax_diffusion.errors import ConfigError
from jax_diffusion.evaluation import (digits, dinov2, ema_sweep, inception, metrics, nll,
                                      precision_recall, reference_stats, sweep)
from jax_diffusion.evaluation.samples import read_samples_dir
from jax_diffusion.generation import restore, sampling
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel, tensorboard_writer
from jax_diffusion.training import phema, power_ema

FID_BIAS_WARNING_BELOW = 50_000

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _weights_path(resolve: Callable[[ml_collections.ConfigDict], str],
                  config: ml_collections.ConfigDict, what: str) -> str:
    """resolve(config.eval), fetching into the user cache when the weights are "auto": by process
    0 alone first; the others wait and read its copy from the shared cache or fetch their own."""
    if jax.process_index() == 0:
        path = resolve(config.eval)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"{what} weights fetched")
    if jax.process_index() > 0:
        path = resolve(config.eval)
    return path


def inception_feature_fn(config: ml_collections.ConfigDict, mesh) -> FeatureFn:
    """uint8 images -> (pool [N, 2048], logits [N, 1008], sFID spatial [N, 2023]) of the FID
    Inception-v3 in one pass, batch-sharded over `mesh`, preprocessed by
    config.eval.inception_preprocess, with the weights config.eval.inception_weights."""
    path = _weights_path(inception.resolve_weights, config, "FID Inception")
    module, variables = inception.load_inception(path)
    return functools.partial(inception.inception_features, module, variables,
                             batch_size=config.eval.batch_size, mesh=mesh,
                             preprocess=config.eval.inception_preprocess, spatial=True)


def dinov2_feature_fn(config: ml_collections.ConfigDict, mesh) -> Callable[[np.ndarray],
                                                                          np.ndarray]:
    """uint8 images -> DINOv2 ViT-L/14 class-token features [N, 1024], batch-sharded over
    `mesh`, with the weights config.eval.dinov2_weights."""
    module, variables = dinov2.load_dinov2(_weights_path(dinov2.resolve_weights, config,
                                                         "DINOv2"))
    return functools.partial(dinov2.dinov2_features, module, variables,
                             batch_size=config.eval.batch_size, mesh=mesh)


class EvalContext:
    """What the metrics of one checkpoint share, each computed on first use and kept."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh,
                 model: nn.Module, params, step: int):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.model, self.params, self.step = model, params, step

    def with_sampler(self, config: ml_collections.ConfigDict, params=None) -> EvalContext:
        """A context for the same checkpoint (or `params`) sampled with another config.sample:
        new samples, the same feature networks and reference statistics (those computed so
        far)."""
        other = EvalContext(config, self.workdir, self.mesh, self.model,
                            self.params if params is None else params, self.step)
        for shared in ("inception", "reference", "dinov2", "dinov2_reference"):
            if shared in self.__dict__:  # functools.cached_property keeps its value there
                other.__dict__[shared] = self.__dict__[shared]
        return other

    @property
    def record(self) -> dict:
        """The fields every eval JSON carries."""
        width = self.config.sample.ema_sigma_rel
        return {"checkpoint_step": self.step,
                "params": "ema" if self.config.sample.use_ema else "raw",
                **({"ema_sigma_rel": width} if width else {})}

    @functools.cached_property
    def samples(self) -> tuple[np.ndarray, np.ndarray, dict]:
        """(images uint8, labels, description of their source) of config.eval.num_samples."""
        config, num = self.config, self.config.eval.num_samples
        if num < FID_BIAS_WARNING_BELOW and {"fid", "kid"} & set(wanted_metrics(config)):
            logging.warning("FID/KID from %d samples: both are biased upwards at small N; the "
                            "papers use 50,000", num)
        if config.eval.samples_dir:
            images, labels = read_samples_dir(config.eval.samples_dir, num)
            return images, labels, {"source": config.eval.samples_dir}
        batch = parallel.round_up_to_devices(min(config.sample.batch_size, num), self.mesh)
        labels = sampling.default_labels(num, config.model.num_classes)
        sample_fn = sampling.make_sample_fn(config, self.model, self.mesh, batch)
        images = sampling.generate_samples(sample_fn, self.params, labels, batch,
                                           config.sample.seed, self.mesh)
        return images, labels, {"source": "generated", "sampler": config.sample.method,
                                "sampler_steps": config.sample.num_steps,
                                "eta": config.sample.eta,
                                "guidance_scale": config.sample.guidance_scale}

    @property
    def sample_record(self) -> dict:
        images, _, source = self.samples
        return dict(self.record, num_samples=int(len(images)), **source)

    @property
    def inception_record(self) -> dict:
        """sample_record and the FID input convention: numbers of different conventions are not
        comparable."""
        return dict(self.sample_record,
                    inception_preprocess=self.config.eval.inception_preprocess)

    @functools.cached_property
    def inception(self) -> FeatureFn:
        return inception_feature_fn(self.config, self.mesh)

    @functools.cached_property
    def sample_features(self) -> tuple[np.ndarray, ...]:
        """(pool features, logits, sFID spatial features) of the samples."""
        return self.inception(self.samples[0])

    @functools.cached_property
    def reference(self) -> dict[str, np.ndarray]:
        return reference_stats.reference_statistics(
            self.config, self.inception, self.workdir,
            spatial="sfid" in wanted_metrics(self.config))

    @functools.cached_property
    def dinov2(self) -> Callable[[np.ndarray], np.ndarray]:
        return dinov2_feature_fn(self.config, self.mesh)

    @functools.cached_property
    def dinov2_sample_features(self) -> np.ndarray:
        return self.dinov2(self.samples[0])

    @functools.cached_property
    def dinov2_reference(self) -> dict[str, np.ndarray]:
        return reference_stats.dinov2_reference_statistics(self.config, self.dinov2,
                                                           self.workdir)


def fid(ctx: EvalContext) -> dict:
    pool = ctx.sample_features[0]
    ref = ctx.reference
    value = metrics.frechet_distance(*metrics.feature_statistics(pool), ref["mu"], ref["sigma"])
    return dict(ctx.inception_record, values={"fid": value})


def inception_score(ctx: EvalContext) -> dict:
    mean, std = metrics.inception_score(ctx.sample_features[1])
    return dict(ctx.inception_record, values={"is": mean, "is_std": std})


def kid(ctx: EvalContext) -> dict:
    mean, std = metrics.kernel_inception_distance(ctx.sample_features[0],
                                                  ctx.reference["features"])
    return dict(ctx.inception_record, values={"kid": mean, "kid_std": std})


def improved_precision_recall(ctx: EvalContext) -> dict:
    """Improved precision and recall, k = 3, of the samples' pool features against the reference
    set's (evaluation/precision_recall.py)."""
    precision, recall = precision_recall.precision_recall(
        ctx.reference["features"], ctx.sample_features[0], mesh=ctx.mesh)
    return dict(ctx.inception_record, nearest_k=precision_recall.NEAREST_K,
                values={"precision": precision, "recall": recall})


def sfid(ctx: EvalContext) -> dict:
    ref = ctx.reference
    value = metrics.frechet_distance(*metrics.feature_statistics(ctx.sample_features[2]),
                                     ref["spatial_mu"], ref["spatial_sigma"])
    return dict(ctx.inception_record, values={"sfid": value})


def fd_dinov2(ctx: EvalContext) -> dict:
    ref = ctx.dinov2_reference
    value = metrics.frechet_distance(*metrics.feature_statistics(ctx.dinov2_sample_features),
                                     ref["mu"], ref["sigma"])
    return dict(ctx.sample_record, feature_network="dinov2_vitl14", values={"fd_dinov2": value})


def digits_quality(ctx: EvalContext) -> dict:
    images, labels, _ = ctx.samples
    scores = digits.evaluate(images, labels, ctx.config.data.image_size)
    return dict(ctx.sample_record,
                values={"accuracy": scores["accuracy"], "frechet": scores["frechet"]})


def nll_bound(ctx: EvalContext) -> dict:
    config = ctx.config
    images, labels = data.load_eval_arrays(config, max_examples=config.eval.nll_examples or None)
    bpd = nll.nll_bits_per_dim(config, ctx.model, ctx.params, images, labels, ctx.mesh,
                               config.eval.nll_batch_size)
    return dict(ctx.record, num_examples=int(len(bpd)), split=config.data.eval_split,
                values={"bpd": float(np.mean(bpd)),
                        "bpd_sem": float(np.std(bpd) / np.sqrt(len(bpd)))})


METRICS: dict[str, Callable[[EvalContext], dict]] = {
    "fid": fid, "is": inception_score, "kid": kid, "digits": digits_quality, "nll": nll_bound,
    "pr": improved_precision_recall, "sfid": sfid, "fd_dinov2": fd_dinov2}
# The metrics that score samples (the others, NLL, score the data).
SAMPLE_METRICS = frozenset({"fid", "is", "kid", "digits", "pr", "sfid", "fd_dinov2"})
INCEPTION_METRICS = frozenset({"fid", "is", "kid", "pr", "sfid"})
DINOV2_METRICS = frozenset({"fd_dinov2"})


def wanted_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    return comma_list(config.eval.metrics, "config.eval.metrics", METRICS)


def _write(workdir: str, metric: str, record: dict, writer) -> None:
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, f"eval_{metric}.json")
    with open(path, "w") as file:
        json.dump(record, file, indent=2)
    writer.write_scalars(record["checkpoint_step"],
                         {f"eval/{k}": v for k, v in record["values"].items()})
    logging.info("%s: %s -> %s", metric, record["values"], path)


def run_sweep(ctx: EvalContext, wanted: tuple[str, ...], writer) -> None:
    """config.eval.sweep: every (method, NFE) sampled from the same checkpoint with the same
    seeds and scored with the sample metrics in `wanted`; one table, plot and TensorBoard curve
    per metric value (sweep/sweep_<value>.json and .png)."""
    rows = []
    for method, nfe in sweep.parse_sweep(ctx.config.eval.sweep):
        setting = ctx.with_sampler(sweep.sweep_config(ctx.config, method, nfe))
        row = {"method": method, "nfe": nfe}
        for name in wanted:
            if name in SAMPLE_METRICS:
                row.update(METRICS[name](setting)["values"])
        logging.info("sweep %s NFE %d: %s", method, nfe, row)
        rows.append(row)
    if jax.process_index() != 0:
        return
    for value in (key for key in rows[0] if key not in ("method", "nfe")):
        json_path, png_path = sweep.write_sweep(rows, ctx.workdir, value)
        for tag, nfe, scalar in sweep.tensorboard_scalars(rows, value):
            writer.write_scalars(nfe, {tag: scalar})
        logging.info("sweep of %s: %s, %s", value, json_path, png_path)


def run_ema_sweep(ctx: EvalContext, wanted: tuple[str, ...], writer) -> None:
    """config.eval.ema_sweep: the power EMA of every width, rebuilt from the snapshots at
    config.sample.checkpoint_step (-1: the latest snapshot), sampled with config.sample and
    the same seeds and scored with the sample metrics in `wanted`; one table, plot and
    TensorBoard curve per metric value (ema_sweep/ema_sweep_<value>.json and .png)."""
    rows, step = [], -1
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), ctx.params)
    for width in phema.parse_sigma_rels(ctx.config.eval.ema_sweep, "eval.ema_sweep"):
        params, step = power_ema.reconstruct(ctx.workdir, template, parallel.replicated(ctx.mesh),
                                             width, ctx.config.sample.checkpoint_step)
        setting = ctx.config.copy_and_resolve_references()
        setting.sample.ema_sigma_rel = width
        scored = ctx.with_sampler(setting, params)
        row = {"sigma_rel": width}
        for name in wanted:
            if name in SAMPLE_METRICS:
                row.update(METRICS[name](scored)["values"])
        logging.info("EMA sweep sigma_rel %g: %s", width, row)
        rows.append(row)
        del params, scored   # one rebuilt EMA in memory at a time
    if jax.process_index() != 0:
        return
    for value in (key for key in rows[0] if key != "sigma_rel"):
        json_path, png_path = ema_sweep.write_ema_sweep(rows, ctx.workdir, value, step)
        for row in rows:   # TensorBoard's step axis is an integer: sigma_rel in thousandths
            writer.write_scalars(round(row["sigma_rel"] * 1000), {f"ema_sweep/{value}": row[value]})
        logging.info("EMA sweep of %s: %s, %s", value, json_path, png_path)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=eval: config.eval.metrics for config.sample, or with config.eval.sweep the sample
    metrics for every sampler setting of the sweep, or with config.eval.ema_sweep for every
    EMA width."""
    wanted = wanted_metrics(config)
    config = restore.student_config(config, workdir)
    mesh = parallel.create_mesh()
    model = create_model(config.model)
    params, step = restore.restore_for_sampling(config, workdir, mesh, model)
    ctx = EvalContext(config, workdir, mesh, model, params, step)
    if INCEPTION_METRICS & set(wanted):
        ctx.inception  # noqa: B018  (load the weights before minutes of sampling)
    if DINOV2_METRICS & set(wanted):
        ctx.dinov2  # noqa: B018
    writer = tensorboard_writer.create_writer(workdir, just_logging=jax.process_index() > 0)
    if config.eval.sweep:
        run_sweep(ctx, wanted, writer)
    elif config.eval.ema_sweep:
        run_ema_sweep(ctx, wanted, writer)
    else:
        for name in wanted:
            _write(workdir, name, METRICS[name](ctx), writer)
    writer.flush()


def _check_sweep(config: ml_collections.ConfigDict) -> None:
    """Every setting of config.eval.sweep must be a sampler that runs on this config."""
    for method, nfe in sweep.parse_sweep(config.eval.sweep):
        sweep.sweep_config(config, method, nfe)  # runs samplers.check_sample_config


def _npz_keys(path: str, key: str) -> set[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"config.{key}={path!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as file:
            return set(file.files)
    except (OSError, ValueError) as e:
        raise ConfigError(f"config.{key}={path!r} is not a readable .npz file ({e})") from None


def validate_eval_config(config: ml_collections.ConfigDict, mode: str) -> None:
    """config.eval's rules; the files it names are looked at only for --mode=eval."""
    evaluation = config.eval
    metrics = comma_list(evaluation.metrics, "config.eval.metrics", METRICS)
    for name in ("num_samples", "batch_size", "nll_batch_size"):
        positive_int(evaluation, name, "eval")
    positive_int(evaluation, "nll_examples", "eval", minimum=0)
    require(not ("nll" in metrics and config.diffusion.process != "vp"), "eval.metrics",
            evaluation.metrics, f"asks for 'nll', the discrete process's variational bound, "
            f"which config.diffusion.process={config.diffusion.process!r} does not define; drop "
            f"'nll'")
    if mode != "eval":
        return
    if evaluation.sweep:
        _check_sweep(config)
        require(set(metrics) & SAMPLE_METRICS, "eval.metrics", evaluation.metrics,
                 f"has no metric that scores samples for config.eval.sweep; use one of "
                 f"{', '.join(sorted(SAMPLE_METRICS))}")
    if evaluation.ema_sweep:
        require(set(metrics) & SAMPLE_METRICS, "eval.metrics", evaluation.metrics,
                f"has no metric that scores samples for config.eval.ema_sweep; use one of "
                f"{', '.join(sorted(SAMPLE_METRICS))}")
    if "digits" in metrics:
        require(config.data.dataset == DIGITS and config.model.num_classes == 10,
                 "eval.metrics", evaluation.metrics,
                 "asks for 'digits', which scores class-conditional samples of the digits "
                 "dataset: it needs config.data.dataset='digits' and config.model.num_classes=10")
    inception_metrics = set(metrics) & INCEPTION_METRICS
    if {"fid", "kid", "sfid", "fd_dinov2"} & set(metrics):
        require(evaluation.num_samples >= 2, "eval.num_samples", evaluation.num_samples,
                "must be >= 2 for FID/KID/sFID/FD-DINOv2 (a covariance needs two samples)")
    if "pr" in metrics:
        require(evaluation.num_samples > precision_recall.NEAREST_K, "eval.num_samples",
                evaluation.num_samples,
                f"must be > {precision_recall.NEAREST_K} for precision/recall (each point's "
                f"{precision_recall.NEAREST_K}-th nearest neighbour)")
    dinov2.check_config(evaluation, wanted="fd_dinov2" in metrics)
    if evaluation.samples_dir and set(metrics) & SAMPLE_METRICS:
        require(os.path.isdir(evaluation.samples_dir), "eval.samples_dir",
                 evaluation.samples_dir, "is not a directory; write samples there with "
                 "--mode=sample or leave it empty to sample on the fly")
    inception.check_preprocess_mode(evaluation.inception_preprocess)
    require(downloads.SHA256_PATTERN.fullmatch(str(evaluation.inception_sha256).lower()),
             "eval.inception_sha256", evaluation.inception_sha256,
             "must be the 64 hex digits of the weights file's SHA-256")
    if evaluation.reference_stats and {"fid", "kid", "pr", "sfid"} & inception_metrics:
        keys = _npz_keys(evaluation.reference_stats, "eval.reference_stats")
        if reference_stats.PREPROCESS_KEY in keys:
            with np.load(evaluation.reference_stats, allow_pickle=False) as file:
                recorded = str(file[reference_stats.PREPROCESS_KEY])
            require(recorded == evaluation.inception_preprocess, "eval.reference_stats",
                     evaluation.reference_stats,
                     f"was computed with inception_preprocess={recorded!r}, but "
                     f"config.eval.inception_preprocess={evaluation.inception_preprocess!r}: "
                     f"statistics of different conventions are not comparable")
        require({"mu", "sigma"} <= keys, "eval.reference_stats", evaluation.reference_stats,
                 f"needs arrays 'mu' and 'sigma' (it holds {sorted(keys)})")
        require("kid" not in metrics or "features" in keys, "eval.reference_stats",
                 evaluation.reference_stats,
                 "holds only mu/sigma, but KID needs the reference 'features': drop kid from "
                 "config.eval.metrics or leave reference_stats empty to compute them")
        require("pr" not in metrics or "features" in keys, "eval.reference_stats",
                evaluation.reference_stats,
                "has no reference 'features', which precision/recall needs: drop pr from "
                "config.eval.metrics or leave reference_stats empty to compute them")
        require("sfid" not in metrics or set(reference_stats.SPATIAL_KEYS) <= keys,
                "eval.reference_stats", evaluation.reference_stats,
                f"has no sFID statistics {', '.join(reference_stats.SPATIAL_KEYS)}: drop sfid "
                f"from config.eval.metrics or leave reference_stats empty to compute them")
    if inception_metrics and evaluation.inception_weights != "auto":
        require(os.path.isfile(evaluation.inception_weights), "eval.inception_weights",
                 evaluation.inception_weights,
                 f"is not a file; config.eval.metrics asks for "
                 f"{', '.join(sorted(inception_metrics))}, which need the FID Inception weights "
                 f"{inception.WEIGHTS_FILE} (the file pytorch-fid and torch-fidelity use) or an "
                 f".npz of the same parameters")
