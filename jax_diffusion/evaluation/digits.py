"""Sample quality for the offline digits model, judged by a classifier trained on the real digits.

accuracy: how often the classifier gives a class-conditional sample its conditioning label.
frechet:  the Frechet distance between real and generated images in the classifier's hidden
          layer (FID's recipe with a digits network instead of Inception).
"""
from __future__ import annotations

import functools

import numpy as np
import threadpoolctl
from sklearn.neural_network import MLPClassifier

from jax_diffusion import data
from jax_diffusion.evaluation.metrics import frechet_distance


@functools.lru_cache(maxsize=4)
def train_classifier(image_size: int = 16, seed: int = 0) -> MLPClassifier:
    """An MLP (one hidden layer of 128 ReLUs) on all 1,797 real digits at `image_size`, the
    same preprocessing the diffusion model trains on. Fits in seconds; 92% accuracy on the last
    397 digits when fitted on the first 1,400 (other writers)."""
    images, labels = data.load_digits_arrays(image_size)
    classifier = MLPClassifier(hidden_layer_sizes=(128,), max_iter=400, random_state=seed)
    # One BLAS thread: these small matmuls took 51 s instead of 1.4 s with two threads on a
    # loaded 2-core machine.
    with threadpoolctl.threadpool_limits(1):
        classifier.fit(_features_in(images), labels)
    return classifier


def _features_in(images: np.ndarray) -> np.ndarray:
    """Images in [-1, 1] or uint8, flattened to [N, H*W*C] in [0, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        flat = images.astype(np.float32) / 255.0
    else:
        flat = (images.astype(np.float32) + 1.0) / 2.0
    return flat.reshape(len(flat), -1)


def hidden_features(classifier: MLPClassifier, images: np.ndarray) -> np.ndarray:
    """The classifier's hidden-layer activations, [N, 128]."""
    x = _features_in(images)
    return np.maximum(x @ classifier.coefs_[0] + classifier.intercepts_[0], 0.0)


def evaluate(images: np.ndarray, labels: np.ndarray, image_size: int = 16) -> dict:
    """{"accuracy", "frechet", "num_samples"} for generated images and their labels."""
    classifier = train_classifier(image_size)
    accuracy = float(np.mean(classifier.predict(_features_in(images)) == np.asarray(labels)))
    real = hidden_features(classifier, data.load_digits_arrays(image_size)[0])
    fake = hidden_features(classifier, images)
    frechet = frechet_distance(real.mean(0), np.cov(real, rowvar=False),
                               fake.mean(0), np.cov(fake, rowvar=False))
    return {"accuracy": accuracy, "frechet": frechet, "num_samples": int(len(images))}
