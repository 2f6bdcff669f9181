"""Layer oracles: GroupNorm (+AdaGN), self-attention and the sub-pixel upsampling convolution
against float64 formulas written out plainly, and their parameters against flax's own layers."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_diffusion.models.layers import (
    GROUPS,
    AttentionBlock,
    GroupNorm,
    QKVProjection,
    default_init,
)
from jax_diffusion.models.upsample_conv import UpsampleConv, upsample_conv3x3

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- GroupNorm


def group_norm_oracle(x, gamma, beta, scale=None, shift=None, eps=1e-5, groups=GROUPS):
    """float64: normalise each (image, group) over its pixels and channels, then the affine, then
    AdaGN."""
    x = np.asarray(x, np.float64)
    b, c = x.shape[0], x.shape[-1]
    grouped = x.reshape(b, -1, groups, c // groups)
    mean = grouped.mean(axis=(1, 3), keepdims=True)
    var = ((grouped - mean) ** 2).mean(axis=(1, 3), keepdims=True)
    y = ((grouped - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta
    if scale is not None:
        expand = (slice(None),) + (None,) * (x.ndim - 2) + (slice(None),)
        y = y * (1 + scale[expand]) + shift[expand]
    return y


@pytest.mark.parametrize("shape, offset",
                         [((2, 6, 5, 64), 0.0), ((3, 4, 4, 128), 3.0), ((2, 7, 96), -1.5)])
@pytest.mark.parametrize("adagn", [False, True])
def test_group_norm_matches_the_formula(shape, offset, adagn):
    """Offset: activations whose mean is 3x their spread still normalise to float32 accuracy,
    although the variance is E[x^2] - E[x]^2 (flax's fast-variance form)."""
    c = shape[-1]
    x = (offset + RNG.standard_normal(shape) * RNG.uniform(0.5, 2.0, c)).astype(np.float32)
    gamma, beta = (RNG.uniform(0.5, 1.5, c).astype(np.float32),
                   RNG.standard_normal(c).astype(np.float32))
    scale = shift = None
    if adagn:
        scale, shift = ((0.3 * RNG.standard_normal((shape[0], c))).astype(np.float32),
                        RNG.standard_normal((shape[0], c)).astype(np.float32))
    out = GroupNorm().apply({"params": {"scale": gamma, "bias": beta}}, x, scale, shift)
    assert out.dtype == jnp.float32 and out.shape == shape
    np.testing.assert_allclose(out, group_norm_oracle(x, gamma, beta, scale, shift),
                               rtol=1e-5, atol=2e-5)


def test_group_norm_matches_flax_and_has_its_parameters():
    x = RNG.standard_normal((2, 8, 8, 64)).astype(np.float32)
    ours = GroupNorm().init(jax.random.key(0), x)
    theirs = nn.GroupNorm(num_groups=GROUPS, epsilon=1e-5).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, ours) == jax.tree.map(jnp.shape, theirs)
    params = {"params": {"scale": RNG.uniform(0.5, 1.5, 64).astype(np.float32),
                         "bias": RNG.standard_normal(64).astype(np.float32)}}
    np.testing.assert_allclose(GroupNorm().apply(params, x),
                               nn.GroupNorm(num_groups=GROUPS, epsilon=1e-5).apply(params, x),
                               rtol=1e-5, atol=1e-5)


def test_group_norm_normalises_each_group_separately():
    """Groups with very different scales: each comes out with mean 0 and variance 1."""
    x = RNG.standard_normal((1, 5, 5, 64)) * np.repeat(10.0 ** RNG.uniform(-1, 2, GROUPS), 2)
    out = np.asarray(GroupNorm().apply({"params": {"scale": np.ones(64), "bias": np.zeros(64)}},
                                       x.astype(np.float32)), np.float64).reshape(25, GROUPS, 2)
    np.testing.assert_allclose(out.mean(axis=(0, 2)), 0, atol=1e-5)
    # eps=1e-5 shrinks the smallest group
    np.testing.assert_allclose(out.var(axis=(0, 2)), 1, atol=2e-3)


def test_group_norm_with_8_groups_matches_flax_and_the_formula():
    """num_groups=8 on 32 channels (4 per group); channels of different scales and means, so
    normalising per channel (32 groups) gives something else: the negative control."""
    rng = np.random.default_rng(8)  # its own: the module's RNG feeds the tests below
    c = 32
    x = (rng.standard_normal(c) + rng.standard_normal((2, 6, 5, c)) * rng.uniform(0.3, 3.0, c)
         ).astype(np.float32)
    gamma, beta = (rng.uniform(0.5, 1.5, c).astype(np.float32),
                   rng.standard_normal(c).astype(np.float32))
    params = {"params": {"scale": gamma, "bias": beta}}
    ours = GroupNorm(num_groups=8).apply(params, x)
    np.testing.assert_allclose(ours, nn.GroupNorm(num_groups=8, epsilon=1e-5).apply(params, x),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, group_norm_oracle(x, gamma, beta, groups=8),
                               rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(GroupNorm().apply(params, x)) - np.asarray(ours)).max() > 0.1


@pytest.mark.parametrize("groups, erased", [(32, True), (8, False)])
def test_a_per_channel_bias_survives_group_norm_only_with_several_channels_per_group(groups,
                                                                                       erased):
    """What DDPM's ResBlock does with its embedding: a per-(image, channel) bias added before
    norm2. With one channel per group (32 groups of 32 channels) the mean subtracts it again."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 5, 5, 32)).astype(np.float32)
    bias = rng.standard_normal((2, 1, 1, 32)).astype(np.float32)
    norm = GroupNorm(num_groups=groups)
    params = norm.init(jax.random.key(0), x)
    diff = np.abs(np.asarray(norm.apply(params, x + bias)) - np.asarray(norm.apply(params, x)))
    assert (diff.max() < 1e-4) if erased else (diff.max() > 0.1), diff.max()


def test_group_norm_refuses_channels_that_do_not_split_into_its_groups():
    with pytest.raises(ValueError, match="24 channels do not split into num_groups=16"):
        GroupNorm(num_groups=16).init(jax.random.key(0), np.zeros((1, 2, 2, 24), np.float32))


# ---------------------------------------------------------------- attention


def attention_oracle(x, p, heads):
    """float64: x + proj_out(softmax(q k^T / sqrt(d)) v), with q, k, v per head laid out [q | k | v]
    in the qkv projection's 3C outputs (improved-diffusion's layout)."""
    b, hh, ww, c = x.shape
    h = group_norm_oracle(x, p["norm"]["scale"], p["norm"]["bias"]).reshape(b, hh * ww, c)
    qkv = (h @ p["qkv"]["kernel"] + p["qkv"]["bias"]).reshape(b, hh * ww, heads, 3, c // heads)
    q, k, v = (qkv[:, :, :, i].transpose(0, 2, 1, 3) for i in range(3))  # [B, heads, L, d]
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(c // heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = (weights @ v).transpose(0, 2, 1, 3).reshape(b, hh, ww, c)
    return x + out @ p["proj_out"]["kernel"] + p["proj_out"]["bias"]


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_block_matches_the_formula(heads):
    x = RNG.standard_normal((2, 4, 3, 64)).astype(np.float32)
    block = AttentionBlock(num_heads=heads)
    shapes = jax.eval_shape(block.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: (RNG.standard_normal(s.shape)
                                     / np.sqrt(s.shape[0])).astype(np.float32), shapes)
    assert params["qkv"]["kernel"].shape == (64, 192)  # nn.Dense(3C)'s parameters
    out = jax.jit(block.apply)({"params": params}, x)
    reference = attention_oracle(np.asarray(x, np.float64),
                                 jax.tree.map(lambda a: np.asarray(a, np.float64), params), heads)
    np.testing.assert_allclose(out, reference, rtol=1e-4, atol=1e-4)
    assert float(np.abs(reference - x).max()) > 0.5  # the attention branch is not negligible


def test_qkv_projection_has_the_parameters_of_nn_dense():
    """Same names, shapes and initial values as nn.Dense(3C), so checkpoints carry over; the outputs
    are the [q | k | v] slices of each head's part of nn.Dense's output."""
    h = RNG.standard_normal((2, 5, 64)).astype(np.float32)
    ours = QKVProjection(heads=4).init(jax.random.key(5), h)
    dense = nn.Dense(192, kernel_init=default_init())
    theirs = dense.init(jax.random.key(5), h)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda leaf: RNG.standard_normal(leaf.shape).astype(np.float32), ours)
    fused = dense.apply(params, h).reshape(2, 5, 4, 3, 16)
    for i, part in enumerate(QKVProjection(heads=4).apply(params, h)):
        np.testing.assert_allclose(part, fused[:, :, :, i], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- upsampling convolution


def upsample_conv_oracle(x, kernel):
    """float64: repeat every pixel 2x2, zero-pad by 1, and sum the 3x3 window's taps."""
    up = np.repeat(np.repeat(np.asarray(x, np.float64), 2, axis=1), 2, axis=2)
    padded = np.pad(up, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = up.shape[1:3]
    return sum(padded[:, i:i + h, j:j + w] @ np.asarray(kernel, np.float64)[i, j]
               for i in range(3) for j in range(3))


@pytest.mark.parametrize("shape, c_out", [((2, 3, 5, 4), 6), ((1, 1, 1, 3), 2), ((2, 4, 4, 8), 8)])
def test_upsample_conv_equals_the_convolution_of_the_upsampled_map(shape, c_out):
    x = RNG.standard_normal(shape).astype(np.float32)
    kernel = RNG.standard_normal((3, 3, shape[-1], c_out)).astype(np.float32)
    out = jax.jit(upsample_conv3x3)(x, kernel)
    assert out.shape == (shape[0], 2 * shape[1], 2 * shape[2], c_out)
    np.testing.assert_allclose(out, upsample_conv_oracle(x, kernel), rtol=1e-5, atol=1e-5)


def test_upsample_conv_gradients_equal_those_of_the_plain_form():
    x = RNG.standard_normal((2, 4, 4, 8)).astype(np.float32)
    kernel = RNG.standard_normal((3, 3, 8, 5)).astype(np.float32)
    cotangent = RNG.standard_normal((2, 8, 8, 5)).astype(np.float32)

    def plain(x, kernel):
        up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    grads = [jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) * cotangent),
                              argnums=(0, 1)))(x, kernel)
             for f in (upsample_conv3x3, plain)]
    for ours, reference in zip(*grads, strict=True):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4)
        assert float(jnp.abs(reference).max()) > 1.0


def test_upsample_conv_has_the_parameters_of_nn_conv():
    """Same names, shapes and initial values as the nn.Conv it replaces, so checkpoints carry
    over."""
    x = jnp.zeros((1, 4, 4, 8))
    ours = UpsampleConv(16, default_init()).init(jax.random.key(3), x)
    theirs = nn.Conv(16, (3, 3), padding=1,
                     kernel_init=default_init()).init(jax.random.key(3), jnp.zeros((1, 8, 8, 8)))
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(a, b)
    params = jax.tree.map(lambda leaf: RNG.standard_normal(leaf.shape).astype(np.float32), ours)
    up = jnp.repeat(jnp.repeat(RNG.standard_normal((1, 4, 4, 8)).astype(np.float32), 2, axis=1),
                    2, axis=2)
    np.testing.assert_allclose(UpsampleConv(16, default_init()).apply(params, up[:, ::2, ::2]),
                               nn.Conv(16, (3, 3), padding=1).apply(params, up),
                               rtol=1e-5, atol=1e-5)
