"""Reading the samples files written by --mode=sample, with checks that name the file."""
from __future__ import annotations

import glob
import os

import numpy as np

from jax_diffusion.errors import InputFileError, MissingInputFileError


def read_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 [N, H, W, C], labels int [N] or None) from a samples_*.npz holding
    "images" (and, from --mode=sample, "labels"). Float images, e.g. model outputs in [-1, 1]
    not yet converted with images.to_uint8, are refused rather than guessed at."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputFileError(f"samples file {path!r} does not exist; write it with "
                                f"--mode=sample")
    try:
        with np.load(path, allow_pickle=False) as file:
            contents = {name: file[name] for name in file.files}
    except (OSError, ValueError) as error:
        raise InputFileError(f"{path}: not a readable .npz samples file ({error})") from error
    if "images" not in contents:
        raise InputFileError(f"{path}: no 'images' array (found {sorted(contents)})")
    images = contents["images"]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or len(images) == 0:
        raise InputFileError(f"{path}: 'images' must be [N, H, W, C] with N > 0 and C = 1 or 3, "
                         f"got shape {images.shape}")
    if images.dtype != np.uint8:
        value_range = (f", values in [{images.min()}, {images.max()}]"
                       if np.issubdtype(images.dtype, np.number) else "")
        raise InputFileError(f"{path}: 'images' must be uint8 in 0..255, got {images.dtype}"
                         f"{value_range}; convert [-1, 1] floats with images.to_uint8")
    labels = contents.get("labels")
    if labels is not None and (labels.shape != (len(images),)
                               or not np.issubdtype(labels.dtype, np.integer)):
        raise InputFileError(f"{path}: 'labels' must be integers of shape ({len(images)},), got "
                         f"{labels.dtype} {labels.shape}")
    return images, labels


def read_samples_dir(folder: str, num: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num` (images, labels) of the samples_*.npz files in `folder`, in file order;
    unlabelled files count as label 0."""
    paths = sorted(glob.glob(os.path.join(folder, "samples_*.npz")))
    if not paths:
        raise MissingInputFileError(f"no samples_*.npz in config.eval.samples_dir={folder}; "
                                    f"write them with --mode=sample")
    parts = [read_samples(path) for path in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] if p[1] is not None else np.zeros(len(p[0]), np.int32)
                             for p in parts])
    if len(images) < num:
        raise InputFileError(f"{folder} holds {len(images)} samples but "
                             f"config.eval.num_samples={num}; sample more or lower it")
    return images[:num], labels[:num]
