"""The training input pipeline over any source: a seeded shuffle that changes every epoch, the
tail of each epoch dropped, an optional seeded horizontal flip, images scaled to [-1, 1], and each
process reading only its rows of every global batch. A chain of grain `MapDataset`s, so the
iterator state is a small JSON-serialisable dict and a restored iterator continues exactly."""
from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from jax_diffusion.config_checks import choice, positive_int, require
from jax_diffusion.data.decoded_cache import decoded_tfds_source
from jax_diffusion.data.digits import DIGITS, digits_unit_arrays
from jax_diffusion.data.sources import ArraySource, read_examples, reads_batches, to_model_range
from jax_diffusion.data.tfds_source import tfds_source
from jax_diffusion.errors import ConfigError


# Pipeline elements are whole local batches, so two reader threads and two buffered batches keep
# the next batch ready without holding many batches in memory; more parallelism comes from
# config.data.worker_count processes.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


def _open_source(config: ml_collections.ConfigDict, split: str) -> Any:
    """Returns the random-access source of config.data.dataset; digits has one split (all 1797
    images)."""
    if config.data.dataset == DIGITS:
        if config.data.channels != 1:
            raise ValueError(f"digits images have 1 channel but "
                             f"config.data.channels={config.data.channels}")
        return ArraySource(*digits_unit_arrays(config.data.image_size))
    source = tfds_source(config, split)
    if config.data.decoded_cache and reads_batches(source):
        return decoded_tfds_source(source, config, split)
    return source


def _check_image_shape(shape: tuple[int, ...], config: ml_collections.ConfigDict) -> None:
    expected = (config.data.image_size, config.data.image_size, config.data.channels)
    if tuple(shape) != expected:
        raise ValueError(
            f"dataset {config.data.dataset!r} has images of shape {tuple(shape)} (H, W, C) but "
            f"config.data.image_size={config.data.image_size} and "
            f"config.data.channels={config.data.channels} ask for {expected}; set those keys to "
            f"match the dataset (the pipeline does not resize it).")


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
        images = to_model_range(images)
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
    return to_model_range(images), labels


def validate_data_config(data: ml_collections.ConfigDict) -> None:
    """config.data's rules (a tfds name is looked up in tfds' registry, not downloaded)."""
    require(isinstance(data.dataset, str) and data.dataset.strip(), "data.dataset",
             data.dataset, f"must name a dataset: {DIGITS!r} (offline) or a tfds image dataset "
             f"such as 'cifar10'")
    positive_int(data, "image_size", "data")
    choice(data.channels, "data.channels", (1, 3))
    positive_int(data, "worker_count", "data", minimum=0)
    require(isinstance(data.download, bool), "data.download", data.download,
             "must be True or False")
    require(isinstance(data.decoded_cache, bool), "data.decoded_cache", data.decoded_cache,
             "must be True or False")
    require(data.prepare_timeout > 0, "data.prepare_timeout", data.prepare_timeout,
             "must be > 0 seconds")
    if data.dataset == DIGITS:
        require(data.channels == 1, "data.channels", data.channels,
                 "must be 1 for the digits dataset (grayscale)")
    else:
        _check_tfds_name(data.dataset)


def _check_tfds_name(name: str) -> None:
    """An unknown dataset fails here, not after the model is built. tfds is imported only for
    non-digits datasets (it takes a few seconds)."""
    import tensorflow_datasets as tfds
    try:
        tfds.builder_cls(name)
    except Exception:  # noqa: BLE001  (tfds raises DatasetNotFoundError or a registry error)
        raise ConfigError(
            f"config.data.dataset={name!r} is neither {DIGITS!r} nor a dataset tfds knows "
            f"(e.g. 'cifar10', 'mnist'; see tfds.list_builders())") from None
