"""Every sample-quality and likelihood metric of the project.

metrics.py          FID, IS, KID statistics (float64 numpy)
inception.py        the Flax FID Inception-v3, its weights and image features
digits.py           classifier accuracy and Frechet distance for the offline digits model
nll.py              the variational bound in bits/dim
reference_stats.py  Inception statistics of the training set, cached
samples.py          reading the samples files of --mode=sample
run.py              --mode=eval: the table of metrics over one shared context

The Inception names are loaded on first use, so importing the statistics does not build the
network.
"""
from __future__ import annotations

import importlib

from jax_diffusion.evaluation.metrics import (feature_statistics, frechet_distance, inception_score,
                                              kernel_inception_distance)
from jax_diffusion.evaluation.samples import read_samples

_INCEPTION_NAMES = ("FIDInceptionV3", "InceptionWeightsNotFoundError", "PREPROCESS_MODES",
                    "expected_weight_shapes", "inception_features", "load_inception",
                    "preprocess", "resolve_weights")

__all__ = ["feature_statistics", "frechet_distance", "inception_score",
           "kernel_inception_distance", "read_samples", *_INCEPTION_NAMES]


def __getattr__(name: str):
    if name in _INCEPTION_NAMES:
        return getattr(importlib.import_module("jax_diffusion.evaluation.inception"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
