"""Reference statistics for FID, KID, precision/recall and sFID (Inception features of the
training set) and FD-DINOv2 (DINOv2 features), computed once and cached in the workdir, or for
Inception the user's own `config.eval.reference_stats` file.

Statistics depend on the Inception input convention (config.eval.inception_preprocess), so the
cache is one file per convention and records its convention; a user's file that records
another convention is refused when the config is validated."""
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from jax_diffusion import data, images
from jax_diffusion.evaluation import metrics

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, ...]]


PREPROCESS_KEY = "inception_preprocess"
# sFID's statistics of the spatial features, beside FID's mu and sigma of the pool features.
SPATIAL_KEYS = ("spatial_mu", "spatial_sigma")


def cache_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    return os.path.join(workdir, f"reference_stats_{config.data.dataset}_"
                                 f"{config.eval.inception_preprocess}.npz")


def _training_images(config: ml_collections.ConfigDict) -> np.ndarray:
    """The first config.eval.num_samples training images, uint8."""
    real, _ = data.load_eval_arrays(config, split=config.data.train_split,
                                    max_examples=config.eval.num_samples)
    return images.to_uint8(real)


def _load(path: str) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as file:
        return {name: file[name] for name in file.files}


def reference_statistics(config: ml_collections.ConfigDict, features: FeatureFn,
                         workdir: str, spatial: bool = False) -> dict[str, np.ndarray]:
    """{"mu", "sigma"[, "features", "spatial_mu", "spatial_sigma"]}: the user's npz
    (config.eval.reference_stats, checked when the config was validated), else the cache in the
    workdir, else from the (pool, logits, spatial) features of the training images, written to
    the cache by process 0. With `spatial` (sFID), a cache written without the spatial
    statistics is computed again."""
    path = config.eval.reference_stats or cache_path(config, workdir)
    if os.path.exists(path):
        stats = _load(path)
        if PREPROCESS_KEY not in stats:
            logging.warning("%s does not record its Inception input convention; FID against it "
                            "assumes config.eval.inception_preprocess=%s", path,
                            config.eval.inception_preprocess)
        if not spatial or set(SPATIAL_KEYS) <= set(stats):
            return stats
        logging.info("%s has no sFID statistics: computing the reference features again", path)
    pool, _, spatial_features = features(_training_images(config))
    mu, sigma = metrics.feature_statistics(pool)
    spatial_mu, spatial_sigma = metrics.feature_statistics(spatial_features)
    stats = {"mu": mu, "sigma": sigma, "features": pool.astype(np.float32),
             "spatial_mu": spatial_mu, "spatial_sigma": spatial_sigma,
             PREPROCESS_KEY: np.asarray(config.eval.inception_preprocess)}
    if jax.process_index() == 0:
        np.savez(path, **stats)
    return stats


def dinov2_cache_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    return os.path.join(workdir, f"reference_stats_{config.data.dataset}_dinov2.npz")


def dinov2_reference_statistics(config: ml_collections.ConfigDict,
                                features: Callable[[np.ndarray], np.ndarray],
                                workdir: str) -> dict[str, np.ndarray]:
    """{"mu", "sigma"} of the DINOv2 features of the training images, cached in the workdir
    (one input convention, dgm-eval's, so one file per dataset), written by process 0."""
    path = dinov2_cache_path(config, workdir)
    if os.path.exists(path):
        return _load(path)
    mu, sigma = metrics.feature_statistics(features(_training_images(config)))
    stats = {"mu": mu, "sigma": sigma}
    if jax.process_index() == 0:
        np.savez(path, **stats)
    return stats
