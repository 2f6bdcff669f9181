"""Random-access sources the pipeline reads: `len(source)` and `source[i]` -> {"image", "label"}
(uint8 images in [0, 255], float images in [0, 1]), with an optional batch read."""
from __future__ import annotations

from typing import Any

import numpy as np


class ArraySource:
    """grain random-access source over in-memory arrays.

    Record i is {"image": images[i], "label": labels[i]}.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"image": self.images[index], "label": self.labels[index]}

    def read_batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(images[indices], labels[indices] as int32): one fancy index, no per-example
        Python."""
        return self.images[indices], self.labels[indices].astype(np.int32, copy=False)


def to_model_range(image: np.ndarray) -> np.ndarray:
    """Returns the image as float32 in [-1, 1]: uint8 is read as [0, 255], float as [0, 1]."""
    if image.dtype == np.uint8:
        # Dividing by 127.5 maps 255 to exactly 1.0 (multiplying by 2/255 overshoots in float32).
        return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    raise ValueError(
        f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {image.dtype}")


def read_examples(source: Any, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images [n, H, W, C] in the source's dtype, labels int32 [n]) of source[indices].

    Uses the source's batch read when it has one: `read_batch` (ArraySource: one fancy index;
    not for a subclass with its own `__getitem__`, which that would bypass) or `__getitems__`
    (tfds: one read of all the records). Unlabelled datasets get label 0, so every batch has
    the same structure."""
    if isinstance(source, ArraySource) and type(source).__getitem__ is ArraySource.__getitem__:
        return source.read_batch(indices)
    keys = [int(i) for i in indices]
    records = source.__getitems__(keys) if reads_batches(source) else [source[i] for i in keys]
    images = np.stack([np.asarray(record["image"]) for record in records])
    labels = np.array([record.get("label", 0) for record in records], dtype=np.int32)
    return images, labels


def reads_batches(source: Any) -> bool:
    """Whether `source` is a tfds data source over array_record files, whose __getitems__ reads
    all the records in one call (tfds.testing.mock_data's stand-in reader has a __getitems__
    that fails, so it reads one record at a time)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    return isinstance(getattr(source, "data_source", None), ArrayRecordDataSource)
