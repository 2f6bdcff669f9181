"""Reference statistics for FID and KID: Inception features of the training set, computed once
and cached in the workdir, or the user's own `config.eval.reference_stats` file.

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

FeatureFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


PREPROCESS_KEY = "inception_preprocess"


def cache_path(config: ml_collections.ConfigDict, workdir: str) -> str:
    return os.path.join(workdir, f"reference_stats_{config.data.dataset}_"
                                 f"{config.eval.inception_preprocess}.npz")


def reference_statistics(config: ml_collections.ConfigDict, features: FeatureFn,
                         workdir: str) -> dict[str, np.ndarray]:
    """{"mu", "sigma"[, "features"]}: the user's npz (config.eval.reference_stats, checked when
    the config was validated), else the cache in the workdir, else the pool features of the
    first config.eval.num_samples training images, written to the cache by process 0."""
    path = config.eval.reference_stats or cache_path(config, workdir)
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as file:
            stats = {name: file[name] for name in file.files}
        if PREPROCESS_KEY not in stats:
            logging.warning("%s does not record its Inception input convention; FID against it "
                            "assumes config.eval.inception_preprocess=%s", path,
                            config.eval.inception_preprocess)
        return stats
    real, _ = data.load_eval_arrays(config, split=config.data.train_split,
                                    max_examples=config.eval.num_samples)
    pool, _ = features(images.to_uint8(real))
    mu, sigma = metrics.feature_statistics(pool)
    stats = {"mu": mu, "sigma": sigma, "features": pool.astype(np.float32),
             PREPROCESS_KEY: np.asarray(config.eval.inception_preprocess)}
    if jax.process_index() == 0:
        np.savez(path, **stats)
    return stats
