"""A CIFAR-10-shaped tfds dataset for the input-pipeline benchmark, written without a download.

`bench_images` (the builder's name) has CIFAR-10's train split: 50,000 32x32x3 uint8 images
stored as PNG in array_record files, and 10 classes, so `tfds.data_source` reads and decodes it
exactly as it reads a prepared cifar10. The pixels are smooth colour ramps plus noise (CIFAR's
PNGs are neither constant nor pure noise). Building needs TensorFlow, so `ensure_prepared` runs
the builder in a subprocess: the benchmarking process never imports it.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from jax_diffusion.errors import DatasetNotFoundError

NAME = "bench_images"
NUM_EXAMPLES = 50_000
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10


def _image(index: int):
    import numpy as np
    rng = np.random.default_rng(index)
    ramp = np.linspace(0.0, 1.0, IMAGE_SHAPE[0])
    base = (rng.uniform(0, 255, 3) * ramp[:, None, None] +
            rng.uniform(0, 255, 3) * ramp[None, :, None])
    noisy = base / 2 + rng.normal(0, 12, IMAGE_SHAPE)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def _build(data_dir: str, num_examples: int) -> None:
    import tensorflow_datasets as tfds

    class BenchImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=IMAGE_SHAPE),
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(num_examples)}

        def _generate_examples(self, count):
            for i in range(count):
                yield i, {"image": _image(i), "label": i % NUM_CLASSES}

    BenchImages(data_dir=data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def version_dir(data_dir: str) -> str:
    """The dataset's directory in the tfds data dir `data_dir`."""
    return os.path.join(data_dir, NAME, "1.0.0")


def is_prepared(data_dir: str) -> bool:
    return os.path.isfile(os.path.join(version_dir(data_dir), "dataset_info.json"))


def ensure_prepared(data_dir: str, num_examples: int = NUM_EXAMPLES, timeout: float = 1800) -> str:
    """Builds the dataset in `data_dir` unless it is there; returns `data_dir` (a tfds data dir).

    tfds writes into a temporary directory and renames it when complete, so an interrupted build
    leaves nothing that `is_prepared` accepts."""
    if not is_prepared(data_dir):
        if importlib.util.find_spec("tensorflow") is None:
            raise DatasetNotFoundError(
                f"the benchmark dataset {NAME!r} is not prepared in {data_dir}, and preparing it "
                f"needs TensorFlow, which is not installed: pip install -e '.[tfds]'")
        subprocess.run(
            [sys.executable, "-c", "from jax_diffusion.bench.dataset import _build; "
             f"_build({data_dir!r}, {num_examples})"],
            check=True, timeout=timeout, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
            capture_output=True)
    return data_dir


if __name__ == "__main__":
    ensure_prepared(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else NUM_EXAMPLES)
