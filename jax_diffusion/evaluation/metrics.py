"""Sample-quality statistics on network features, all in float64 numpy whatever JAX's x64 setting.

FID  (Heusel et al. 2017):   ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))
IS   (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y)))
KID  (Binkowski et al. 2018): unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3
"""
from __future__ import annotations

import numpy as np
import scipy.special


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features [N, D]: the mean [D] and the covariance [D, D] with ddof=1, as
    pytorch-fid."""
    features = _as_2d_float64(features, "features")
    if len(features) < 2:
        raise ValueError(f"feature_statistics needs at least 2 feature vectors, "
                         f"got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    """The Frechet distance between N(mu1, S1) and N(mu2, S2):

        d^2 = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)).

    S1 S2 is not symmetric, but its eigenvalues are those of A A^T with A = S1^(1/2) S2^(1/2),
    so tr((S1 S2)^(1/2)) = sum of the singular values of A (its nuclear norm). The two roots are
    eigen-decompositions of symmetric PSD matrices, so everything stays real (no imaginary-part
    check), and taking singular values of A rather than square roots of the eigenvalues of A A^T
    keeps rank-deficient covariances (fewer samples than dimensions) accurate without a diagonal
    offset: a zero singular value comes out at ~1e-16 ||A||, not at sqrt(1e-16) ||A||.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    dim = mu1.shape[0]
    if mu2.shape != (dim,) or s1.shape != (dim, dim) or s2.shape != (dim, dim):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, "
                         f"sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    for name, value in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.all(np.isfinite(value)):
            raise ValueError(f"frechet_distance: {name} has non-finite entries")
    trace_cross = np.linalg.svd(_sqrtm_psd(s1) @ _sqrtm_psd(s2), compute_uv=False).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * trace_cross)


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The PSD square root of a symmetric matrix; round-off negative eigenvalues count as 0."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """(mean, std) of the Inception Score over `splits` contiguous parts [i N/s, (i+1) N/s):

        IS = exp(E_x KL(p(y|x) || p(y))) = exp(H(p(y)) - E_x H(p(y|x))),

    p(y|x) = softmax(logits), p(y) the mean of p(y|x) over the part; std with ddof=0, as the
    original Inception Score code. The entropy form needs no log of a zero probability.
    """
    logits = _as_2d_float64(logits, "logits")
    num = len(logits)
    if not 1 <= splits <= num:
        raise ValueError(f"inception_score: splits={splits} must be between 1 and the number of "
                         f"samples ({num})")
    probs = scipy.special.softmax(logits, axis=1)
    scores = []
    for i in range(splits):
        part = probs[i * num // splits:(i + 1) * num // splits]
        marginal_entropy = scipy.special.entr(part.mean(axis=0)).sum()
        conditional_entropy = scipy.special.entr(part).sum(axis=1).mean()
        scores.append(np.exp(marginal_entropy - conditional_entropy))
    return float(np.mean(scores)), float(np.std(scores))


def kernel_inception_distance(features1: np.ndarray, features2: np.ndarray,
                              num_subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std over subsets) of the unbiased MMD^2 between two feature sets (not scaled by
    1000). Each subset draws m = min(subset_size, N1, N2) rows of each set without replacement:

        MMD^2_u = sum_{i != j} k(x_i, x_j) / (m (m-1)) + sum_{i != j} k(y_i, y_j) / (m (m-1))
                  - 2 sum_{i, j} k(x_i, y_j) / m^2,       k(x, y) = (x.y / d + 1)^3.
    """
    features1 = _as_2d_float64(features1, "features1")
    features2 = _as_2d_float64(features2, "features2")
    if features1.shape[1] != features2.shape[1]:
        raise ValueError(f"kernel_inception_distance: feature sizes differ: {features1.shape[1]} "
                         f"vs {features2.shape[1]}")
    size = min(subset_size, len(features1), len(features2))
    if size < 2 or num_subsets < 1:
        raise ValueError(f"kernel_inception_distance needs subsets of at least 2 rows and "
                         f"num_subsets >= 1; got subset size {size}, num_subsets={num_subsets}")
    dim = features1.shape[1]
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(num_subsets):
        x = features1[rng.choice(len(features1), size, replace=False)]
        y = features2[rng.choice(len(features2), size, replace=False)]
        k_xx = (x @ x.T / dim + 1.0) ** 3
        k_yy = (y @ y.T / dim + 1.0) ** 3
        k_xy = (x @ y.T / dim + 1.0) ** 3
        # The diagonal k(x_i, x_i) is what makes the plain V-statistic biased: leave it out.
        within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (size * (size - 1))
        estimates.append(within - 2.0 * k_xy.mean())
    return float(np.mean(estimates)), float(np.std(estimates))


def _as_2d_float64(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array, np.float64)
    if array.ndim != 2 or len(array) == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] array, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} has non-finite entries")
    return array
