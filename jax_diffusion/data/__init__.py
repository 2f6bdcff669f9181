"""Datasets and the training input pipeline.

Two kinds of data feed one grain pipeline:
- "digits" (digits.py): scikit-learn's 8x8 digits, offline, held in memory;
- any tfds image dataset prepared as array_record (tfds_source.py), downloaded and prepared on
  first use when missing (preparation.py), and decoded once into memory-mapped .npy files
  (decoded_cache.py).

Both are random-access sources (sources.py) read by `iterator_from_source` (pipeline.py).
"""
from jax_diffusion.data.decoded_cache import DecodedFileSource, decoded_cache_paths, write_decoded
from jax_diffusion.data.digits import DIGITS, load_digits_arrays
from jax_diffusion.data.pipeline import (create_train_iterator, dataset_info, flip_mask,
                                         iterator_from_source, load_eval_arrays)
from jax_diffusion.data.preparation import (JaxKeyValueChannel, prepare_on_process_zero,
                                            unreachable_download_host)
from jax_diffusion.data.sources import ArraySource, read_examples
# Callers catch it as data.DatasetNotFoundError.
from jax_diffusion.errors import DatasetNotFoundError

__all__ = ["DIGITS", "ArraySource", "DatasetNotFoundError", "DecodedFileSource",
           "JaxKeyValueChannel", "create_train_iterator", "dataset_info", "decoded_cache_paths",
           "flip_mask", "iterator_from_source", "load_digits_arrays", "load_eval_arrays",
           "prepare_on_process_zero", "read_examples", "unreachable_download_host",
           "write_decoded"]
