"""A tfds split decoded once into memory-mapped .npy files in the dataset's directory, so
training reads batches by index instead of decoding PNGs every epoch."""
from __future__ import annotations

import logging
import os
import time
import urllib.parse
from typing import Any

import jax
import ml_collections
import numpy as np

from jax_diffusion.data.preparation import JaxKeyValueChannel, prepare_on_process_zero
from jax_diffusion.data.sources import ArraySource, read_examples
from jax_diffusion.errors import DatasetNotFoundError


# Records decoded per tfds read when writing the decoded cache.
_DECODE_CHUNK = 1024


class DecodedFileSource(ArraySource):
    """An ArraySource over the .npy files `write_decoded` wrote, memory-mapped: batches are read
    from the page cache by index, and a pickled copy (a grain worker's) reopens the files
    instead of carrying the arrays."""

    def __init__(self, images_path: str, labels_path: str):
        super().__init__(np.load(images_path, mmap_mode="r"), np.load(labels_path))
        self.paths = (images_path, labels_path)

    def __reduce__(self):
        return DecodedFileSource, self.paths


def write_decoded(source: Any, images_path: str, labels_path: str) -> None:
    """Decodes every record of `source` into images_path (uint8 [N, H, W, C] .npy, as the source
    gives them) and labels_path (int32 [N]), each written under a temporary name and renamed
    when complete, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(images_path), exist_ok=True)
    first, _ = read_examples(source, np.array([0]))
    count = len(source)
    start_time = time.monotonic()
    images_tmp, labels_tmp = images_path + ".tmp.npy", labels_path + ".tmp.npy"
    images = np.lib.format.open_memmap(images_tmp, mode="w+", dtype=first.dtype,
                                       shape=(count, *first.shape[1:]))
    labels = np.empty(count, np.int32)
    for start in range(0, count, _DECODE_CHUNK):
        indices = np.arange(start, min(start + _DECODE_CHUNK, count))
        images[indices], labels[indices] = read_examples(source, indices)
    images.flush()
    del images
    np.save(labels_tmp, labels)
    os.replace(labels_tmp, labels_path)
    os.replace(images_tmp, images_path)
    logging.info("Decoded %d images into %s in %.0f s", count, images_path,
                 time.monotonic() - start_time)


def decoded_cache_paths(dataset_dir: str, split: str) -> tuple[str, str]:
    """(images, labels) .npy paths of the decoded cache of `split` of the tfds dataset whose
    version directory is `dataset_dir` (<data dir>/<name>/<version>)."""
    stem = os.path.join(dataset_dir, "decoded", urllib.parse.quote(split, safe=""))
    return f"{stem}-images.npy", f"{stem}-labels.npy"


def _write_decoded_or_explain(source: Any, images_path: str, labels_path: str) -> None:
    try:
        write_decoded(source, images_path, labels_path)
    except OSError as e:
        raise DatasetNotFoundError(
            f"cannot write the decoded images to {os.path.dirname(images_path)} ({e}): make "
            f"that directory writable, or read the tfds files directly with "
            f"--config.data.decoded_cache=False (PNG decoding every epoch)") from e


def decoded_tfds_source(source: Any, config: ml_collections.ConfigDict,
                         split: str) -> DecodedFileSource:
    """`source` (a tfds split) decoded once into .npy files in the dataset's directory
    (`decoded/`), by process 0 when there are several, and read from there."""
    images_path, labels_path = decoded_cache_paths(str(source.dataset_info.data_dir), split)
    stem = images_path[:-len("-images.npy")]
    process_count = jax.process_count()
    prepare_on_process_zero(
        lambda: os.path.isfile(images_path) and os.path.isfile(labels_path),
        lambda: _write_decoded_or_explain(source, images_path, labels_path),
        what=f"the decoded images of {config.data.dataset!r} (split {split!r}) in {stem}-*",
        key=f"jax_diffusion/decoded/{stem}", process_index=jax.process_index(),
        process_count=process_count,
        channel=JaxKeyValueChannel() if process_count > 1 else None,
        timeout=config.data.prepare_timeout)
    return DecodedFileSource(images_path, labels_path)
