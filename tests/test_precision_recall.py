"""Improved precision and recall against a float64 reference written from Kynkaanniemi et al.'s
definition, and against torch-fidelity 0.4.0's implementation, on the same features.

torch-fidelity's package __init__ and its utils module import torchvision, which does not import
beside torch 2.13.0: metric_prc.py is loaded under a bare package, with its utils import (only
used by its image-level entry point) standing in as an empty module."""
import importlib
import importlib.util
import sys
import types

import jax
import numpy as np
import pytest
from torch_reference import import_torch

from jax_diffusion.evaluation import precision_recall as pr
from jax_diffusion.runtime import parallel

torch = import_torch()


def reference_precision_recall(real: np.ndarray, generated: np.ndarray, k: int,
                               strict: bool = False, distinct: bool = False
                               ) -> tuple[float, float]:
    """The paper's definition in float64: x is in the manifold of Phi when ||x - phi|| <=
    ||phi - NN_k(phi)|| for some phi in Phi, NN_k(phi) the k-th nearest of the OTHER rows of Phi
    (another row equal to phi is a neighbour at distance 0). `strict` (< instead of <=) and
    `distinct` (neighbours only among rows that differ from phi) are the negative controls."""
    def radii(points):
        distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
        out = np.empty(len(points))
        for i, row in enumerate(distances):
            others = np.delete(row, i)
            if distinct:
                others = others[others > 0]
            out[i] = np.sort(others)[k - 1]
        return out

    def fraction_inside(queries, points):
        distances = np.sqrt(((queries[:, None, :] - points[None, :, :]) ** 2).sum(-1))
        bound = radii(points)[None, :]
        inside = distances < bound if strict else distances <= bound
        return inside.any(axis=1).mean()

    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    return fraction_inside(generated, real), fraction_inside(real, generated)


def _gaussian_sets(seed: int = 0):
    rng = np.random.default_rng(seed)
    real = rng.normal(size=(150, 12)).astype(np.float32)
    generated = (rng.normal(size=(130, 12)) * 1.3 + 0.4).astype(np.float32)
    return real, generated


def _lattice_sets(seed: int = 1):
    """Integer points of {0, 1, 2}^3: many rows repeat and many distances tie exactly (squared
    distances are small integers, exact in float32)."""
    rng = np.random.default_rng(seed)
    real = rng.integers(0, 3, (60, 3)).astype(np.float32)
    generated = rng.integers(0, 3, (50, 3)).astype(np.float32)
    generated[:10] += np.float32(1.0)  # some points off the real lattice
    return real, generated


def test_gaussian_features_match_the_definition():
    real, generated = _gaussian_sets()
    ours = pr.precision_recall(real, generated, k=3)
    expected = reference_precision_recall(real, generated, 3)
    assert ours == pytest.approx(expected, abs=0)
    assert 0.2 < ours[0] < 0.99 and 0.2 < ours[1] < 0.99  # neither trivially 0 nor 1
    # Negative control: another k changes the answer on these sets.
    assert reference_precision_recall(real, generated, 5) != expected


def test_ties_and_duplicates_match_the_definition():
    real, generated = _lattice_sets()
    assert len(np.unique(real, axis=0)) < len(real)  # duplicates present
    ours = pr.precision_recall(real, generated, k=3)
    expected = reference_precision_recall(real, generated, 3)
    assert ours == pytest.approx(expected, abs=0)
    # Negative controls: the data decides between <= and <, and between counting a duplicate of
    # phi as its neighbour or not; a sloppy reading of the definition fails here.
    assert reference_precision_recall(real, generated, 3, strict=True) != expected
    assert reference_precision_recall(real, generated, 3, distinct=True) != expected


@pytest.mark.parametrize("devices, batch_size, chunk_size", [(1, 7, 11), (8, 16, 64), (8, 8, 500)])
def test_batching_chunking_and_sharding_do_not_change_the_result(devices, batch_size, chunk_size):
    """Rows not a multiple of the batch, columns not a multiple of the chunk, 1 or 8 devices."""
    real, generated = _gaussian_sets(2)
    mesh = parallel.create_mesh(jax.devices()[:devices])
    radii = pr.manifold_radii(real, 3, mesh=mesh, batch_size=batch_size, chunk_size=chunk_size)
    whole = ((real[:, None] - real[None]) ** 2).sum(-1)
    np.testing.assert_allclose(radii, np.sort(whole, axis=1)[:, 3], rtol=1e-5)
    got = pr.precision_recall(real, generated, 3, mesh=mesh, batch_size=batch_size,
                              chunk_size=chunk_size)
    assert got == pytest.approx(reference_precision_recall(real, generated, 3), abs=0)


def test_too_few_points_is_an_error():
    with pytest.raises(ValueError, match="N > k = 3"):
        pr.manifold_radii(np.zeros((3, 4)), 3)


@pytest.fixture(scope="module")
def fidelity_prc():
    spec = importlib.util.find_spec("torch_fidelity")
    assert spec is not None, "torch-fidelity is a test requirement (requirements-test.txt)"
    saved = {name: module for name, module in sys.modules.items()
             if name == "torch_fidelity" or name.startswith("torch_fidelity.")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    utils = types.ModuleType("torch_fidelity.utils")
    for name in ("create_feature_extractor", "extract_featuresdict_from_input_id_cached",
                 "resolve_feature_extractor", "resolve_feature_layer_for_metric"):
        setattr(utils, name, None)
    sys.modules.update({"torch_fidelity": package, "torch_fidelity.utils": utils})
    try:
        yield importlib.import_module("torch_fidelity.metric_prc")
    finally:
        for name in [n for n in sys.modules if n == "torch_fidelity"
                     or n.startswith("torch_fidelity.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.mark.parametrize("sets", [_gaussian_sets, _lattice_sets])
def test_against_torch_fidelity(fidelity_prc, sets):
    """torch-fidelity's convention: features_1 generated, features_2 real; both its variants."""
    real, generated = sets()
    ours = pr.precision_recall(real, generated, k=3)
    for variant in (fidelity_prc.calculate_precision_recall_full,
                    fidelity_prc.calculate_precision_recall_part):
        theirs = variant(torch.from_numpy(generated), torch.from_numpy(real), 3, 50)
        assert ours == pytest.approx(theirs, abs=1e-7)
    swapped = fidelity_prc.calculate_precision_recall_full(
        torch.from_numpy(real), torch.from_numpy(generated), 3, 50)
    assert swapped != pytest.approx(ours, abs=1e-7)  # negative control: the roles matter
