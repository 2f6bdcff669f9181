"""The embedded offline dataset: scikit-learn's 8x8 digits (shipped inside the scikit-learn
wheel), resized to config.data.image_size and held in memory."""
from __future__ import annotations

import numpy as np
import sklearn.datasets
from PIL import Image

from jax_diffusion.data.sources import to_model_range


DIGITS = "digits"


def digits_unit_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's digits as (float32 [1797, S, S, 1] in [0, 1], int32 [1797] labels
    0-9)."""
    digits = sklearn.datasets.load_digits()
    images = (digits.images / 16.0).astype(np.float32)  # integer pixel values 0..16
    if image_size != images.shape[1]:
        # Bilinear with PIL on float32 ("F" mode) images: every output pixel is a convex combination
        # of input pixels, so values stay in [0, 1] and strokes stay smooth (nearest would give
        # blocks, bicubic overshoots outside [0, 1]). PIL widens the filter when shrinking, so
        # sizes below 8 are antialiased too.
        images = np.stack([
            np.asarray(Image.fromarray(image).resize((image_size, image_size),
                                                     Image.Resampling.BILINEAR))
            for image in images])
    return images[..., None], digits.target.astype(np.int32)


def load_digits_arrays(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Returns scikit-learn's 8x8 digits resized (bilinear) to image_size.

    Returns (images float32 [1797, image_size, image_size, 1] in [-1, 1], labels int32 [1797] in
    0..9), in scikit-learn's order (labels equal `load_digits().target`).
    """
    images, labels = digits_unit_arrays(image_size)
    return to_model_range(images), labels
