"""--mode=eval: the metrics in `config.eval.metrics` for a checkpoint, each written to
`<workdir>/eval_<metric>.json` and to TensorBoard.

  fid, is, kid  FID Inception-v3 features of generated samples (weights from
                config.eval.inception_weights) against reference statistics of the training set
  digits        classifier accuracy and Frechet distance for the offline digits model
  nll           the variational bound in bits/dim on the eval split (calc_bpd_loop)

Samples come from `config.eval.samples_dir` (the samples_*.npz of --mode=sample) or, when that is
empty, are generated on the fly with the sampler in config.sample.
"""
from __future__ import annotations

import glob
import json
import logging
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from jax_diffusion import data, digits_metrics, parallel, sampling
from jax_diffusion.diffusion import create_diffusion
from jax_diffusion.evaluation import inception, metrics
from jax_diffusion.evaluation.samples import read_samples
from jax_diffusion.models import create_model

METRICS = ("fid", "is", "kid", "digits", "nll")
FID_BIAS_WARNING_BELOW = 50_000


def parse_metrics(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"config.eval.metrics={text!r}: unknown {unknown or 'empty'}; allowed: "
                         f"{', '.join(METRICS)} (comma-separated)")
    return names


def load_samples(config: ml_collections.ConfigDict, params, model: nn.Module, mesh
                 ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(images uint8, labels, description) of config.eval.num_samples samples."""
    num = config.eval.num_samples
    if config.eval.samples_dir:
        paths = sorted(glob.glob(os.path.join(config.eval.samples_dir, "samples_*.npz")))
        if not paths:
            raise FileNotFoundError(f"no samples_*.npz in config.eval.samples_dir="
                                    f"{config.eval.samples_dir}; write them with --mode=sample")
        parts = [read_samples(path) for path in paths]
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] if p[1] is not None else np.zeros(len(p[0]), np.int32)
                                 for p in parts])
        if len(images) < num:
            raise ValueError(f"{config.eval.samples_dir} holds {len(images)} samples but "
                             f"config.eval.num_samples={num}; sample more or lower it")
        return images[:num], labels[:num], {"source": config.eval.samples_dir}
    batch = parallel.round_up_to_devices(min(config.sample.batch_size, num), mesh)
    labels = sampling.default_labels(num, config.model.num_classes)
    sample_fn = sampling.make_sample_fn(config, model, mesh, batch)
    images = sampling.generate_samples(sample_fn, params, labels, batch, config.sample.seed, mesh)
    return images, labels, {"source": "generated", "sampler": config.sample.method,
                            "sampler_steps": config.sample.num_steps, "eta": config.sample.eta,
                            "guidance_scale": config.sample.guidance_scale}


def reference_statistics(config: ml_collections.ConfigDict, module, variables, mesh,
                         workdir: str) -> dict:
    """mu, sigma (and features, for KID) of the training set, cached in the workdir, or the
    user's `config.eval.reference_stats` npz with mu and sigma."""
    if config.eval.reference_stats:
        with np.load(config.eval.reference_stats) as file:
            if "mu" not in file or "sigma" not in file:
                raise ValueError(f"{config.eval.reference_stats}: needs arrays 'mu' and 'sigma'")
            return {name: file[name] for name in file.files}
    cache = os.path.join(workdir, f"reference_stats_{config.data.dataset}.npz")
    if os.path.exists(cache):
        with np.load(cache) as file:
            return {name: file[name] for name in file.files}
    images, _ = data.load_eval_arrays(config, split=config.data.train_split,
                                      max_examples=config.eval.num_samples)
    uint8 = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
    pool, _ = inception.inception_features(module, variables, uint8,
                                           batch_size=config.eval.batch_size, mesh=mesh)
    mu, sigma = metrics.feature_statistics(pool)
    stats = {"mu": mu, "sigma": sigma, "features": pool.astype(np.float32)}
    if jax.process_index() == 0:
        np.savez(cache, **stats)
    return stats


def nll_bits_per_dim(config: ml_collections.ConfigDict, model: nn.Module, params,
                     images: np.ndarray, labels: np.ndarray, mesh, batch_size: int,
                     seed: int = 0) -> np.ndarray:
    """Per-image NLL bound in bits/dim (calc_bpd_loop), batch-sharded over the mesh."""
    parallel.check_divisible(batch_size, mesh, "config.eval.nll_batch_size")
    diffusion = create_diffusion(config.diffusion)
    conditional = config.model.num_classes > 0
    batch_sharding = parallel.batch_sharded(mesh)

    def bpd(params, x, y, key):
        def model_fn(x_t, t):
            return model.apply({"params": params}, x_t, t, y if conditional else None)
        return diffusion.calc_bpd_loop(model_fn, x, key)["total_bpd"]

    bpd_fn = jax.jit(bpd, in_shardings=(parallel.replicated(mesh), batch_sharding,
                                        batch_sharding, parallel.replicated(mesh)),
                     out_shardings=batch_sharding)
    key = jax.random.PRNGKey(seed)
    return parallel.map_batches(
        lambda i, x, y: bpd_fn(params, x, y, jax.random.fold_in(key, i)),
        (images.astype(np.float32), labels.astype(np.int32)), batch_size, mesh, "nll")


def _write(workdir: str, metric: str, record: dict, writer) -> None:
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, f"eval_{metric}.json")
    with open(path, "w") as file:
        json.dump(record, file, indent=2)
    writer.write_scalars(record["checkpoint_step"],
                         {f"eval/{k}": v for k, v in record["values"].items()})
    logging.info("%s: %s -> %s", metric, record["values"], path)


def run_eval(config: ml_collections.ConfigDict, workdir: str) -> None:
    """--mode=eval."""
    from clu import metric_writers  # imports TensorFlow: only when evaluating

    wanted = parse_metrics(config.eval.metrics)
    mesh = parallel.create_mesh()
    model = create_model(config.model)
    params, step = sampling.restore_for_sampling(config, workdir, mesh, model)
    writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
    common = {"checkpoint_step": step, "params": "ema" if config.sample.use_ema else "raw"}

    sample_metrics = [m for m in wanted if m != "nll"]
    if sample_metrics:
        if "digits" not in sample_metrics:  # fail before sampling if the weights are missing
            module, variables = inception.load_inception(config.eval.inception_weights)
        images, labels, source = load_samples(config, params, model, mesh)
        if len(images) < FID_BIAS_WARNING_BELOW and {"fid", "kid"} & set(sample_metrics):
            logging.warning("FID/KID from %d samples: both are biased upwards at small N; the "
                            "papers use 50,000", len(images))
        record = dict(common, num_samples=int(len(images)), **source)
        if "digits" in sample_metrics:
            scores = digits_metrics.evaluate(images, labels, config.data.image_size)
            _write(workdir, "digits", dict(record, values={
                "accuracy": scores["accuracy"], "frechet": scores["frechet"]}), writer)
        if {"fid", "is", "kid"} & set(sample_metrics):
            pool, logits = inception.inception_features(module, variables, images,
                                                        batch_size=config.eval.batch_size,
                                                        mesh=mesh)
            if "is" in sample_metrics:
                mean, std = metrics.inception_score(logits)
                _write(workdir, "is", dict(record, values={"is": mean, "is_std": std}), writer)
            if {"fid", "kid"} & set(sample_metrics):
                ref = reference_statistics(config, module, variables, mesh, workdir)
            if "fid" in sample_metrics:
                fid = metrics.frechet_distance(*metrics.feature_statistics(pool), ref["mu"],
                                               ref["sigma"])
                _write(workdir, "fid", dict(record, values={"fid": fid}), writer)
            if "kid" in sample_metrics:
                if "features" not in ref:
                    raise ValueError("KID needs reference features; config.eval.reference_stats "
                                     "holds only mu/sigma: drop kid or the reference_stats file")
                mean, std = metrics.kernel_inception_distance(pool, ref["features"])
                _write(workdir, "kid", dict(record, values={"kid": mean, "kid_std": std}), writer)

    if "nll" in wanted:
        max_examples = config.eval.nll_examples or None
        images, labels = data.load_eval_arrays(config, max_examples=max_examples)
        bpd = nll_bits_per_dim(config, model, params, images, labels, mesh,
                               config.eval.nll_batch_size)
        _write(workdir, "nll", dict(common, num_examples=int(len(bpd)),
                                    split=config.data.eval_split,
                                    values={"bpd": float(np.mean(bpd)),
                                            "bpd_sem": float(np.std(bpd) / np.sqrt(len(bpd)))}),
               writer)
    writer.flush()
