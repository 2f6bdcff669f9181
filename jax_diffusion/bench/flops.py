"""Analytic FLOP count of the U-Net (models/unet.py), per image; a multiply-add counts as 2 FLOPs.

Counts convolutions, dense layers and the two attention matmuls, which are >98% of the work; the
elementwise ops (GroupNorm, SiLU, residual adds, softmax) are left out. Convolutions are counted
dense (all k x k taps, as the hardware computes them); XLA's cost analysis skips the taps that
fall on zero padding, so it reports ~6.5% less for the 32x32 CIFAR-10 models.

The nominal count is the architecture's, as published (DDPM CIFAR-10: 12.4 GFLOPs): each upsampling
convolution is a 3x3 convolution of the upsampled map. The model computes those as sub-pixel
convolutions of the map before upsampling (models/upsample_conv.py), 4/9 of the multiply-adds;
`as_computed=True` counts them that way, which is what XLA's cost analysis sees. MFU uses the
nominal count, the usual "model FLOPs" convention, so on the DDPM model it credits the 7% saved.
"""
import ml_collections


def _conv(pixels: int, kernel: int, c_in: int, c_out: int) -> int:
    return 2 * pixels * kernel * kernel * c_in * c_out


def _upsample_conv(pixels_out: int, c_in: int, c_out: int, as_computed: bool) -> int:
    """3x3 convolution of a 2x upsampled map: 9 taps per output pixel nominally, 4 as computed."""
    return _conv(pixels_out, 2 if as_computed else 3, c_in, c_out)


def _res_block(pixels_out: int, c_in: int, c_out: int, emb_dim: int, scale_shift: bool,
               upsample_conv1: bool = False, as_computed: bool = False) -> int:
    conv1 = (_upsample_conv(pixels_out, c_in, c_out, as_computed) if upsample_conv1
             else _conv(pixels_out, 3, c_in, c_out))
    flops = conv1 + _conv(pixels_out, 3, c_out, c_out)
    flops += 2 * emb_dim * c_out * (2 if scale_shift else 1)  # embedding projection
    if c_in != c_out:
        flops += _conv(pixels_out, 1, c_in, c_out)  # skip projection
    return flops


def _attention(pixels: int, c: int) -> int:
    # qkv and proj_out projections, then q k^T and softmax(.) v, each [pixels x pixels x c].
    return _conv(pixels, 1, c, 3 * c) + _conv(pixels, 1, c, c) + 2 * (2 * pixels * pixels * c)


def unet_forward_flops(model_config: ml_collections.ConfigDict, image_size: int, channels: int,
                       as_computed: bool = False) -> int:
    """Forward FLOPs for one image of size image_size x image_size x channels: the nominal count, or
    with as_computed=True the count of the sub-pixel upsampling convolutions the model runs."""
    m = model_config
    emb_dim = 4 * m.ch
    out_channels = channels * (2 if m.learn_sigma else 1)

    def res(pixels, c_in, c_out, upsample_conv1=False):
        return _res_block(pixels, c_in, c_out, emb_dim, m.use_scale_shift_norm, upsample_conv1,
                          as_computed)

    def attn(size, c):
        return _attention(size * size, c) if size in m.attention_resolutions else 0

    def downsample(size_out, c):
        if m.resblock_updown:
            return res(size_out * size_out, c, c)
        return _conv(size_out * size_out, 3, c, c) if m.conv_resample else 0

    def upsample(size_out, c):
        if m.resblock_updown:
            return res(size_out * size_out, c, c, upsample_conv1=True)
        return _upsample_conv(size_out * size_out, c, c, as_computed) if m.conv_resample else 0

    flops = 2 * (m.ch * emb_dim + emb_dim * emb_dim)  # time MLP
    size, c = image_size, m.ch
    flops += _conv(size * size, 3, channels, c)  # conv_in
    skip_channels = [c]
    last = len(m.ch_mult) - 1
    for level, mult in enumerate(m.ch_mult):
        for _ in range(m.num_res_blocks):
            flops += res(size * size, c, m.ch * mult) + attn(size, m.ch * mult)
            c = m.ch * mult
            skip_channels.append(c)
        if level != last:
            size //= 2
            flops += downsample(size, c)
            skip_channels.append(c)

    flops += 2 * res(size * size, c, c) + _attention(size * size, c)  # middle

    for level, mult in reversed(list(enumerate(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            flops += (res(size * size, c + skip_channels.pop(), m.ch * mult)
                      + attn(size, m.ch * mult))
            c = m.ch * mult
        if level != 0:
            size *= 2
            flops += upsample(size, c)

    return flops + _conv(size * size, 3, c, out_channels)  # conv_out


def train_flops_per_image(model_config: ml_collections.ConfigDict, image_size: int, channels: int,
                          as_computed: bool = False) -> int:
    """Training FLOPs per image: forward + backward ~= 3 x forward (the backward pass does two
    matmuls per forward one)."""
    return 3 * unet_forward_flops(model_config, image_size, channels, as_computed)
