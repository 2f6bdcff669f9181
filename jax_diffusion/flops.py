"""Analytic FLOP count of the U-Net (models/unet.py), per image; a multiply-add counts as 2 FLOPs.

Counts convolutions, dense layers and the two attention matmuls, which are >98% of the work; the
elementwise ops (GroupNorm, SiLU, residual adds, softmax) are left out. Convolutions are counted dense
(all k x k taps, as the hardware computes them); XLA's cost analysis skips the taps that fall on zero
padding, so it reports ~6.5% less for the 32x32 CIFAR-10 models. Used for MFU in benchmarks.
"""
import ml_collections


def _conv(pixels: int, kernel: int, c_in: int, c_out: int) -> int:
    return 2 * pixels * kernel * kernel * c_in * c_out


def _res_block(pixels_out: int, c_in: int, c_out: int, emb_dim: int, scale_shift: bool) -> int:
    flops = _conv(pixels_out, 3, c_in, c_out) + _conv(pixels_out, 3, c_out, c_out)
    flops += 2 * emb_dim * c_out * (2 if scale_shift else 1)  # embedding projection
    if c_in != c_out:
        flops += _conv(pixels_out, 1, c_in, c_out)  # skip projection
    return flops


def _attention(pixels: int, c: int) -> int:
    # qkv and proj_out projections, then q k^T and softmax(.) v, each [pixels x pixels x c].
    return _conv(pixels, 1, c, 3 * c) + _conv(pixels, 1, c, c) + 2 * (2 * pixels * pixels * c)


def unet_forward_flops(model_config: ml_collections.ConfigDict, image_size: int, channels: int) -> int:
    """Forward FLOPs for one image of size image_size x image_size x channels."""
    m = model_config
    emb_dim = 4 * m.ch
    out_channels = channels * (2 if m.learn_sigma else 1)

    def res(pixels, c_in, c_out):
        return _res_block(pixels, c_in, c_out, emb_dim, m.use_scale_shift_norm)

    def attn(size, c):
        return _attention(size * size, c) if size in m.attention_resolutions else 0

    def resample(size_out, c):
        if m.resblock_updown:
            return res(size_out * size_out, c, c)
        return _conv(size_out * size_out, 3, c, c) if m.conv_resample else 0

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
            flops += resample(size, c)
            skip_channels.append(c)

    flops += 2 * res(size * size, c, c) + _attention(size * size, c)  # middle

    for level, mult in reversed(list(enumerate(m.ch_mult))):
        for _ in range(m.num_res_blocks + 1):
            flops += res(size * size, c + skip_channels.pop(), m.ch * mult) + attn(size, m.ch * mult)
            c = m.ch * mult
        if level != 0:
            size *= 2
            flops += resample(size, c)

    return flops + _conv(size * size, 3, c, out_channels)  # conv_out


def train_flops_per_image(model_config: ml_collections.ConfigDict, image_size: int, channels: int) -> int:
    """Training FLOPs per image: forward + backward ~= 3 x forward (backward = two matmuls per forward one)."""
    return 3 * unet_forward_flops(model_config, image_size, channels)
