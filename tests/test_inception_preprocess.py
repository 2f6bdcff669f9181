"""The three Inception input conventions against independent implementations, on the same random
weights (saved with torch.save, read by our safe reader and by torch):

  tf1          torch-fidelity's FeatureExtractorInceptionV3 (resize + scaling + network, whole)
  pytorch_fid  torch F.interpolate(bilinear, align_corners=False) on x / 255, then 2x - 1
  clean        Pillow's bicubic resize of each float channel, clipped, then (x - 128) / 128

For pytorch_fid and clean the reference network is torch-fidelity's layers fed the reference
input. torch-fidelity's package __init__ imports torchvision, which does not import beside
torch 2.13.0, so its module files are loaded under a bare package registered in sys.modules.
"""
import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
from PIL import Image
from random_inception import random_inception_weights
from torch_reference import import_torch

from jax_diffusion.evaluation import inception

torch = import_torch()
F = torch.nn.functional

# Integration: Inception runs in JAX and in torch-fidelity. In `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # of the largest |reference| value
SIZES = (32, 299)
# On [-1, 1] inputs. TF1 (float32 source positions) and Pillow are reproduced to float32
# round-off; torch's CPU bilinear weights differ from the exact ones by up to 1.5e-5 when
# shrinking 320 -> 299 (a rounding of its kernel, not reproduced here): 8.6e-5 on the output.
PIXEL_TOLERANCE = {"tf1": 2e-6, "clean": 2e-6, "pytorch_fid": 1e-4}


@pytest.fixture(scope="module")
def fidelity():
    """torch_fidelity.feature_extractor_inceptionv3 and .interpolate_compat_tensorflow, imported
    without running torch_fidelity/__init__.py."""
    spec = importlib.util.find_spec("torch_fidelity")
    assert spec is not None, "torch-fidelity is a test requirement (requirements-test.txt)"
    saved = {name: module for name, module in sys.modules.items()
             if name == "torch_fidelity" or name.startswith("torch_fidelity.")}
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
    try:
        yield types.SimpleNamespace(
            extractor=importlib.import_module("torch_fidelity.feature_extractor_inceptionv3"),
            resize=importlib.import_module("torch_fidelity.interpolate_compat_tensorflow"))
    finally:
        for name in [n for n in sys.modules if n == "torch_fidelity"
                     or n.startswith("torch_fidelity.")]:
            del sys.modules[name]
        sys.modules.update(saved)


@pytest.fixture(scope="module")
def networks(fidelity, tmp_path_factory):
    """(our module, variables, torch-fidelity's extractor) on one random .pth."""
    weights = {name: torch.from_numpy(value) for name, value in random_inception_weights().items()}
    for name in list(weights):  # BatchNorm2d's counter, which torch's strict loading expects
        if name.endswith("bn.running_var"):
            weights[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    path = str(tmp_path_factory.mktemp("inception") / "random_inception.pth")
    # The legacy (pre-1.6) format, like pytorch-fid's published file.
    torch.save(weights, path, _use_new_zipfile_serialization=False)
    module, variables = inception.load_inception(path)  # read without torch
    extractor = fidelity.extractor.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=path)
    return module, variables, extractor


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(16)
    return {size: rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8) for size in SIZES}


def _nchw(images_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2)


def _torch_network(extractor, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """torch-fidelity's layers on an already preprocessed [N, 3, 299, 299] input."""
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
                 "Mixed_7c", "AvgPool"):
        x = getattr(extractor, name)(x)
    pool = torch.flatten(x, 1)
    return pool.numpy(), (pool @ extractor.fc.weight.T).numpy()


def _pytorch_fid_input(images_uint8: np.ndarray) -> torch.Tensor:
    x = _nchw(images_uint8).float() / 255.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return 2.0 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1.0


def _clean_input(images_uint8: np.ndarray) -> torch.Tensor:
    """clean-fid's resize: each channel a float ("F") Pillow image, bicubic, clipped."""
    out = np.zeros((len(images_uint8), 299, 299, 3), np.float32)
    for n, image in enumerate(images_uint8):
        for c in range(3):
            channel = Image.fromarray(image[..., min(c, image.shape[-1] - 1)].astype(np.float32))
            assert channel.mode == "F"
            resized = channel.resize((299, 299), resample=Image.Resampling.BICUBIC)
            out[n, ..., c] = np.clip(np.asarray(resized), 0, 255)
    return (torch.from_numpy(out).permute(0, 3, 1, 2) - 128.0) / 128.0


def _tf1_input(fidelity, images_uint8: np.ndarray) -> torch.Tensor:
    x = _nchw(images_uint8).float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    resized = fidelity.resize.interpolate_bilinear_2d_like_tensorflow1x(
        x, size=(299, 299), align_corners=False)
    return (resized - 128.0) / 128.0


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


# ---------------------------------------------------------------------------------------------
# The network inputs, pixel for pixel (up- and down-sampling, grey and RGB)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 320, 410, 3), (2, 17, 40, 1),
                                   (1, 299, 299, 3)])
def test_preprocessed_pixels_match_each_reference(fidelity, shape):
    images = np.random.default_rng(17).integers(0, 256, shape, dtype=np.uint8)
    references = {"tf1": _tf1_input(fidelity, images), "pytorch_fid": _pytorch_fid_input(images),
                  "clean": _clean_input(images)}
    for mode, reference in references.items():
        ours = np.asarray(inception.preprocess(images, mode)).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(ours, reference.numpy(), atol=PIXEL_TOLERANCE[mode],
                                   err_msg=mode)
    # The conventions are different functions (except that all three leave 299 x 299 alone up
    # to the scaling): the comparison above could tell them apart.
    if shape[1:3] != (299, 299):
        for a, b in (("tf1", "pytorch_fid"), ("tf1", "clean"), ("pytorch_fid", "clean")):
            assert np.max(np.abs(references[a].numpy() - references[b].numpy())) > 0.05


# ---------------------------------------------------------------------------------------------
# Pool features and logits through the whole network


def _reference(mode, fidelity, extractor, images_uint8):
    with torch.no_grad():
        if mode == "tf1":  # torch-fidelity end to end: its own resize and scaling
            pool, logits = extractor(_nchw(images_uint8))
            return pool.numpy(), logits.numpy()
        inputs = _pytorch_fid_input if mode == "pytorch_fid" else _clean_input
        return _torch_network(extractor, inputs(images_uint8))


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("mode", inception.PREPROCESS_MODES)
def test_features_match_the_reference_implementation(fidelity, networks, images, mode, size):
    module, variables, extractor = networks
    ours = inception.inception_features(module, variables, images[size], batch_size=2,
                                        preprocess=mode)
    reference = _reference(mode, fidelity, extractor, images[size])
    assert 0.05 < np.abs(reference[0]).mean() < 20  # the random network neither died nor blew up
    for name, got, want in zip(("pool", "logits"), ours, reference, strict=True):
        assert got.shape == want.shape
        assert _relative_error(got, want) <= TOLERANCE, (mode, size, name)


def test_tf1_parity_fails_with_the_half_pixel_resize(fidelity, networks, images, monkeypatch):
    """Negative control: tf1's scaling with pytorch-fid's half-pixel resize is far outside the
    tolerance of the test above, at 32 x 32 where the resize matters."""
    module, variables, extractor = networks
    reference = _reference("tf1", fidelity, extractor, images[32])
    monkeypatch.setitem(inception._RESIZE_MATRICES, "tf1",
                        inception._half_pixel_bilinear_matrix)
    x = inception.preprocess(images[32], "tf1")  # not the jitted one: it would keep the old matrix
    pool, logits = inception._network(module, variables, x)
    assert _relative_error(np.asarray(pool), reference[0]) > 100 * TOLERANCE
    assert _relative_error(np.asarray(logits), reference[1]) > 100 * TOLERANCE


def test_unknown_mode_names_the_config_key(networks, images):
    module, variables, _ = networks
    with pytest.raises(ValueError, match="config.eval.inception_preprocess='tf2'.*tf1"):
        inception.inception_features(module, variables, images[32], preprocess="tf2")


# ---------------------------------------------------------------------------------------------
# sFID's spatial features: mixed_6/conv[..., :7], from the same pass as pool features and logits


def _torch_mixed_6d(extractor, x: torch.Tensor) -> np.ndarray:
    """torch-fidelity's Mixed_6d output as NHWC numpy (its 1x1 branch leads the channels)."""
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                 "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
                 "Mixed_6b", "Mixed_6c", "Mixed_6d"):
        x = getattr(extractor, name)(x)
    return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("size", SIZES)
def test_sfid_features_match_the_reference_implementation(fidelity, networks, images, size):
    module, variables, extractor = networks
    pool, logits, spatial = inception.inception_features(module, variables, images[size],
                                                         batch_size=2, spatial=True)
    with torch.no_grad():
        mixed_6d = _torch_mixed_6d(extractor, _tf1_input(fidelity, images[size]))
    reference = mixed_6d[..., :inception.SPATIAL_CHANNELS].reshape(2, -1)  # TF's order
    assert spatial.shape == (2, 7 * 17 * 17) == reference.shape
    assert 0.05 < np.abs(reference).mean() < 20 and np.mean(reference > 0) > 0.2  # post-ReLU
    assert _relative_error(spatial, reference) <= TOLERANCE
    # The same pass gives the same pool features and logits as without the spatial output.
    plain = inception.inception_features(module, variables, images[size], batch_size=2)
    np.testing.assert_array_equal(pool, plain[0])
    np.testing.assert_array_equal(logits, plain[1])
    # Negative controls: channel-major flattening (PyTorch's order) and the next 7 channels are
    # other features, far outside the tolerance.
    channel_major = mixed_6d[..., :7].transpose(0, 3, 1, 2).reshape(2, -1)
    assert _relative_error(spatial, channel_major) > 100 * TOLERANCE
    assert _relative_error(spatial, mixed_6d[..., 7:14].reshape(2, -1)) > 100 * TOLERANCE
