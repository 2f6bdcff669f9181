"""Tests for jax_diffusion/data/: digits, the grain pipeline (order, flips, sharding, resume),
tfds."""
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import sklearn.datasets
import tensorflow_datasets as tfds

from configs.default import get_config
from jax_diffusion import data


def _config(dataset="digits", image_size=16, channels=1, batch_size=64, random_flip=False,
            tfds_data_dir=""):
    config = get_config()
    config.data.dataset = dataset
    config.data.image_size = image_size
    config.data.channels = channels
    config.data.random_flip = random_flip
    config.data.tfds_data_dir = tfds_data_dir
    config.train.batch_size = batch_size
    config.data.download = False  # these tests read prepared data; never connect
    return config


def _indexed_source(num_examples, size=4, channels=1):
    """An in-memory source of random uint8 images whose label is the example's index."""
    rng = np.random.default_rng(123)
    images = rng.integers(0, 256, (num_examples, size, size, channels), dtype=np.uint8)
    return data.ArraySource(images, np.arange(num_examples, dtype=np.int32))


def _take(iterator, count):
    return [next(iterator) for _ in range(count)]


def _assert_model_batch(batch, local_batch, shape):
    assert set(batch) == {"image", "label"}
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (local_batch, *shape)
    assert batch["label"].dtype == np.int32 and batch["label"].shape == (local_batch,)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0


# ---------------------------------------------------------------- digits

def test_load_digits_arrays_match_sklearn():
    digits = sklearn.datasets.load_digits()
    images8, labels8 = data.load_digits_arrays(8)
    # v/16 in [0, 1], then 2x - 1: v/8 - 1.
    np.testing.assert_allclose(images8[..., 0], digits.images / 8.0 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(labels8, digits.target)
    assert labels8.dtype == np.int32

    images, labels = data.load_digits_arrays(16)
    assert images.shape == (1797, 16, 16, 1) and images.dtype == np.float32
    assert images.min() == -1.0 and images.max() <= 1.0
    np.testing.assert_array_equal(labels, digits.target)
    # 2x bilinear upsampling keeps every image's mean intensity.
    np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), images8.mean(axis=(1, 2, 3)), atol=1e-5)


def test_digits_pipeline_batches_are_sklearn_examples_with_their_labels():
    config = _config()
    images, _ = data.load_digits_arrays(16)
    index_of = {image.tobytes(): i for i, image in enumerate(images)}
    target = sklearn.datasets.load_digits().target
    seen = []
    for batch in _take(data.create_train_iterator(config, seed=0), 3):
        _assert_model_batch(batch, 64, (16, 16, 1))
        # KeyError if not a digits image
        indices = [index_of[image.tobytes()] for image in batch["image"]]
        np.testing.assert_array_equal(batch["label"], target[indices])
        seen += indices
    assert len(set(seen)) == len(seen) == 192
    assert seen != sorted(seen)  # shuffled
    assert data.dataset_info(config) == (1797, 10)


def test_digits_eval_arrays_are_the_whole_set_in_order():
    images, labels = data.load_eval_arrays(_config())
    expected_images, expected_labels = data.load_digits_arrays(16)
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)
    images, labels = data.load_eval_arrays(_config(), max_examples=10)
    assert images.shape == (10, 16, 16, 1)
    np.testing.assert_array_equal(labels, expected_labels[:10])


# ---------------------------------------------------------------- grain pipeline

@pytest.mark.parametrize("num_examples", [40, 42])
def test_each_epoch_is_a_fresh_permutation_and_the_tail_is_dropped(num_examples):
    config = _config(image_size=4, batch_size=8)
    iterator = data.iterator_from_source(_indexed_source(num_examples), config, seed=0)
    # 5: 40 examples an epoch, the other num_examples - 40 dropped
    steps_per_epoch = num_examples // 8
    epochs = []
    for _ in range(3):
        labels = np.concatenate([b["label"] for b in _take(iterator, steps_per_epoch)])
        assert len(set(labels.tolist())) == 40 and labels.min() >= 0 and labels.max() < num_examples
        epochs.append(labels)
    if num_examples == 40:
        assert all(sorted(labels.tolist()) == list(range(40)) for labels in epochs)
    assert not np.array_equal(epochs[0], np.arange(40))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])


def test_order_and_flips_are_reproducible_from_the_seed():
    config = _config(image_size=4, batch_size=8, random_flip=True)
    source = _indexed_source(30)
    first = _take(data.iterator_from_source(source, config, seed=7), 8)
    again = _take(data.iterator_from_source(source, config, seed=7), 8)
    other = _take(data.iterator_from_source(source, config, seed=8), 8)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert not all(np.array_equal(a["label"], b["label"])
                   for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize("random_flip", [True, False])
def test_random_flip(random_flip):
    config = _config(image_size=4, batch_size=32, random_flip=random_flip)
    source = _indexed_source(64)
    expected = source.images.astype(np.float32) / 127.5 - 1.0
    flipped = []
    for batch in _take(data.iterator_from_source(source, config, seed=1), 16):  # 512 images
        for image, label in zip(batch["image"], batch["label"], strict=True):
            is_original = np.array_equal(image, expected[label])
            is_mirror = np.array_equal(image, expected[label][:, ::-1])
            # exactly one of the two (random images are not symmetric)
            assert is_original != is_mirror
            flipped.append(is_mirror)
    fraction = np.mean(flipped)
    if random_flip:
        assert 0.4 < fraction < 0.6, fraction  # binomial(512, 1/2): sd 0.022
    else:
        assert fraction == 0.0


@pytest.mark.parametrize("process_count", [2, 3, 4])
def test_process_shards_concatenate_to_the_single_process_batch(process_count):
    config = _config(image_size=4, batch_size=12, random_flip=True)
    source = _indexed_source(50)  # 4 global batches an epoch: 10 steps cross two epoch boundaries
    single = _take(data.iterator_from_source(source, config, seed=3), 10)
    shards = [_take(data.iterator_from_source(source, config, seed=3, process_index=p,
                                              process_count=process_count), 10)
              for p in range(process_count)]
    for step, whole in enumerate(single):
        for key in ("image", "label"):
            parts = [shard[step][key] for shard in shards]
            assert all(len(part) == 12 // process_count for part in parts)
            np.testing.assert_array_equal(np.concatenate(parts), whole[key])


def test_process_reads_only_its_rows():
    """Each process indexes the source only for the examples of its own rows."""

    class CountingSource(data.ArraySource):
        def __getitem__(self, index):
            self.reads.append(index)
            return super().__getitem__(index)

    # 30 steps an epoch, so the 3 batches taken and the few read ahead all come from epoch 0.
    base = _indexed_source(480)
    config = _config(image_size=4, batch_size=16)
    reads = []
    for p in range(2):
        source = CountingSource(base.images, base.labels)
        source.reads = []
        iterator = data.iterator_from_source(source, config, seed=5, process_index=p,
                                             process_count=2)
        labels = np.concatenate([b["label"] for b in _take(iterator, 3)])
        iterator.close()
        # index 0 is read once up front to check the image shape
        reads.append(set(source.reads) - {0})
        assert set(labels.tolist()) - {0} <= reads[-1]
        assert len(source.reads) < 480 // 2
    assert not reads[0] & reads[1]  # in an epoch, no example is read by both processes


def _resumable_iterator(dataset):
    if dataset == "digits":
        return data.create_train_iterator(_config(random_flip=True), seed=11)
    # 2 steps an epoch, so the 6 batches of the test span three epochs.
    config = _config(image_size=4, batch_size=8, random_flip=True)
    return data.iterator_from_source(_indexed_source(20), config, seed=11, process_index=1,
                                     process_count=2)


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])
def test_resume_from_state_is_exact(dataset):
    iterator = _resumable_iterator(dataset)
    _take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # must survive a JSON round trip
    expected = _take(iterator, 3)
    restored = _resumable_iterator(dataset)
    restored.set_state(state)
    for a, b in zip(expected, _take(restored, 3), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_unlabelled_dataset_gets_label_zero():
    class ImagesOnly:
        def __init__(self, images):
            self.images = images

        def __len__(self):
            return len(self.images)

        def __getitem__(self, index):
            return {"image": self.images[index]}

    source = ImagesOnly(_indexed_source(16).images)
    batch = next(data.iterator_from_source(source, _config(image_size=4, batch_size=8), seed=0))
    _assert_model_batch(batch, 8, (4, 4, 1))
    np.testing.assert_array_equal(batch["label"], np.zeros(8, np.int32))


def test_clear_errors_for_wrong_shapes_and_batch_sizes():
    source = _indexed_source(20, size=8, channels=1)
    with pytest.raises(ValueError, match=r"shape \(8, 8, 1\).*config\.data\.image_size=16"):
        data.iterator_from_source(source, _config(image_size=16, batch_size=4), seed=0)
    with pytest.raises(ValueError, match=r"config\.data\.channels=3"):
        data.iterator_from_source(source, _config(image_size=8, channels=3, batch_size=4), seed=0)
    with pytest.raises(ValueError, match=r"config\.data\.channels=3"):
        data.create_train_iterator(_config(channels=3), seed=0)
    with pytest.raises(ValueError,
                       match=r"config\.train\.batch_size=10 is not divisible by process_count=3"):
        data.iterator_from_source(source, _config(image_size=8, batch_size=10), seed=0,
                                  process_count=3)
    with pytest.raises(ValueError, match=r"config\.train\.batch_size=32 is larger than"):
        data.iterator_from_source(source, _config(image_size=8, batch_size=32), seed=0)


# ---------------------------------------------------------------- tfds

def test_tfds_not_prepared_fails_fast_with_the_command(tmp_path):
    config = _config("cifar10", 32, 3, tfds_data_dir=str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.create_train_iterator(config, seed=0)
    assert time.perf_counter() - start < 10
    message = str(error.value)
    assert "tfds build cifar10 --file_format=array_record" in message
    assert str(tmp_path) in message and "config.data.tfds_data_dir" in message
    assert isinstance(error.value, FileNotFoundError)
    for read in (data.dataset_info, data.load_eval_arrays):
        with pytest.raises(data.DatasetNotFoundError, match="tfds build cifar10"):
            read(config)


def test_tfds_mock_cifar10_through_the_pipeline(tmp_path):
    config = _config("cifar10", 32, 3, batch_size=8, tfds_data_dir=str(tmp_path))
    with tfds.testing.mock_data(num_examples=24):
        source = tfds.data_source("cifar10", split="train", data_dir=str(tmp_path), download=False,
                                  try_gcs=False)
        records = [source[i] for i in range(24)]
        index_of = {(r["image"].astype(np.float32) / 127.5 - 1.0).tobytes(): i
                    for i, r in enumerate(records)}
        batches = _take(data.create_train_iterator(config, seed=0), 3)  # one epoch
        assert data.dataset_info(config) == (24, 10)
        eval_images, eval_labels = data.load_eval_arrays(config, max_examples=5)
    seen = []
    for batch in batches:
        _assert_model_batch(batch, 8, (32, 32, 3))
        indices = [index_of[image.tobytes()] for image in batch["image"]]
        np.testing.assert_array_equal(batch["label"], [records[i]["label"] for i in indices])
        seen += indices
    assert sorted(seen) == list(range(24))
    assert eval_images.shape == (5, 32, 32, 3) and eval_images.dtype == np.float32
    assert eval_labels.dtype == np.int32 and set(eval_labels.tolist()) <= set(range(10))


_BUILD_TINY_DATASET = textwrap.dedent('''
    import sys
    import numpy as np
    import tensorflow_datasets as tfds

    class TinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(4, 4, 3)),
                "label": tfds.features.ClassLabel(num_classes=3)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(range(30)),
                    "test": self._generate_examples(range(30, 37))}

        def _generate_examples(self, ids):
            for i in ids:
                image = (i * 7 + np.arange(48).reshape(4, 4, 3) * 5) % 256
                yield i, {"image": image.astype(np.uint8), "label": i % 3}

    TinyImages(data_dir=sys.argv[1], file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
''')


def _tiny_image(i):
    return ((i * 7 + np.arange(48).reshape(4, 4, 3) * 5) % 256).astype(np.uint8)


@pytest.fixture(scope="module")
def tiny_tfds_dir(tmp_path_factory):
    """A real tfds dataset in array_record files (built in a subprocess: building needs
    TensorFlow)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    result = subprocess.run([sys.executable, "-c", _BUILD_TINY_DATASET, str(data_dir)],
                            capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(data_dir.glob("tiny_images/1.0.0/tiny_images-train.array_record-*"))
    return str(data_dir)


def test_tfds_array_record_files_through_the_pipeline(tiny_tfds_dir):
    config = _config("tiny_images", 4, 3, batch_size=6, random_flip=False,
                     tfds_data_dir=tiny_tfds_dir)
    index_of = {(_tiny_image(i).astype(np.float32) / 127.5 - 1.0).tobytes(): i for i in range(37)}
    assert data.dataset_info(config) == (30, 3)

    single = _take(data.create_train_iterator(config, seed=2), 10)  # two epochs of 5 steps
    for epoch in (single[:5], single[5:]):
        ids = []
        for batch in epoch:
            _assert_model_batch(batch, 6, (4, 4, 3))
            batch_ids = [index_of[image.tobytes()] for image in batch["image"]]
            np.testing.assert_array_equal(batch["label"], np.array(batch_ids) % 3)
            ids += batch_ids
        assert sorted(ids) == list(range(30))
    assert [index_of[im.tobytes()] for im in single[0]["image"]] != \
        [index_of[im.tobytes()] for im in single[5]["image"]]

    halves = [_take(data.create_train_iterator(config, seed=2, process_index=p,
                                               process_count=2), 10)
              for p in range(2)]
    for step, whole in enumerate(single):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][step]["image"], halves[1][step]["image"]]), whole["image"])

    eval_images, eval_labels = data.load_eval_arrays(config)
    eval_ids = [index_of[image.tobytes()] for image in eval_images]
    assert sorted(eval_ids) == list(range(30, 37))
    np.testing.assert_array_equal(eval_labels, np.array(eval_ids) % 3)

    with pytest.raises(ValueError,
                       match=r"config\.data\.image_size=16 and config\.data\.channels=3"):
        config = _config("tiny_images", 16, 3, batch_size=6, tfds_data_dir=tiny_tfds_dir)
        data.create_train_iterator(config, seed=0)


# ---------------------------------------------------------------- without TensorFlow

_WITHOUT_TENSORFLOW = textwrap.dedent('''
    import importlib.machinery
    import sys

    class PathFinderWithoutTensorflow(importlib.machinery.PathFinder):
        """Finds no TensorFlow, as where it is not installed (for imports and find_spec alike)."""

        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.partition(".")[0] == "tensorflow":
                return None
            return super().find_spec(name, path, target)

    sys.meta_path = [PathFinderWithoutTensorflow if finder is importlib.machinery.PathFinder
                     else finder for finder in sys.meta_path]
    from configs.default import get_config
    from jax_diffusion import data
    config = get_config()
    config.data.update(dataset="tiny_images", image_size=4, channels=3, random_flip=False,
                       tfds_data_dir=sys.argv[1], download=False)
    config.train.batch_size = 6
    batch = next(data.create_train_iterator(config, seed=0))
    images, _ = data.load_eval_arrays(config)
    print(batch["image"].shape, images.shape)
    config.data.update(dataset="cifar10", image_size=32, tfds_data_dir=sys.argv[2], download=True)
    try:
        data.create_train_iterator(config, seed=0)
    except data.DatasetNotFoundError as e:
        print(repr(str(e)))
    assert "tensorflow" not in sys.modules
''')


def test_without_tensorflow_prepared_data_reads_and_preparing_names_the_extra(tiny_tfds_dir,
                                                                              tmp_path):
    """Only preparing a tfds dataset needs TensorFlow (the [tfds] extra): reading array_record
    data does not, and a missing dataset says which extra to install, before any download."""
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TENSORFLOW, tiny_tfds_dir, str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    shapes, message = result.stdout.strip().splitlines()[-2:]
    assert shapes == "(6, 4, 4, 3) (7, 4, 4, 3)"
    assert "preparing it needs TensorFlow" in message and "pip install -e '.[tfds]'" in message
    assert str(tmp_path) in message and "\\n" not in message  # one line
