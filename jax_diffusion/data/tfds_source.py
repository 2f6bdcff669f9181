"""A tfds image dataset prepared as array_record, read with `tfds.data_source` (no TensorFlow
needed), prepared first when it is missing and config.data.download is true."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections

from jax_diffusion.data.digits import DIGITS
from jax_diffusion.data.preparation import (JaxKeyValueChannel, download_and_prepare,
                                             prepare_on_process_zero, tfds_not_prepared)
from jax_diffusion.errors import DatasetNotFoundError


def tfds_source(config: ml_collections.ConfigDict, split: str) -> Any:
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
        return tfds_not_prepared(name, split, searched, reason)

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
        download_and_prepare(
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
