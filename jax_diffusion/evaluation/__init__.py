"""Sample-quality evaluation: FID / IS / KID on features of the FID Inception-v3.

metrics.py    the statistics (float64 numpy)
inception.py  the Flax FID Inception-v3, its weight import and image features
samples.py    reading and checking the samples files of --mode=sample
"""
from jax_diffusion.evaluation.inception import (FIDInceptionV3, InceptionWeightsNotFoundError,
                                                expected_weight_shapes, inception_features,
                                                load_inception, preprocess)
from jax_diffusion.evaluation.metrics import (feature_statistics, frechet_distance,
                                              inception_score, kernel_inception_distance)
from jax_diffusion.evaluation.samples import read_samples

__all__ = ["FIDInceptionV3", "InceptionWeightsNotFoundError", "expected_weight_shapes",
           "feature_statistics", "frechet_distance", "inception_features", "inception_score",
           "kernel_inception_distance", "load_inception", "preprocess", "read_samples"]
