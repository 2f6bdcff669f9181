"""Reading the samples files written by --mode=sample, with checks that name the file."""
from __future__ import annotations

import os

import numpy as np


def read_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 [N, H, W, C], labels int [N] or None) from a samples_*.npz holding
    "images" (and, from --mode=sample, "labels"). Float images, e.g. model outputs in [-1, 1]
    not yet converted with images.to_uint8, are refused rather than guessed at."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"samples file {path!r} does not exist; write it with "
                                f"--mode=sample")
    try:
        with np.load(path, allow_pickle=False) as file:
            contents = {name: file[name] for name in file.files}
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable .npz samples file ({error})") from error
    if "images" not in contents:
        raise ValueError(f"{path}: no 'images' array (found {sorted(contents)})")
    images = contents["images"]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise ValueError(f"{path}: 'images' must be [N, H, W, C] with N > 0 and C = 1 or 3, "
                         f"got shape {images.shape}")
    if images.dtype != np.uint8:
        value_range = (f", values in [{images.min()}, {images.max()}]"
                       if np.issubdtype(images.dtype, np.number) else "")
        raise ValueError(f"{path}: 'images' must be uint8 in 0..255, got {images.dtype}"
                         f"{value_range}; convert [-1, 1] floats with images.to_uint8")
    labels = contents.get("labels")
    if labels is not None and (labels.shape != (len(images),)
                               or not np.issubdtype(labels.dtype, np.integer)):
        raise ValueError(f"{path}: 'labels' must be integers of shape ({len(images)},), got "
                         f"{labels.dtype} {labels.shape}")
    return images, labels
