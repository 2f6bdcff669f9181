"""Are samples as varied as real digits? For each samples .npz (images uint8, labels): accuracy of
the digits metric's classifier and of one fitted on the first 1,400 digits only, the mean
distance to the nearest training digit, the mean within-class pixel standard deviation, and the
accuracy of a stronger classifier (an RBF support-vector machine, 0.96 on the other writers'
digits against the MLP's 0.92); the same figures for the last 397 real digits (other writers)
against the first 1,400.

    PYTHONPATH=$PWD python scripts/sample_diversity.py samples_a.npz [samples_b.npz ...]

Pixels in [0, 1], 256 per image.
"""
from __future__ import annotations

import sys

import numpy as np
import threadpoolctl
from sklearn.neural_network import MLPClassifier
from sklearn.svm import SVC

from jax_diffusion import data
from jax_diffusion.evaluation import digits as digits_metrics

HELD_OUT = 1400  # the split of digits_metrics.train_classifier's docstring


def nearest_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a[:, None, :] - b[None]) ** 2).sum(-1)).min(1)


def within_class_std(features: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean([features[labels == c].std(0).mean() for c in np.unique(labels)]))


def main() -> None:
    images, labels = data.load_digits_arrays(16)
    real = digits_metrics._features_in(images)
    with threadpoolctl.threadpool_limits(1):
        partial = MLPClassifier(hidden_layer_sizes=(128,), max_iter=400, random_state=0)
        partial.fit(real[:HELD_OUT], labels[:HELD_OUT])
        full = digits_metrics.train_classifier(16)
        svm_partial = SVC(C=10.0, gamma="scale").fit(real[:HELD_OUT], labels[:HELD_OUT])
        svm_full = SVC(C=10.0, gamma="scale").fit(real, labels)
        held, held_labels = real[HELD_OUT:], labels[HELD_OUT:]
        print(f"real digits {HELD_OUT}..: accuracy (first-{HELD_OUT} classifier) "
              f"{np.mean(partial.predict(held) == held_labels):.3f}, SVM (first {HELD_OUT}) "
              f"{np.mean(svm_partial.predict(held) == held_labels):.3f}, nearest training digit "
              f"(first {HELD_OUT}) {nearest_distance(held, real[:HELD_OUT]).mean():.3f}, "
              f"within-class std {within_class_std(real, labels):.4f} (all digits)")
        for path in sys.argv[1:]:
            samples = np.load(path)
            features = digits_metrics._features_in(samples["images"])
            sample_labels = samples["labels"]
            accuracy = np.mean(full.predict(features) == sample_labels)
            partial_accuracy = np.mean(partial.predict(features) == sample_labels)
            print(f"{path}: accuracy {accuracy:.3f} "
                  f"(first-{HELD_OUT} classifier {partial_accuracy:.3f}), SVM (all digits) "
                  f"{np.mean(svm_full.predict(features) == sample_labels):.3f}, "
                  f"nearest training digit (all) {nearest_distance(features, real).mean():.3f}, "
                  f"within-class std {within_class_std(features, sample_labels):.4f}")


if __name__ == "__main__":
    main()
