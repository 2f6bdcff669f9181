"""U-Net building blocks, NHWC: GroupNorm (+AdaGN), resampling, the ResBlock and self-attention.

Mixed precision: parameters are float32; convolutions and matmuls run in the module's `dtype`;
GroupNorm statistics (and the AdaGN affine) are computed in float32 and cast back to `dtype`.
Every GroupNorm has `num_groups` groups, GROUPS (32) by default as in DDPM and Improved DDPM.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_diffusion.models.upsample_conv import UpsampleConv

GROUPS = 32  # the published networks' GroupNorm groups; config.model.num_groups's default
# Stride-2 downsampling convolution padding (rows and columns alike): PyTorch-style symmetric, or
# TensorFlow's "SAME" for an even input, nothing before and one pixel after (Ho et al.'s DDPM).
DOWNSAMPLE_PADDINGS = {"symmetric": (1, 1), "tf_same": (0, 1)}


def default_init() -> nn.initializers.Initializer:
    """DDPM's initialiser: variance scaling 1.0, fan_avg, uniform."""
    return nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")


def conv(features: int, kernel: int, dtype: jnp.dtype, name: str, stride: int = 1,
         zero_init: bool = False, padding: tuple[int, int] | None = None) -> nn.Conv:
    """A k x k convolution; `padding` (before, after) on both axes, by default k // 2 on each side
    (symmetric, as in the PyTorch references)."""
    pad = (kernel // 2, kernel // 2) if padding is None else padding
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=(pad, pad),
                   dtype=dtype, kernel_init=nn.initializers.zeros if zero_init else default_init(),
                   name=name)


class GroupNorm(nn.Module):
    """GroupNorm (`num_groups` groups) in float32, then optionally AdaGN's `* (1 + scale) + shift`.

    Same parameters ("scale", "bias") and the same statistics as flax's GroupNorm (the mean and
    the mean of squares, var = E[x^2] - E[x]^2), in another order: each statistic is reduced over
    H x W per channel first, with the channels contiguous, and only then averaged within each
    group. flax reshapes to [..., groups, C // groups] and reduces over an axis 4 channels wide,
    which XLA:CPU vectorises badly: this order is 2x faster in the forward pass and 2-3x in the
    gradient (docs/notes/cpu_performance.md). The normalisation, the affine and AdaGN fold into one
    per-(image, channel) scale and offset, so they cost a single pass over x.
    """

    dtype: jnp.dtype = jnp.float32
    epsilon: float = 1e-5
    num_groups: int = GROUPS

    @nn.compact
    def __call__(self, x: jax.Array, scale: jax.Array | None = None,
                 shift: jax.Array | None = None) -> jax.Array:
        """x: [B, ..., C]; scale, shift: [B, C] or None. Returns x's shape in `dtype`."""
        channels = x.shape[-1]
        if self.num_groups < 1 or channels % self.num_groups:
            raise ValueError(f"GroupNorm: {channels} channels do not split into "
                             f"num_groups={self.num_groups} equal groups")
        gamma = self.param("scale", nn.initializers.ones, (channels,), jnp.float32)
        beta = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
        x = x.astype(jnp.float32)
        spatial = tuple(range(1, x.ndim - 1))
        mean = _group_average(jnp.mean(x, axis=spatial), self.num_groups)
        mean_sq = _group_average(jnp.mean(jnp.square(x), axis=spatial), self.num_groups)
        var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)  # clamp round-off, as flax does
        mul = gamma * jax.lax.rsqrt(var + self.epsilon)
        add = jnp.broadcast_to(beta, mul.shape)
        if scale is not None:
            mul = mul * (1 + scale.astype(jnp.float32))
            add = add * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
        expand = (slice(None),) + (None,) * len(spatial) + (slice(None),)
        return ((x - mean[expand]) * mul[expand] + add[expand]).astype(self.dtype)


def _group_average(per_channel: jax.Array, groups: int) -> jax.Array:
    """[B, C] per-channel statistics -> [B, C], each channel holding its group's average."""
    batch, channels = per_channel.shape
    grouped = per_channel.reshape(batch, groups, channels // groups).mean(-1, keepdims=True)
    return jnp.broadcast_to(grouped, (batch, groups, channels // groups)).reshape(batch, channels)


def group_norm(x: jax.Array, name: str, dtype: jnp.dtype, epsilon: float,
               scale: jax.Array | None = None, shift: jax.Array | None = None,
               num_groups: int = GROUPS) -> jax.Array:
    """GroupNorm(num_groups groups) in float32; AdaGN `norm(x) * (1 + scale) + shift` when
    scale/shift ([B, C]) are given."""
    return GroupNorm(dtype, epsilon, num_groups, name=name)(x, scale, shift)


def upsample_nearest(x: jax.Array) -> jax.Array:
    """Double H and W by repeating pixels."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool2(x: jax.Array) -> jax.Array:
    """Halve H and W by 2x2 average pooling."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 convolution (conv_resample) or 2x2 average pooling.

    `padding` names the convolution's padding in DOWNSAMPLE_PADDINGS.
    """

    use_conv: bool
    dtype: jnp.dtype = jnp.float32
    padding: str = "symmetric"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return conv(x.shape[-1], 3, self.dtype, "conv", stride=2,
                        padding=DOWNSAMPLE_PADDINGS[self.padding])(x)
        return avg_pool2(x)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour, then a 3x3 convolution when conv_resample (computed as one
    sub-pixel convolution, see upsample_conv.py)."""

    use_conv: bool
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.use_conv:
            return UpsampleConv(x.shape[-1], default_init(), self.dtype, name="conv")(x)
        return upsample_nearest(x)


class ResBlock(nn.Module):
    """skip(x) + conv2(dropout(SiLU(norm2(conv1(SiLU(norm1(x))), emb)))).

    DDPM flavour: the embedding is projected to `out_ch` and added as a bias before norm2.
    `use_scale_shift_norm` (Improved DDPM's AdaGN): it is projected to 2 * out_ch = (scale, shift)
    and norm2 becomes GroupNorm(h) * (1 + scale) + shift. `resample` "up"/"down" makes it the
    BigGAN-style block that resizes both paths (without convolution) between norm1 and conv1. conv2
    is zero-initialised, so a fresh block is the identity (or its skip projection). The skip is a
    1x1 convolution (3x3 with `skip_conv3x3`) when the channel count changes.
    """

    out_ch: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resample: str = "none"  # "none" | "up" | "down"
    skip_conv3x3: bool = False
    dtype: jnp.dtype = jnp.float32
    norm_eps: float = 1e-5
    num_groups: int = GROUPS

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        g = self.num_groups
        h = nn.silu(group_norm(x, "norm1", self.dtype, self.norm_eps, num_groups=g))
        if self.resample == "up":  # conv1 of the upsampled h, computed as one sub-pixel convolution
            h = UpsampleConv(self.out_ch, default_init(), self.dtype, name="conv1")(h)
            x = upsample_nearest(x)
        else:
            if self.resample == "down":
                h, x = avg_pool2(h), avg_pool2(x)
            h = conv(self.out_ch, 3, self.dtype, "conv1")(h)

        emb_width = 2 * self.out_ch if self.use_scale_shift_norm else self.out_ch
        e = nn.Dense(emb_width, dtype=self.dtype, kernel_init=default_init(),
                     name="emb_proj")(nn.silu(emb))
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = group_norm(h, "norm2", self.dtype, self.norm_eps, scale, shift, num_groups=g)
        else:
            # With one channel per group the norm subtracts this per-channel bias again: the
            # embedding reaches the block only when num_groups < out_ch.
            h = group_norm(h + e[:, None, None, :], "norm2", self.dtype, self.norm_eps,
                           num_groups=g)
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
        h = conv(self.out_ch, 3, self.dtype, "conv2", zero_init=True)(h)

        if x.shape[-1] != self.out_ch:
            x = conv(self.out_ch, 3 if self.skip_conv3x3 else 1, self.dtype, "skip")(x)
        return x + h


class QKVProjection(nn.Module):
    """The fused q, k, v projection, with nn.Dense(3C)'s parameters ("kernel" [C, 3C], "bias"),
    applied as three matmuls with slices of the kernel: slicing q, k and v out of one [..., 3C]
    output copies each of them, and their gradients again in the backward pass."""

    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """h: [B, L, C] -> q, k, v, each [B, L, heads, C // heads]."""
        c = h.shape[-1]
        kernel = self.param("kernel", default_init(), (c, 3 * c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (3 * c,), jnp.float32)
        kernel = kernel.astype(self.dtype).reshape(c, self.heads, 3, c // self.heads)
        bias = bias.astype(self.dtype).reshape(self.heads, 3, c // self.heads)
        h = h.astype(self.dtype)
        q, k, v = (jnp.einsum("blc,chd->blhd", h, kernel[:, :, i]) + bias[:, i] for i in range(3))
        return q, k, v


class AttentionBlock(nn.Module):
    """x + proj_out(MultiHeadSelfAttention(GroupNorm(x))) over the H * W positions.

    q, k, v come from one fused 1x1 projection (3C outputs: per head [q | k | v], the layout of
    improved-diffusion; same parameter count as DDPM's separate q, k, v). Heads:
    C // num_head_channels when num_head_channels > 0, else num_heads. proj_out is zero-initialised.
    """

    num_heads: int = 1
    num_head_channels: int = -1
    dtype: jnp.dtype = jnp.float32
    norm_eps: float = 1e-5
    num_groups: int = GROUPS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        heads = c // self.num_head_channels if self.num_head_channels > 0 else self.num_heads
        h = group_norm(x, "norm", self.dtype, self.norm_eps, num_groups=self.num_groups)
        h = h.reshape(b, height * width, c)
        q, k, v = QKVProjection(heads, self.dtype, name="qkv")(h)
        # The XLA implementation is the exact math: float32 logits (scaled by 1/sqrt(head_dim)) and
        # softmax, weights cast back to dtype for the product with v.
        h = jax.nn.dot_product_attention(q, k, v, implementation="xla").reshape(b, height, width, c)
        h = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="proj_out")(h)
        return x + h
