"""parallel.map_batches dispatches batch i+1 before it fetches batch i (the devices never wait
for the host between batches), and sampling that way gives the images of a plain batch-by-batch
loop, bit for bit."""
import jax
import numpy as np
import pytest
from tiny_config import tiny_config

from jax_diffusion.generation import sampling
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training.train_state import create_optimizer, create_train_state


def _recorded_map(monkeypatch, overlap):
    """The order of map_batches' calls of fn ("call", i) and fetches ("fetch", i) over 5 batches
    (23 rows of 8 + a filled-up last batch), and its result."""
    events = []
    original_to_host = parallel.to_host

    def fetch(tree):
        events.append(("fetch", int(np.asarray(tree)[0]) // 8))
        return original_to_host(tree)

    monkeypatch.setattr(parallel, "to_host", fetch)
    mesh = parallel.create_mesh()

    def fn(i, rows):
        events.append(("call", i))
        return rows * 1

    result = parallel.map_batches(fn, (np.arange(37, dtype=np.int32),), 8, mesh, overlap=overlap)
    return events, result


def test_map_batches_dispatches_the_next_batch_before_fetching(monkeypatch):
    events, result = _recorded_map(monkeypatch, overlap=True)
    np.testing.assert_array_equal(result, np.arange(37))
    assert events == [("call", 0), ("call", 1), ("fetch", 0), ("call", 2), ("fetch", 1),
                      ("call", 3), ("fetch", 2), ("call", 4), ("fetch", 3), ("fetch", 4)]
    # The sequential reference fetches each batch before the next call.
    events, sequential = _recorded_map(monkeypatch, overlap=False)
    np.testing.assert_array_equal(sequential, result)
    assert events == [(kind, i) for i in range(5) for kind in ("call", "fetch")]


@pytest.fixture(scope="module")
def tiny_sampler():
    config = tiny_config(sample__num_steps=3)
    mesh = parallel.create_mesh()
    model = create_model(config.model)
    params = create_train_state(config, model, create_optimizer(config.train), mesh).params
    return sampling.make_sample_fn(config, model, mesh, 16), params, mesh


def test_overlapped_sampling_gives_the_images_of_a_plain_loop(tiny_sampler):
    """40 samples in batches of 16 (the last one filled up): generate_samples against a loop
    that samples batch i with key fold_in(seed, i) and fetches it before the next."""
    sample_fn, params, mesh = tiny_sampler
    labels = sampling.default_labels(40, 10)
    seed = 7

    def plain_loop(key_of_batch):
        padded = np.resize(labels, 48)
        out = [np.asarray(sample_fn(params, key_of_batch(i),
                                    parallel.shard_global_array(padded[16 * i:16 * (i + 1)],
                                                                mesh)))
               for i in range(3)]
        return np.concatenate(out)[:40]

    base = jax.random.PRNGKey(seed)
    reference = plain_loop(lambda i: jax.random.fold_in(base, i))
    overlapped = sampling.generate_samples(sample_fn, params, labels, 16, seed, mesh,
                                           progress=False)
    assert overlapped.dtype == np.uint8 and overlapped.shape == (40, 8, 8, 1)
    np.testing.assert_array_equal(overlapped, reference)
    # Negative control: the batches' keys in another order give other images.
    shuffled = plain_loop(lambda i: jax.random.fold_in(base, (i + 1) % 3))
    assert np.mean(shuffled != overlapped) > 0.5
