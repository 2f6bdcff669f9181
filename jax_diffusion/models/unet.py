"""The diffusion U-Net (DDPM / Improved DDPM), its config validation and `create_model`.

eps (or [eps, v] with learn_sigma) = UNet(x_t, t, y): NHWC in, NHWC float32 out.
"""
from collections.abc import Sequence
from typing import Any, NoReturn

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jax_diffusion.config_checks import require
from jax_diffusion.errors import ConfigError
from jax_diffusion.models.embeddings import ConditioningEmbedding
from jax_diffusion.models.layers import (
    DOWNSAMPLE_PADDINGS,
    GROUPS,
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    conv,
    group_norm,
)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class UNet(nn.Module):
    """Encoder (ResBlocks [+ attention], downsampling) -> middle (Res, Attn, Res) -> decoder with
    skips.

    Each level of the encoder has `num_res_blocks` ResBlocks of ch * ch_mult[level] channels; the
    decoder has one more per level, each consuming one skip activation (concatenated on channels).
    Attention follows every ResBlock whose feature map is in `attention_resolutions` (pixels).

    Four conventions tell the published networks apart without changing a parameter's shape
    (see configs/default.py): the time embedding's `time_embedding_freq_shift` and
    `time_embedding_flip_sin_to_cos`, the GroupNorm `norm_eps`, and the stride-2 convolution's
    `downsample_padding`. Ho et al.'s DDPM: 1, False, 1e-6, "tf_same"; improved-diffusion:
    0, True, 1e-5, "symmetric". Both have `num_groups` = 32 GroupNorm groups; a narrow model
    wants fewer, since with one channel per group ResBlock's norm2 erases the embedding added
    per channel just before it.
    """

    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    num_heads: int = 1
    num_head_channels: int = -1
    dropout: float = 0.0
    conv_resample: bool = True
    resblock_updown: bool = False
    use_scale_shift_norm: bool = False
    learn_sigma: bool = False
    num_classes: int = 0
    dtype: str = "float32"
    remat: bool = False
    time_embedding_freq_shift: int = 0
    time_embedding_flip_sin_to_cos: bool = True
    norm_eps: float = 1e-5
    downsample_padding: str = "symmetric"
    num_groups: int = GROUPS

    @nn.compact
    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array | None = None,
                 train: bool = False) -> jax.Array:
        """x: [B, H, H, C] float; t: [B] int or float timesteps (float when the diffusion rescales
        them, config.diffusion.rescale_timesteps); y: [B] int labels, or None for the null label.

        Returns [B, H, H, C] (2C with learn_sigma) float32. train=True enables dropout
        (pass rngs={"dropout": key}).
        """
        if x.ndim != 4 or x.shape[1] != x.shape[2]:
            raise ValueError(f"x must be square NHWC images [B, H, H, C], got shape {x.shape}")
        validate_model_config(self, image_size=x.shape[1])
        dtype = DTYPES[self.dtype]
        emb = ConditioningEmbedding(self.ch, self.num_classes, self.time_embedding_freq_shift,
                                    self.time_embedding_flip_sin_to_cos, dtype, name="embed")(t, y)
        # remat: recompute each ResBlock in the backward pass; `train` (arg 3 after self, x, emb) is
        # static.
        block_cls = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

        def res(h, out_ch, name, resample="none"):
            block = block_cls(out_ch, dropout=self.dropout,
                              use_scale_shift_norm=self.use_scale_shift_norm,
                              resample=resample, dtype=dtype, norm_eps=self.norm_eps,
                              num_groups=self.num_groups, name=name)
            return block(h, emb, train)

        def attn(h, name):
            return AttentionBlock(self.num_heads, self.num_head_channels, dtype, self.norm_eps,
                                  self.num_groups, name=name)(h)

        def down(h, name):
            if self.resblock_updown:
                return res(h, h.shape[-1], name, "down")
            return Downsample(self.conv_resample, dtype, self.downsample_padding, name=name)(h)

        def up(h, name):
            if self.resblock_updown:
                return res(h, h.shape[-1], name, "up")
            return Upsample(self.conv_resample, dtype, name=name)(h)

        h = conv(self.ch, 3, dtype, "conv_in")(x.astype(dtype))
        skips = [h]
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = res(h, self.ch * mult, f"down{level}_res{i}")
                if h.shape[1] in self.attention_resolutions:
                    h = attn(h, f"down{level}_attn{i}")
                skips.append(h)
            if level != last:
                h = down(h, f"down{level}_downsample")
                skips.append(h)

        h = res(h, h.shape[-1], "mid_res0")
        h = attn(h, "mid_attn")
        h = res(h, h.shape[-1], "mid_res1")

        for level, mult in reversed(list(enumerate(self.ch_mult))):
            for i in range(self.num_res_blocks + 1):
                h = res(jnp.concatenate([h, skips.pop()], axis=-1), self.ch * mult,
                        f"up{level}_res{i}")
                if h.shape[1] in self.attention_resolutions:
                    h = attn(h, f"up{level}_attn{i}")
            if level != 0:
                h = up(h, f"up{level}_upsample")

        h = nn.silu(group_norm(h, "norm_out", dtype, self.norm_eps, num_groups=self.num_groups))
        out_channels = x.shape[-1] * (2 if self.learn_sigma else 1)
        h = conv(out_channels, 3, dtype, "conv_out", zero_init=True)(h)
        return h.astype(jnp.float32)


def _fail(key: str, value: Any, problem: str) -> NoReturn:
    raise ConfigError(f"config.model.{key}={value!r} {problem}")


def _check_heads(model_config, channels: int) -> None:
    """Attention at `channels` needs whole heads."""
    if model_config.num_head_channels > 0:
        if channels % model_config.num_head_channels:
            _fail("num_head_channels", model_config.num_head_channels,
                  f"must divide the {channels} channels of an attention layer "
                  f"(allowed: divisors of {channels}, or -1 to use num_heads)")
    elif model_config.num_heads < 1 or channels % model_config.num_heads:
        _fail("num_heads", model_config.num_heads,
              f"must be a positive divisor of the {channels} channels of an attention layer")


def _check_groups(model_config) -> None:
    """Every channel count a GroupNorm sees (ch after conv_in, ch * ch_mult[level], and the
    decoder's concatenations of them) is a multiple of ch, so ch % num_groups == 0 covers them."""
    groups, ch = model_config.num_groups, model_config.ch
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        _fail("num_groups", groups, "must be a positive integer dividing config.model.ch "
              "(GroupNorm groups): 32 as in DDPM, or fewer (e.g. 8) for a narrow model")
    if ch <= 0 or ch % groups:
        fix = f"a positive multiple of {groups} ({groups}, {2 * groups}, {3 * groups}, ...)"
        if ch > 0:  # the most groups that divide ch
            fix += f" or config.model.num_groups={max(d for d in range(1, groups) if ch % d == 0)}"
        _fail("ch", ch, f"must be divisible by config.model.num_groups={groups} (GroupNorm "
              f"groups): use {fix}")


def validate_model_config(model_config: "ml_collections.ConfigDict | UNet",
                          image_size: int | None = None) -> None:
    """Raise ConfigError naming the offending `config.model` key and what is allowed.

    Takes `config.model` or a UNet (whose fields carry the same names).
    Without `image_size` only the size-independent checks run (the middle attention's heads
    included); with it, also that the image halves cleanly at each level, that every attention
    resolution is a feature-map size the U-Net reaches, and the heads of those attention layers.
    """
    m = model_config
    _check_groups(m)
    if len(m.ch_mult) == 0 or any(int(k) != k or k < 1 for k in m.ch_mult):
        _fail("ch_mult", m.ch_mult,
              "must be a non-empty sequence of positive integers, e.g. (1, 2, 2, 2)")
    if m.num_res_blocks < 1:
        _fail("num_res_blocks", m.num_res_blocks, "must be >= 1")
    if not 0.0 <= m.dropout < 1.0:
        _fail("dropout", m.dropout, "must be in [0, 1)")
    if m.dtype not in DTYPES:
        _fail("dtype", m.dtype, f"must be one of {sorted(DTYPES)}")
    if m.num_classes < 0:
        _fail("num_classes", m.num_classes, "must be >= 0 (0 = unconditional)")
    if m.time_embedding_freq_shift not in (0, 1):
        _fail("time_embedding_freq_shift", m.time_embedding_freq_shift,
              "must be 0 (improved-diffusion) or 1 (Ho et al.'s DDPM)")
    if not isinstance(m.time_embedding_flip_sin_to_cos, bool):
        _fail("time_embedding_flip_sin_to_cos", m.time_embedding_flip_sin_to_cos,
              "must be True ([cos | sin], improved-diffusion) or False ([sin | cos], DDPM)")
    if not 0.0 < m.norm_eps < 1.0:
        _fail("norm_eps", m.norm_eps, "must be in (0, 1): 1e-6 (DDPM) or 1e-5 (improved-diffusion)")
    if m.downsample_padding not in DOWNSAMPLE_PADDINGS:
        _fail("downsample_padding", m.downsample_padding,
              f"must be one of {sorted(DOWNSAMPLE_PADDINGS)}")
    _check_heads(m, m.ch * m.ch_mult[-1])
    if image_size is None:
        return
    factor = 2 ** (len(m.ch_mult) - 1)
    if image_size % factor:
        raise ConfigError(f"config.data.image_size={image_size} must be divisible by {factor} = "
                          f"2^(len(config.model.ch_mult) - 1) for "
                          f"config.model.ch_mult={tuple(m.ch_mult)!r}")
    sizes = [image_size // 2 ** level for level in range(len(m.ch_mult))]
    for res in m.attention_resolutions:
        if res not in sizes:
            _fail("attention_resolutions", tuple(m.attention_resolutions),
                  f"contains {res}, which is not a feature-map size reached at image size "
                  f"{image_size} with ch_mult={tuple(m.ch_mult)!r}; allowed sizes: {tuple(sizes)}")
        _check_heads(m, m.ch * m.ch_mult[sizes.index(res)])


def create_model(model_config: ml_collections.ConfigDict) -> UNet:
    """The U-Net for `config.model` (validated; image-size checks run when it is first called)."""
    validate_model_config(model_config)
    m = model_config
    return UNet(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
                attention_resolutions=tuple(m.attention_resolutions), num_heads=m.num_heads,
                num_head_channels=m.num_head_channels, dropout=m.dropout,
                conv_resample=m.conv_resample,
                resblock_updown=m.resblock_updown, use_scale_shift_norm=m.use_scale_shift_norm,
                learn_sigma=m.learn_sigma, num_classes=m.num_classes, dtype=m.dtype, remat=m.remat,
                time_embedding_freq_shift=m.time_embedding_freq_shift,
                time_embedding_flip_sin_to_cos=m.time_embedding_flip_sin_to_cos,
                norm_eps=m.norm_eps, downsample_padding=m.downsample_padding,
                num_groups=m.num_groups)


def validate_model_section(config: ml_collections.ConfigDict) -> None:
    """config.model's rules, with the image size and variance type they depend on."""
    model = config.model
    validate_model_config(model, image_size=config.data.image_size)
    learned = config.diffusion.var_type == "learned_range"
    require(model.learn_sigma == learned, "model.learn_sigma", model.learn_sigma,
             f"must be {learned} with config.diffusion.var_type={config.diffusion.var_type!r} "
             f"(learned_range needs the 2C-channel output, the fixed variances a C-channel one)")
