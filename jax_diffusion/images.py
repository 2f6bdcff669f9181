"""Image conversion and grid PNGs."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np


def to_uint8(x: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """[-1, 1] floats to uint8 0..255 (round to nearest level); numpy in, numpy out (no device
    transfer), else a jax array (also under jit)."""
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.clip(xp.round((x + 1.0) * 127.5), 0, 255).astype(xp.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 1) -> np.ndarray:
    """Tile uint8 [N, H, W, C] images row by row into one [rows*(H+pad)+pad, ...] image."""
    n, h, w, c = images.shape
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h,
             pad + col * (w + pad): pad + col * (w + pad) + w] = image
    return grid


def class_rows(images: np.ndarray, labels: np.ndarray, num_classes: int,
               per_class: int = 10) -> np.ndarray:
    """The first `per_class` images of each class, class c on row c (blank where too few)."""
    rows = np.zeros((num_classes, per_class) + images.shape[1:], np.uint8)
    for c in range(num_classes):
        picked = images[labels == c][:per_class]
        rows[c, :len(picked)] = picked
    return rows.reshape((-1,) + images.shape[1:])


def save_png(image: np.ndarray, path: str, scale: int = 1) -> None:
    """Write a uint8 [H, W, C] image (C = 1 or 3) as PNG, upscaled by `scale` (nearest)."""
    # Imported here: only writing a PNG needs Pillow, so sampling runs where it is missing.
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
