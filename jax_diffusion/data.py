"""Datasets and the training input pipeline.

Two kinds of data feed one grain pipeline:
- "digits": scikit-learn's 8x8 digits (shipped inside the scikit-learn wheel, so it works offline),
  resized to `config.data.image_size` and held in memory;
- any tfds image dataset prepared as array_record, read with `tfds.data_source` (no TensorFlow
  needed). When it is not prepared and config.data.download is true, tfds' own builder
  downloads it (checksums verified as tfds registers them) and prepares it on first use, after
  a bounded check that the download hosts answer; in a multi-process run process 0 prepares and
  the others wait for it (`prepare_on_process_zero`).

Both are random-access sources (`len` and `source[i]` -> {"image", "label"}) and go through
`iterator_from_source`: a seeded shuffle that changes every epoch, the tail of each epoch dropped,
an optional seeded horizontal flip, images scaled to [-1, 1], and each process reading only its
rows of every global batch. The pipeline is a chain of grain `MapDataset`s, so the iterator state
is a small JSON-serialisable dict and a restored iterator continues exactly where it stopped.

Image convention for sources: uint8 images are in [0, 255] (tfds), float images in [0, 1] (digits).
"""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import grain
import jax
import ml_collections
import numpy as np
import sklearn.datasets
from PIL import Image

# DatasetNotFoundError stays importable from here: callers catch it as data.DatasetNotFoundError.
from jax_diffusion.errors import DatasetNotFoundError, DownloadError

DIGITS = "digits"
# Pipeline elements are whole local batches, so two reader threads and two buffered batches keep
# the next batch ready without holding many batches in memory; more parallelism comes from
# config.data.worker_count processes.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
# Records decoded per tfds read when writing the decoded cache.
_DECODE_CHUNK = 1024
# Seconds for resolving and connecting to each download host before a download starts.
_PROBE_TIMEOUT = 5.0
# What process 0 publishes when the dataset is ready; anything else is its error message.
_PREPARED = "prepared"


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


def _to_model_range(image: np.ndarray) -> np.ndarray:
    """Returns the image as float32 in [-1, 1]: uint8 is read as [0, 255], float as [0, 1]."""
    if image.dtype == np.uint8:
        # Dividing by 127.5 maps 255 to exactly 1.0 (multiplying by 2/255 overshoots in float32).
        return image.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32) * np.float32(2.0) - np.float32(1.0)
    raise ValueError(
        f"images must be uint8 in [0, 255] or float in [0, 1], got dtype {image.dtype}")


def _digits_unit_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
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
    images, labels = _digits_unit_arrays(image_size)
    return _to_model_range(images), labels


def unreachable_download_host(urls: Iterable[str], timeout: float | None = None) -> str | None:
    """Returns why a host that `urls` download from cannot be reached, or None if all answer.

    tfds' downloader sets no timeout and retries a refused connection ten times with a growing
    backoff, so a machine without network would wait minutes; this check bounds the wait. Each
    distinct host (or the proxy that requests would use for it) gets a DNS lookup plus a TCP
    connect within `timeout` seconds, all hosts in parallel. The lookup runs in a daemon thread
    because getaddrinfo has no timeout of its own. Non-network URLs (files, gs://) are skipped.
    `timeout` defaults to _PROBE_TIMEOUT.
    """
    import requests

    timeout = _PROBE_TIMEOUT if timeout is None else timeout

    default_ports = {"http": 80, "https": 443, "ftp": 21}
    hosts = set()
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in default_ports:
            continue
        proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
        if proxy:
            parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        hosts.add((parts.hostname, parts.port or default_ports.get(parts.scheme, 80)))

    errors: queue.SimpleQueue = queue.SimpleQueue()

    def connect(host: str, port: int) -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            errors.put(None)
        except OSError as e:
            errors.put(f"cannot connect to {host}:{port}: {e}")

    for host, port in sorted(hosts):
        threading.Thread(target=connect, args=(host, port), daemon=True).start()
    deadline = time.monotonic() + timeout
    for _ in hosts:
        try:
            error = errors.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return (f"no answer from {', '.join(f'{h}:{p}' for h, p in sorted(hosts))} within "
                    f"{timeout:g} s")
        if error:
            return error
    return None


class OutcomeChannel(Protocol):
    """How process 0 tells the other processes that a dataset is ready (or why it is not)."""

    def publish(self, key: str, outcome: str) -> None: ...

    def wait(self, key: str, timeout: float) -> str:
        """Returns the outcome published under `key`; raises TimeoutError after `timeout` s."""


class JaxKeyValueChannel:
    """The key-value store of jax.distributed's coordination service (what JAX's own
    checkpointing uses to agree across processes)."""

    def __init__(self):
        from jax._src import distributed  # the client has no public accessor
        self._client = distributed.global_state.client

    def publish(self, key: str, outcome: str) -> None:
        self._client.key_value_set(key, outcome, allow_overwrite=True)

    def wait(self, key: str, timeout: float) -> str:
        try:
            return self._client.blocking_key_value_get(key, int(timeout * 1000))
        except jax.errors.JaxRuntimeError as e:
            raise TimeoutError(str(e).splitlines()[0] if str(e) else "timed out") from e


def prepare_on_process_zero(
    is_prepared: Callable[[], bool],
    prepare: Callable[[], None],
    *,
    what: str,
    key: str,
    process_index: int,
    process_count: int,
    channel: OutcomeChannel | None,
    timeout: float,
) -> None:
    """Makes sure the data described by `what` is prepared, with process 0 as its only writer.

    One process: prepares it if it is missing. Several: process 0 prepares it if missing and
    then publishes the outcome under `key` (also when it found the data already there); every
    other process that does not see the data waits up to `timeout` s for that outcome instead of
    writing into the same directory, then reads process 0's copy, which must therefore be on a
    filesystem all processes share (a host-local directory gives a clear error, not a second
    writer). A failure on process 0 reaches the others as their own error at once.
    """
    if process_count == 1:
        if not is_prepared():
            prepare()
        return
    if process_index == 0:
        try:
            if not is_prepared():
                prepare()
        except Exception as e:
            channel.publish(key, str(e) or type(e).__name__)
            raise
        channel.publish(key, _PREPARED)
        return
    if is_prepared():
        return
    logging.info("Process %d waits for process 0 to prepare %s", process_index, what)
    try:
        outcome = channel.wait(key, timeout)
    except TimeoutError as e:
        raise DatasetNotFoundError(
            f"process {process_index} got no word from process 0 on preparing {what} ({e}; "
            f"the wait is config.data.prepare_timeout={timeout:g} s): raise the timeout if "
            f"preparing takes longer, or prepare the data before starting the run") from None
    if outcome != _PREPARED:
        raise DatasetNotFoundError(f"process 0 could not prepare {what}: {outcome}")
    if not is_prepared():
        raise DatasetNotFoundError(
            f"process 0 prepared {what}, but process {process_index} does not see it: the data "
            f"directory must be one shared filesystem path on every host (NFS, GCS FUSE), or "
            f"prepare the data on every host before the run")


def _tfds_not_prepared(name: str, split: str, searched: str, reason: str) -> str:
    return (
        f"tfds dataset {name!r} (split {split!r}) is not prepared in {searched}, and {reason}. "
        f"Prepare it on a machine with network access with\n"
        f"    tfds build {name} --file_format=array_record --data_dir=<dir>\n"
        f"(building needs TensorFlow: pip install -e '.[tfds]') and copy <dir> here, or "
        f"point --config.data.tfds_data_dir at an existing prepared copy.")


def _download_and_prepare(builder: Any, not_prepared: Callable[[str], str]) -> None:
    """Builds `builder`'s dataset as array_record files with tfds' own download manager.

    tfds verifies every download against the checksum it has registered for the URL, writes
    into a temporary directory and renames it when complete, and keeps the archives in
    <data dir>/downloads. `not_prepared(reason)` gives the message when nothing can be fetched.
    """
    import requests
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download.download_manager import NonMatchingChecksumError

    name = builder.name
    manual_dir = builder.data_dir_root / "downloads" / "manual"  # where tfds looks by default
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not any(manual_dir.glob("*")):
        raise DatasetNotFoundError(not_prepared(
            f"tfds cannot download it: its files must first be fetched by hand into "
            f"{manual_dir} (see https://www.tensorflow.org/datasets/catalog/{name})"))
    urls = sorted(builder.url_infos or ())
    if urls:
        problem = unreachable_download_host(urls)
        if problem:
            raise DatasetNotFoundError(not_prepared(f"it cannot be downloaded here ({problem})"))
    else:
        logging.warning("tfds registers no download URL for %r, so the network cannot be checked "
                        "first; without network the download may wait for minutes", name)
    logging.info("Preparing tfds dataset %r in %s: downloading %s, verifying the checksums tfds "
                 "registers and writing array_record files; later runs reuse them",
                 name, builder.data_path, ", ".join(urls) or "its files")
    start = time.monotonic()
    try:
        builder.download_and_prepare(
            file_format="array_record",
            # GCS holds only tfrecord copies: build from the original source.
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    except NonMatchingChecksumError as e:
        raise DownloadError(
            f"a file downloaded for tfds dataset {name!r} does not match the checksum tfds "
            f"registers for it ({_one_line(e)}): the download was corrupted or replaced; run "
            f"again, or prepare it elsewhere with tfds build {name} "
            f"--file_format=array_record") from e
    except (requests.RequestException, tfds.download.DownloadError) as e:
        raise DownloadError(
            f"downloading tfds dataset {name!r} failed ({_one_line(e)}); check the network and "
            f"run again, or prepare it elsewhere with tfds build {name} "
            f"--file_format=array_record") from e
    logging.info("Prepared tfds dataset %r in %s in %.0f s", name, builder.data_path,
                 time.monotonic() - start)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or \
        type(error).__name__


def _tfds_source(config: ml_collections.ConfigDict, split: str) -> Any:
    """Returns the tfds array_record data source of `split`, preparing the dataset first when it
    is missing and config.data.download is true (see `prepare_on_process_zero` for several
    processes); raises DatasetNotFoundError within seconds when it is missing and cannot be
    downloaded (downloading off, or a download host unreachable)."""
    # Imported here so that the digits path does not pay for importing tfds.
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import constants

    name = config.data.dataset
    data_dir = config.data.tfds_data_dir or constants.get_default_data_dir()
    searched = (
        f"{data_dir} (config.data.tfds_data_dir={config.data.tfds_data_dir!r}; '' means the tfds "
        f"default, $TFDS_DATA_DIR or ~/tensorflow_datasets)")

    def try_open() -> tuple[Any, Exception | None]:
        """Returns (the source, None), or (None, tfds' error) when the split is not prepared."""
        try:
            return tfds.data_source(
                name, split=split, data_dir=data_dir, download=False, try_gcs=False,
                builder_kwargs={"file_format": "array_record"}), None
        except tfds.core.DatasetNotFoundError as e:
            raise DatasetNotFoundError(
                f"config.data.dataset={name!r} is neither {DIGITS!r} nor a dataset tfds knows, "
                f"and no prepared copy of it (<dir>/{name}/<version>/) was found in "
                f"{searched}.") from e
        except (KeyError, FileNotFoundError) as e:
            # tfds reports data that was never prepared as an empty split table (KeyError).
            return None, e

    def not_prepared(reason: str) -> str:
        return _tfds_not_prepared(name, split, searched, reason)

    def prepare() -> None:
        if not config.data.download:
            raise DatasetNotFoundError(not_prepared("config.data.download is False"))
        try:
            import tensorflow  # noqa: F401  (tfds builds datasets with it)
        except ImportError:
            raise DatasetNotFoundError(
                f"tfds dataset {name!r} is not prepared in {data_dir}, and preparing it needs "
                f"TensorFlow, which is not installed: pip install -e '.[tfds]', or point "
                f"--config.data.tfds_data_dir at a prepared copy") from None
        _download_and_prepare(
            tfds.builder(name, data_dir=data_dir, file_format="array_record"), not_prepared)

    process_count = jax.process_count()
    prepare_on_process_zero(
        lambda: try_open()[0] is not None, prepare,
        what=f"tfds dataset {name!r} in {data_dir}", key=f"jax_diffusion/tfds/{name}/{data_dir}",
        process_index=jax.process_index(), process_count=process_count,
        channel=JaxKeyValueChannel() if process_count > 1 else None,
        timeout=config.data.prepare_timeout)
    source, error = try_open()
    if source is None:
        # Prepared in another file format, or without this split.
        raise DatasetNotFoundError(not_prepared(
            "its array_record files for this split are missing")) from error
    return source


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


def _decoded_tfds_source(source: Any, config: ml_collections.ConfigDict,
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


def _open_source(config: ml_collections.ConfigDict, split: str) -> Any:
    """Returns the random-access source of config.data.dataset; digits has one split (all 1797
    images)."""
    if config.data.dataset == DIGITS:
        if config.data.channels != 1:
            raise ValueError(f"digits images have 1 channel but "
                             f"config.data.channels={config.data.channels}")
        return ArraySource(*_digits_unit_arrays(config.data.image_size))
    source = _tfds_source(config, split)
    if config.data.decoded_cache and _reads_batches(source):
        return _decoded_tfds_source(source, config, split)
    return source


def _check_image_shape(shape: tuple[int, ...], config: ml_collections.ConfigDict) -> None:
    expected = (config.data.image_size, config.data.image_size, config.data.channels)
    if tuple(shape) != expected:
        raise ValueError(
            f"dataset {config.data.dataset!r} has images of shape {tuple(shape)} (H, W, C) but "
            f"config.data.image_size={config.data.image_size} and "
            f"config.data.channels={config.data.channels} ask for {expected}; set those keys to "
            f"match the dataset (the pipeline does not resize it).")


def read_examples(source: Any, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (images [n, H, W, C] in the source's dtype, labels int32 [n]) of source[indices].

    Uses the source's batch read when it has one: `read_batch` (ArraySource: one fancy index;
    not for a subclass with its own `__getitem__`, which that would bypass) or `__getitems__`
    (tfds: one read of all the records). Unlabelled datasets get label 0, so every batch has
    the same structure."""
    if isinstance(source, ArraySource) and type(source).__getitem__ is ArraySource.__getitem__:
        return source.read_batch(indices)
    keys = [int(i) for i in indices]
    records = source.__getitems__(keys) if _reads_batches(source) else [source[i] for i in keys]
    images = np.stack([np.asarray(record["image"]) for record in records])
    labels = np.array([record.get("label", 0) for record in records], dtype=np.int32)
    return images, labels


def _reads_batches(source: Any) -> bool:
    """Whether `source` is a tfds data source over array_record files, whose __getitems__ reads
    all the records in one call (tfds.testing.mock_data's stand-in reader has a __getitems__
    that fails, so it reads one record at a time)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    return isinstance(getattr(source, "data_source", None), ArrayRecordDataSource)


def flip_mask(seed: int, positions: np.ndarray) -> np.ndarray:
    """Whether to mirror the examples at these positions of the global stream: one fair coin per
    (seed, position), computed for a whole batch at once with the SplitMix64 finaliser (Steele
    et al. 2014), so a flip does not depend on batching, process count or worker count."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps around by design
        z = np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + \
            positions.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(63)).astype(bool)


class _EpochOrder:
    """The permutation of the source for each epoch, seeded by (seed, epoch); the last one is
    kept, since a process reads one epoch for many batches in a row."""

    def __init__(self, num_examples: int, seed: int):
        self._num_examples = num_examples
        self._seed = seed
        self._cached: tuple[int, np.ndarray] | None = None

    def __call__(self, epoch: int) -> np.ndarray:
        if self._cached is None or self._cached[0] != epoch:
            order = np.random.default_rng([self._seed, epoch]).permutation(self._num_examples)
            self._cached = (epoch, order)
        return self._cached[1]


class _ReadLocalBatch:
    """Local batch i of the stream -> {"image": float32 [L, H, W, C] in [-1, 1], "label": int32
    [L]}: rows (i % P)*L:(i % P + 1)*L of global batch i // P, read, scaled and flipped as whole
    arrays (no per-example Python)."""

    def __init__(self, source: Any, config: ml_collections.ConfigDict, *, order_seed: int,
                 flip_seed: int, local_batch: int, process_count: int):
        self._source = source
        self._config = config
        self._order = _EpochOrder(len(source), order_seed)
        self._flip_seed = flip_seed if config.data.random_flip else None
        self._local_batch = local_batch
        self._process_count = process_count
        self._batches_per_epoch = len(source) // (local_batch * process_count)

    def __call__(self, index: int, _: Any) -> dict[str, np.ndarray]:
        global_batch, row = divmod(index, self._process_count)
        epoch, batch_in_epoch = divmod(global_batch, self._batches_per_epoch)
        start = (batch_in_epoch * self._process_count + row) * self._local_batch
        indices = self._order(epoch)[start:start + self._local_batch]
        images, labels = read_examples(self._source, indices)
        _check_image_shape(images.shape[1:], self._config)
        images = _to_model_range(images)
        if self._flip_seed is not None:
            positions = index * self._local_batch + np.arange(self._local_batch)
            flip = flip_mask(self._flip_seed, positions)
            images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
        return {"image": images, "label": labels}


def iterator_from_source(
    source: Any,
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Returns an endless, checkpointable iterator of this process's training batches from `source`.

    Each element is {"image": float32 [local_batch, H, W, C] in [-1, 1], "label": int32
    [local_batch]} with local_batch = config.train.batch_size // process_count. Epoch e is a
    permutation of the whole source seeded by (seed, e), cut into N // batch_size global batches;
    the last N % batch_size examples of that permutation are dropped, so every batch holds
    distinct examples and every epoch has the same number of steps. Process p reads rows
    p*local_batch:(p+1)*local_batch of each global batch, so the processes' batches concatenated
    in process order are the single-process batch. Flips (config.data.random_flip) are seeded by
    the example's position in the global stream, so they too do not depend on process_count.
    Each local batch is read, scaled and flipped as whole numpy arrays. The iterator has
    `get_state() -> dict` (JSON-serialisable) and `set_state(dict)`.
    """
    num_examples = len(source)
    global_batch = config.train.batch_size
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is not in [0, process_count={process_count})")
    if global_batch % process_count:
        raise ValueError(
            f"config.train.batch_size={global_batch} is not divisible by "
            f"process_count={process_count}")
    if global_batch > num_examples:
        raise ValueError(
            f"config.train.batch_size={global_batch} is larger than dataset "
            f"{config.data.dataset!r} ({num_examples} examples)")
    local_batch = global_batch // process_count
    # Fail now, not inside a reader thread, on a wrong image shape.
    _check_image_shape(read_examples(source, np.array([0]))[0].shape[1:], config)
    # Independent 32-bit seeds, so that nearby `seed`s do not give related shuffles or flips.
    order_seed, flip_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2))
    read = _ReadLocalBatch(source, config, order_seed=order_seed, flip_seed=flip_seed,
                           local_batch=local_batch, process_count=process_count)
    # Element i of the endless stream is local batch i (the process_count local batches of
    # global batch i // process_count in process order); process p takes every P-th one
    # starting at p, and reads nothing else: the slice is lazy.
    local_batches_per_epoch = (num_examples // global_batch) * process_count
    ds = grain.MapDataset.range(local_batches_per_epoch).repeat().map_with_index(read)
    ds = ds[process_index::process_count]
    it_ds = ds.to_iter_dataset(_READ_OPTIONS)
    if config.data.worker_count > 0:
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=config.data.worker_count))
    return iter(it_ds)


def create_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Returns this process's endless training iterator over config.data.dataset (train split).

    See `iterator_from_source` for the batches, the shuffle, the sharding and the state.
    """
    source = _open_source(config, config.data.train_split)
    return iterator_from_source(
        source, config, seed=seed, process_index=process_index, process_count=process_count)


def dataset_info(config: ml_collections.ConfigDict) -> tuple[int, int]:
    """Returns (number of training examples, number of classes; 0 if the dataset has no labels)."""
    source = _open_source(config, config.data.train_split)
    if isinstance(source, ArraySource):
        return len(source), int(source.labels.max()) + 1
    features = source.dataset_info.features
    # tfds' FeaturesDict has no .get.
    label = features["label"] if "label" in features else None  # noqa: SIM401
    return len(source), int(getattr(label, "num_classes", None) or 0)


def load_eval_arrays(
    config: ml_collections.ConfigDict, max_examples: int | None = None, split: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Returns the first max_examples (all if None) of `split` (default: the eval split), in the
    dataset's order.

    Returns (images float32 [n, H, W, C] in [-1, 1], labels int32 [n]). tfds reads
    config.data.eval_split. Digits has no official split and trains on all 1797 images, so its eval
    set is that same whole set (an NLL on digits is a training-set NLL).
    """
    source = _open_source(config, split or config.data.eval_split)
    count = len(source) if max_examples is None else min(max_examples, len(source))
    images, labels = read_examples(source, np.arange(count))
    _check_image_shape(images.shape[1:], config)
    return _to_model_range(images), labels
