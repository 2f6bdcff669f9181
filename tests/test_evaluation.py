"""FID / IS / KID against closed forms, the Flax FID Inception-v3 against an independent numpy
implementation of the same graph, and the errors for bad weight and samples files."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from numpy.lib.stride_tricks import sliding_window_view

from jax_diffusion.evaluation import (InceptionWeightsNotFoundError, expected_weight_shapes,
                                      frechet_distance, inception_features, inception_score,
                                      kernel_inception_distance, load_inception, preprocess,
                                      read_samples)
from jax_diffusion.evaluation import digits as digits_metrics
from jax_diffusion.runtime.parallel import create_mesh
from random_inception import random_inception_weights

# ---------------------------------------------------------------------------------------------
# FID


def _random_orthogonal(rng, dim):
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def test_frechet_distance_closed_form_for_diagonal_and_commuting_covariances():
    rng = np.random.default_rng(0)
    dim = 6
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    a, b = rng.uniform(0.1, 3.0, dim), rng.uniform(0.1, 3.0, dim)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(closed, abs=1e-6)
    # Same eigenvectors, so S1 S2 = Q diag(a b) Q^T and the closed form is unchanged.
    q = _random_orthogonal(rng, dim)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(closed, abs=1e-6)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
    assert frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    rng = np.random.default_rng(1)
    dim = 10
    x, y = rng.normal(size=(dim, 2 * dim)), rng.normal(size=(dim, 3 * dim))
    s1, s2 = x @ x.T / dim, y @ y.T / dim
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    root = scipy.linalg.sqrtm(s1 @ s2)
    assert np.max(np.abs(np.imag(root))) < 1e-8
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2.0 * np.real(root))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("num", [2000, 40])  # 40 < 64: a singular covariance
def test_frechet_distance_of_a_set_to_itself_is_zero(num):
    features = np.random.default_rng(2).normal(size=(num, 64)) * np.linspace(0.1, 5.0, 64)
    mu, sigma = features.mean(0), np.cov(features, rowvar=False)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_is_float64_for_float32_jax_inputs():
    rng = np.random.default_rng(3)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4) * 1e3  # large means: float32 would round
    s1, s2 = np.diag(rng.uniform(1, 2, 4)), np.diag(rng.uniform(1, 2, 4))
    args32 = [jnp.asarray(v, jnp.float32) for v in (mu1, s1, mu2, s2)]
    expected = frechet_distance(*[np.asarray(v, np.float64) for v in args32])
    result = frechet_distance(*args32)
    assert type(result) is float and result == expected


def test_frechet_distance_estimate_converges_with_sample_size():
    rng = np.random.default_rng(4)
    dim = 8
    mu1, mu2 = np.zeros(dim), np.full(dim, 0.5)
    a, b = np.linspace(0.5, 2.0, dim), np.linspace(2.0, 0.5, dim)
    q = _random_orthogonal(rng, dim)
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    exact = frechet_distance(mu1, s1, mu2, s2)
    rms_errors = []
    for num in (1000, 10000, 100000):
        errors = []
        for _ in range(6):
            x = rng.multivariate_normal(mu1, s1, size=num)
            y = rng.multivariate_normal(mu2, s2, size=num)
            errors.append(frechet_distance(x.mean(0), np.cov(x, rowvar=False),
                                           y.mean(0), np.cov(y, rowvar=False)) - exact)
        rms_errors.append(np.sqrt(np.mean(np.square(errors))))
    # The error falls like 1/sqrt(N) (first-order noise in the means and covariances): ~10x here.
    assert rms_errors[0] > rms_errors[1] > rms_errors[2]
    assert rms_errors[2] < rms_errors[0] / 4 and rms_errors[2] < 0.01 * exact


def test_digits_metrics_uses_this_frechet_distance():
    assert digits_metrics.frechet_distance is frechet_distance


# ---------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_uniform_logits_give_one():
    mean, std = inception_score(np.zeros((1000, 1008)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_confident_even_predictions_give_num_classes():
    num_classes = 10
    labels = np.arange(2000) % num_classes  # every split of 200 holds each class 20 times
    logits = 50.0 * np.eye(num_classes)[labels]
    mean, std = inception_score(logits, splits=10)
    assert mean == pytest.approx(num_classes, rel=1e-9) and std < 1e-9


def test_inception_score_splits_are_contiguous():
    # First half all class 0, second half all class 1: each contiguous half scores exactly 1,
    # the whole set 2; interleaved splits would have scored 2 each.
    logits = 50.0 * np.eye(2)[np.repeat([0, 1], 500)]
    assert inception_score(logits, splits=2) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert inception_score(logits, splits=1)[0] == pytest.approx(2.0, rel=1e-9)
    # Uneven split sizes follow i * N // splits: 1001 rows in 2 splits are 500 + 501.
    logits = 50.0 * np.eye(2)[np.repeat([0, 1], [500, 501])]
    assert inception_score(logits, splits=2) == pytest.approx((1.0, 0.0), abs=1e-9)


def test_inception_score_matches_direct_kl_formula():
    logits = np.random.default_rng(5).normal(size=(300, 7)) * 3.0
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.array_split(p, 3):  # 300 rows: the same parts as i * N // 3
        py = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))))
    assert inception_score(logits, splits=3) == pytest.approx((np.mean(scores), np.std(scores)),
                                                              rel=1e-10)


# ---------------------------------------------------------------------------------------------
# KID


def _unbiased_mmd2_loops(x, y):
    """Direct sums over index pairs, the definition of the unbiased estimator."""
    d, m = x.shape[1], len(x)
    k = lambda u, v: (u @ v / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j)
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    return xx / (m * (m - 1)) + yy / (m * (m - 1)) - 2.0 * xy / m ** 2


def test_kid_matches_the_definition_and_clips_the_subset_size():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(30, 5)), rng.normal(0.3, 1.2, size=(30, 5))
    # subset_size > N: every subset is a permutation of all rows, so each estimate is the same.
    mean, std = kernel_inception_distance(x, y, num_subsets=3, subset_size=1000)
    assert mean == pytest.approx(_unbiased_mmd2_loops(x, y), rel=1e-10) and std < 1e-12


def test_kid_is_unbiased_for_one_distribution_and_for_a_known_shift():
    rng = np.random.default_rng(7)
    pool = 100000
    # Same distribution: the population MMD^2 is 0.
    x, y = rng.normal(size=(pool, 16)), rng.normal(size=(pool, 16))
    mean, std = kernel_inception_distance(x, y, num_subsets=300, subset_size=100)
    stderr = std / np.sqrt(300)
    assert abs(mean) < 4 * stderr
    # The V-statistic (diagonal kept) is biased upwards by many standard errors: the check
    # has power.
    biased = np.mean([((a @ a.T / 16 + 1) ** 3).mean() + ((b @ b.T / 16 + 1) ** 3).mean()
                      - 2 * ((a @ b.T / 16 + 1) ** 3).mean()
                      for a, b in zip(np.split(x[:30000], 300), np.split(y[:30000], 300),
                                      strict=True)])
    assert biased > 20 * stderr
    # 1-D N(0,1) vs N(m,1): k(x,y) = (xy+1)^3 has features (x^3, sqrt3 x^2, sqrt3 x, 1), so
    # MMD^2 = (E x^3 - E y^3)^2 + 3 (E x^2 - E y^2)^2 + 3 (E x - E y)^2
    #       = (m^3 + 3m)^2 + 3 m^4 + 3 m^2.
    m = 0.5
    exact = (m ** 3 + 3 * m) ** 2 + 3 * m ** 4 + 3 * m ** 2
    mean, std = kernel_inception_distance(rng.normal(size=(pool, 1)),
                                          rng.normal(m, 1, (pool, 1)),
                                          num_subsets=300, subset_size=300)
    assert abs(mean - exact) < 4 * std / np.sqrt(300)


# ---------------------------------------------------------------------------------------------
# Inception port vs an independent numpy implementation of pytorch-fid's graph (NCHW, PyTorch
# weight layouts, float64, im2col convolutions), written from the pytorch-fid/torchvision source.


def _np_conv_bn_relu(w, name, x, stride=1, pad=(0, 0)):
    kernel = w[name + ".conv.weight"]
    x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[0]), (pad[1], pad[1])))
    windows = sliding_window_view(x, kernel.shape[2:], axis=(2, 3))[:, :, ::stride, ::stride]
    y = np.tensordot(windows, kernel, axes=([1, 4, 5], [1, 2, 3])).transpose(0, 3, 1, 2)
    bn = lambda k: w[f"{name}.bn.{k}"][None, :, None, None]  # noqa: E731
    y = (y - bn("running_mean")) / np.sqrt(bn("running_var") + 1e-3) * bn("weight") + bn("bias")
    return np.maximum(y, 0.0)


def _np_max_pool(x, stride, pad):
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), constant_values=-np.inf)
    return sliding_window_view(x, (3, 3), axis=(2, 3))[:, :, ::stride, ::stride].max(axis=(4, 5))


def _np_avg_pool_excluding_padding(x):
    pad = ((0, 0), (0, 0), (1, 1), (1, 1))
    sums = sliding_window_view(np.pad(x, pad), (3, 3), axis=(2, 3)).sum(axis=(4, 5))
    counts = sliding_window_view(np.pad(np.ones(x.shape[2:]), 1), (3, 3)).sum(axis=(2, 3))
    return sums / counts


def _np_fid_inception(w, x):
    """x [N, 3, 299, 299] in [-1, 1] -> (pool [N, 2048], fc without bias [N, 1008])."""
    c = lambda name, inp, **kw: _np_conv_bn_relu(w, name, inp, **kw)  # noqa: E731
    cat = lambda *xs: np.concatenate(xs, axis=1)  # noqa: E731
    x = c("Conv2d_1a_3x3", x, stride=2)
    x = c("Conv2d_2a_3x3", x)
    x = _np_max_pool(c("Conv2d_2b_3x3", x, pad=(1, 1)), 2, 0)
    x = c("Conv2d_3b_1x1", x)
    x = _np_max_pool(c("Conv2d_4a_3x3", x), 2, 0)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = cat(c(f"{m}.branch1x1", x),
                c(f"{m}.branch5x5_2", c(f"{m}.branch5x5_1", x), pad=(2, 2)),
                c(f"{m}.branch3x3dbl_3", c(f"{m}.branch3x3dbl_2", c(f"{m}.branch3x3dbl_1", x),
                                           pad=(1, 1)), pad=(1, 1)),
                c(f"{m}.branch_pool", _np_avg_pool_excluding_padding(x)))
    m = "Mixed_6a"
    x = cat(c(f"{m}.branch3x3", x, stride=2),
            c(f"{m}.branch3x3dbl_3", c(f"{m}.branch3x3dbl_2", c(f"{m}.branch3x3dbl_1", x),
                                       pad=(1, 1)), stride=2),
            _np_max_pool(x, 2, 0))
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        b7 = c(f"{m}.branch7x7_1", x)
        b7 = c(f"{m}.branch7x7_3", c(f"{m}.branch7x7_2", b7, pad=(0, 3)), pad=(3, 0))
        bd = c(f"{m}.branch7x7dbl_1", x)
        for i, p in zip((2, 3, 4, 5), ((3, 0), (0, 3), (3, 0), (0, 3)), strict=True):
            bd = c(f"{m}.branch7x7dbl_{i}", bd, pad=p)
        x = cat(c(f"{m}.branch1x1", x), b7, bd,
                c(f"{m}.branch_pool", _np_avg_pool_excluding_padding(x)))
    m = "Mixed_7a"
    b7 = c(f"{m}.branch7x7x3_3", c(f"{m}.branch7x7x3_2", c(f"{m}.branch7x7x3_1", x),
                                   pad=(0, 3)), pad=(3, 0))
    x = cat(c(f"{m}.branch3x3_2", c(f"{m}.branch3x3_1", x), stride=2),
            c(f"{m}.branch7x7x3_4", b7, stride=2), _np_max_pool(x, 2, 0))
    for m, pooled in (("Mixed_7b", _np_avg_pool_excluding_padding),
                      ("Mixed_7c", lambda t: _np_max_pool(t, 1, 1))):  # FIDInceptionE_2: max
        b3 = c(f"{m}.branch3x3_1", x)
        bd = c(f"{m}.branch3x3dbl_2", c(f"{m}.branch3x3dbl_1", x), pad=(1, 1))
        x = cat(c(f"{m}.branch1x1", x),
                c(f"{m}.branch3x3_2a", b3, pad=(0, 1)), c(f"{m}.branch3x3_2b", b3, pad=(1, 0)),
                c(f"{m}.branch3x3dbl_3a", bd, pad=(0, 1)),
                c(f"{m}.branch3x3dbl_3b", bd, pad=(1, 0)),
                c(f"{m}.branch_pool", pooled(x)))
    pool = x.mean(axis=(2, 3))
    return pool, pool @ w["fc.weight"].T


def _np_resize_bilinear(x, out):
    """PyTorch F.interpolate(mode="bilinear", align_corners=False) on [N, C, H, W]."""
    for axis in (2, 3):
        size = x.shape[axis]
        src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), size - 1)
        hi = np.minimum(lo + 1, size - 1)
        frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(4)])
        x = np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac
    return x


def _np_preprocess(images_uint8):
    x = images_uint8.astype(np.float64).transpose(0, 3, 1, 2) / 255.0
    if x.shape[1] == 1:
        x = np.repeat(x, 3, axis=1)
    return 2.0 * _np_resize_bilinear(x, 299) - 1.0


@pytest.fixture(scope="module")
def random_weights():
    return random_inception_weights()


def test_expected_weights_are_the_pytorch_fid_state_dict():
    shapes = expected_weight_shapes()
    assert len(shapes) == 472  # 94 BasicConv2d x 5 tensors + fc weight and bias
    assert sum(int(np.prod(s)) for s in shapes.values()) == 23885392
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7_2.conv.weight"] == (128, 128, 1, 7)
    assert shapes["Mixed_7c.branch_pool.conv.weight"] == (192, 2048, 1, 1)
    assert shapes["fc.weight"] == (1008, 2048) and shapes["fc.bias"] == (1008,)


def test_preprocess_matches_pytorch_bilinear_resize():
    rng = np.random.default_rng(9)
    for shape in [(1, 320, 410, 1), (2, 17, 40, 3)]:  # down- and up-sampling, grey and RGB
        images = rng.integers(0, 256, shape, dtype=np.uint8)
        ours = np.asarray(preprocess(images, "pytorch_fid")).transpose(0, 3, 1, 2)
        np.testing.assert_allclose(ours, _np_preprocess(images), atol=2e-6)


@pytest.mark.slow  # the whole network twice
def test_flax_inception_matches_independent_numpy_graph(random_weights, tmp_path):
    path = tmp_path / "fid_inception.npz"
    np.savez(path, **random_weights)
    module, variables = load_inception(str(path))
    images = np.random.default_rng(10).integers(0, 256, (3, 29, 37, 3), dtype=np.uint8)
    pool, logits = inception_features(module, variables, images, batch_size=2,  # padded batch
                                      preprocess="pytorch_fid")
    reference_weights = {k: v.astype(np.float64) for k, v in random_weights.items()}
    ref_pool, ref_logits = _np_fid_inception(reference_weights, _np_preprocess(images))
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert 0.05 < np.abs(ref_pool).mean() < 20  # the random network neither died nor blew up
    for ours, ref in ((pool, ref_pool), (logits, ref_logits)):
        assert np.max(np.abs(ours - ref)) <= 1e-4 * np.max(np.abs(ref))
    # The logits leave out fc.bias (torch-fidelity's logits_unbiased).
    assert np.max(np.abs(logits - ref_logits - random_weights["fc.bias"])) > 1e-2
    # Split over the 8 (forced CPU) devices: the same numbers.
    sharded = inception_features(module, variables, images, batch_size=2, mesh=create_mesh(),
                                 preprocess="pytorch_fid")
    for ours, split in zip((pool, logits), sharded, strict=True):
        np.testing.assert_allclose(split, ours, rtol=1e-5, atol=1e-5 * np.max(np.abs(ours)))


# ---------------------------------------------------------------------------------------------
# Errors that name the file


def test_missing_weights_say_which_file_to_get_and_where_to_put_it(tmp_path):
    path = str(tmp_path / "nowhere" / "pt_inception.pth")
    with pytest.raises(InceptionWeightsNotFoundError) as error:
        load_inception(path)
    assert isinstance(error.value, FileNotFoundError)
    message = str(error.value)
    assert path in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert "config.eval.inception_weights" in message


def test_weights_of_a_wrong_shape_or_name_are_refused(random_weights, tmp_path):
    bad = dict(random_weights)
    bad["Mixed_6b.branch7x7_2.conv.weight"] = np.zeros((128, 128, 7, 1), np.float32)
    path = str(tmp_path / "transposed.npz")
    np.savez(path, **bad)
    with pytest.raises(ValueError, match="Mixed_6b.branch7x7_2.conv.weight") as error:
        load_inception(path)
    assert path in str(error.value) and "(128, 128, 1, 7)" in str(error.value)

    bad = {k: v for k, v in random_weights.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    bad["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)  # torchvision's, not FID's
    path = str(tmp_path / "torchvision_inception.npz")
    np.savez(path, **bad)
    with pytest.raises(ValueError, match="Mixed_7c.branch_pool.bn.running_var") as error:
        load_inception(path)
    assert path in str(error.value) and "AuxLogits.fc.weight" in str(error.value)


def test_read_samples_returns_images_and_labels(tmp_path):
    images = np.random.default_rng(11).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    path = str(tmp_path / "samples_0.npz")
    np.savez(path, images=images, labels=np.arange(5, dtype=np.int32))
    got_images, got_labels = read_samples(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, np.arange(5))


@pytest.mark.parametrize("contents, match", [
    ({"images": np.zeros((4, 8, 8, 3), np.float32) - 1.0}, r"uint8.*float32.*\[-1\.0, -1\.0\]"),
    ({"images": np.zeros((4, 8, 8), np.uint8)}, r"\[N, H, W, C\]"),
    ({"images": np.zeros((4, 8, 8, 1), np.uint8), "labels": np.zeros(3, np.int32)}, "labels"),
    ({"samples": np.zeros((4, 8, 8, 3), np.uint8)}, "no 'images'"),
])
def test_bad_samples_files_are_refused_naming_the_file(tmp_path, contents, match):
    path = str(tmp_path / "samples_0.npz")
    np.savez(path, **contents)
    with pytest.raises(ValueError, match=match) as error:
        read_samples(path)
    assert path in str(error.value)


def test_missing_samples_file(tmp_path):
    path = str(tmp_path / "samples_0.npz")
    with pytest.raises(FileNotFoundError, match=os.path.basename(path)):
        read_samples(path)


def test_convert_weights_writes_an_npz_that_loads(random_weights, tmp_path):
    """The converter keeps every parameter, drops BatchNorm's step counters, and its output
    passes load_inception's name and shape checks."""
    from jax_diffusion.evaluation import convert_weights
    source, target = str(tmp_path / "in.npz"), str(tmp_path / "out.npz")
    np.savez(source, **random_weights, **{"Mixed_5b.branch1x1.bn.num_batches_tracked": np.int64(7)})
    assert convert_weights.main([source, target]) == 0
    with np.load(target) as converted:
        assert set(converted.files) == set(random_weights)
        np.testing.assert_array_equal(converted["fc.weight"], random_weights["fc.weight"])


@pytest.mark.slow  # writes and converts the whole network's weights
def test_convert_weights_reads_a_pth_without_torch(random_weights, tmp_path, capsys):
    """A .pth written by torch.save converts in a process where `import torch` fails."""
    import subprocess
    import sys

    import torch

    from jax_diffusion.evaluation import convert_weights
    source, target = str(tmp_path / "in.pth"), str(tmp_path / "out.npz")
    torch.save({name: torch.from_numpy(value) for name, value in random_weights.items()}, source)
    script = ("import sys; sys.modules['torch'] = None\n"
              "from jax_diffusion.evaluation import convert_weights\n"
              "sys.exit(convert_weights.main(sys.argv[1:]))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script, source, target], cwd=root,
                          env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with np.load(target) as converted:
        np.testing.assert_array_equal(converted["Mixed_6b.branch7x7_2.conv.weight"],
                                      random_weights["Mixed_6b.branch7x7_2.conv.weight"])
    with pytest.raises(SystemExit) as exit_code:
        convert_weights.main(["--help"])
    assert exit_code.value.code == 0 and "source" in capsys.readouterr().out
