"""--mode=eval: the metrics in `config.eval.metrics` for a checkpoint, each written to
`<workdir>/eval_<metric>.json` and to TensorBoard.

  fid, is, kid  FID Inception-v3 features of generated samples against reference statistics
                of the training set (evaluation/reference_stats.py)
  digits        classifier accuracy and Frechet distance for the offline digits model
  nll           the variational bound in bits/dim on the eval split

Every metric is a small function of one `EvalContext`, which produces what the metrics share
(the samples, their Inception features, the reference statistics) lazily, each at most once.
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

from jax_diffusion import data, parallel, sampling, tensorboard_writer
from jax_diffusion.config_files import comma_list
from jax_diffusion.evaluation import digits, inception, metrics, nll, reference_stats, sweep
from jax_diffusion.evaluation.samples import read_samples_dir
from jax_diffusion.models import create_model

FID_BIAS_WARNING_BELOW = 50_000

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def inception_feature_fn(config: ml_collections.ConfigDict, mesh) -> FeatureFn:
    """uint8 images -> (pool [N, 2048], logits [N, 1008]) of the FID Inception-v3, batch-sharded
    over `mesh`, preprocessed by config.eval.inception_preprocess. The weights are
    config.eval.inception_weights, fetched into the user cache first when that is "auto" (by
    process 0 alone; the others wait and read its copy from the shared cache or fetch their own)."""
    if jax.process_index() == 0:
        path = inception.resolve_weights(config.eval)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("FID Inception weights fetched")
    if jax.process_index() > 0:
        path = inception.resolve_weights(config.eval)
    module, variables = inception.load_inception(path)
    return functools.partial(inception.inception_features, module, variables,
                             batch_size=config.eval.batch_size, mesh=mesh,
                             preprocess=config.eval.inception_preprocess)


class EvalContext:
    """What the metrics of one checkpoint share, each computed on first use and kept."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh,
                 model: nn.Module, params, step: int):
        self.config, self.workdir, self.mesh = config, workdir, mesh
        self.model, self.params, self.step = model, params, step

    def with_sampler(self, config: ml_collections.ConfigDict) -> EvalContext:
        """A context for the same checkpoint sampled with another config.sample: new samples,
        the same feature network and reference statistics (those computed so far)."""
        other = EvalContext(config, self.workdir, self.mesh, self.model, self.params, self.step)
        for shared in ("inception", "reference"):
            if shared in self.__dict__:  # functools.cached_property keeps its value there
                other.__dict__[shared] = self.__dict__[shared]
        return other

    @property
    def record(self) -> dict:
        """The fields every eval JSON carries."""
        return {"checkpoint_step": self.step,
                "params": "ema" if self.config.sample.use_ema else "raw"}

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
    def sample_features(self) -> tuple[np.ndarray, np.ndarray]:
        """(pool features, logits) of the samples."""
        return self.inception(self.samples[0])

    @functools.cached_property
    def reference(self) -> dict[str, np.ndarray]:
        return reference_stats.reference_statistics(self.config, self.inception, self.workdir)


def fid(ctx: EvalContext) -> dict:
    pool, _ = ctx.sample_features
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
    "fid": fid, "is": inception_score, "kid": kid, "digits": digits_quality, "nll": nll_bound}
# The metrics that score samples (the others, NLL, score the data).
SAMPLE_METRICS = frozenset({"fid", "is", "kid", "digits"})
INCEPTION_METRICS = frozenset({"fid", "is", "kid"})


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


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=eval: config.eval.metrics for config.sample, or with config.eval.sweep the sample
    metrics for every sampler setting of the sweep."""
    wanted = wanted_metrics(config)
    config = sampling.student_config(config, workdir)
    mesh = parallel.create_mesh()
    model = create_model(config.model)
    params, step = sampling.restore_for_sampling(config, workdir, mesh, model)
    ctx = EvalContext(config, workdir, mesh, model, params, step)
    if INCEPTION_METRICS & set(wanted):
        ctx.inception  # noqa: B018  (load the weights before minutes of sampling)
    writer = tensorboard_writer.create_writer(workdir, just_logging=jax.process_index() > 0)
    if config.eval.sweep:
        run_sweep(ctx, wanted, writer)
    else:
        for name in wanted:
            _write(workdir, name, METRICS[name](ctx), writer)
    writer.flush()
