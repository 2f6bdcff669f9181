"""DINOv2 ViT-L/14 (Oquab et al. 2023) as a Flax module, its weight import, and image features
for FD-DINOv2 (Stein et al. 2023, dgm-eval; the EDM2 paper's second metric).

The network is the official `dinov2_vitl14` backbone: 14 x 14 patches, width 1024, 24 pre-norm
blocks of 16-head attention and a 4096 GELU MLP, each branch scaled by LayerScale, LayerNorm eps
1e-6; the feature is the class token after the final norm ([N, 1024]). Parameter names follow
the released state dict (`blocks.0.attn.qkv.weight`, `pos_embed`, ...), so
dinov2_vitl14_pretrain.pth maps 1:1 (its training-only `mask_token` is not used). The file is read
without PyTorch (jax_diffusion.convert.torch_pickle) and, with config.eval.dinov2_weights="auto",
fetched on first use into the user cache (jax_diffusion.downloads), verified by its SHA-256.

Images enter as dgm-eval feeds them: Pillow's bicubic resize of the uint8 RGB image to 224 x 224
(torchvision's Resize on a PIL image), /255, then the ImageNet mean and std.
"""
from __future__ import annotations

import functools
import math
import os
import re
import urllib.parse

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from jax_diffusion import downloads
from jax_diffusion.convert import torch_pickle
from jax_diffusion.errors import ConfigError, DownloadError, InputFileError, MissingInputFileError
from jax_diffusion.evaluation.inception import (feature_batching, pil_bicubic_matrix,
                                                to_flax_layout, torch_shape)
from jax_diffusion.runtime import parallel

WEIGHTS_FILE = "dinov2_vitl14_pretrain.pth"
WEIGHTS_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/" + WEIGHTS_FILE
# SHA-256 of WEIGHTS_FILE (1,217,586,395 bytes), as recorded by projects that pin it.
WEIGHTS_SHA256 = "d5383ea8f4877b2472eb973e0fd72d557c7da5d3611bd527ceeb1d7162cbf428"
INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Pillow's fixed-point resampling of 8-bit images: coefficients carry 22 fraction bits.
_PIL_PRECISION_BITS = 22
# Feature distances must not depend on the accelerator (bf16/tf32 matmuls otherwise).
_PRECISION = jax.lax.Precision.HIGHEST


def _dense(features: int, name: str) -> nn.Dense:
    return nn.Dense(features, precision=_PRECISION, name=name)


class _Attention(nn.Module):
    """softmax(q k^T / sqrt(d_head)) v over `heads` heads, q, k, v from one `qkv` projection."""
    heads: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n, tokens, width = x.shape
        qkv = _dense(3 * width, "qkv")(x).reshape(n, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=_PRECISION)
        weights = jax.nn.softmax(logits / math.sqrt(width // self.heads), axis=-1)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights, v, precision=_PRECISION)
        return _dense(width, "proj")(out.reshape(n, tokens, width))


class _Mlp(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = nn.gelu(_dense(self.hidden, "fc1")(x), approximate=False)  # nn.GELU: erf
        return _dense(x.shape[-1], "fc2")(hidden)


class _LayerScale(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.param("gamma", nn.initializers.ones, (x.shape[-1],))


class _Block(nn.Module):
    """x + ls1(attn(norm1(x))), then + ls2(mlp(norm2(x)))."""
    heads: int
    mlp_hidden: int
    eps: float

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + _LayerScale(name="ls1")(_Attention(self.heads, name="attn")(
            nn.LayerNorm(self.eps, name="norm1")(x)))
        return x + _LayerScale(name="ls2")(_Mlp(self.mlp_hidden, name="mlp")(
            nn.LayerNorm(self.eps, name="norm2")(x)))


def _torch_cubic(x: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's bicubic kernel (Keys, a = -0.75), support 2."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x <= 1.0, near, np.where(x < 2.0, far, 0.0))


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float | None) -> np.ndarray:
    """[out, in]: F.interpolate(mode="bicubic", align_corners=False, antialias=False) along one
    axis. Output i samples the input at (i + 1/2) s - 1/2, s = 1 / scale_factor when one is given
    (as DINOv2 passes it), else in / out; the four taps are clamped to the border."""
    step = 1.0 / scale_factor if scale_factor else in_size / out_size
    source = (np.arange(out_size) + 0.5) * step - 0.5
    first = np.floor(source).astype(np.int64)
    matrix = np.zeros((out_size, in_size))
    for tap in range(-1, 3):
        weights = _torch_cubic(source - (first + tap))
        np.add.at(matrix, (np.arange(out_size), np.clip(first + tap, 0, in_size - 1)), weights)
    return matrix


class DINOv2(nn.Module):
    """images [N, H, W, 3] (H, W multiples of `patch`, normalised) -> class token [N, width]
    after the final LayerNorm. The defaults are ViT-L/14 with position embeddings for a 37 x 37
    grid (518 px), resampled to the input's grid as DINOv2 does: bicubic with the scale factor
    (grid' + interpolate_offset) / grid (offset 0 = by output size, as transformers' Dinov2)."""
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 4096
    patch: int = 14
    grid: int = 37
    interpolate_offset: float = 0.1
    eps: float = 1e-6

    def _position_embedding(self, pos: jax.Array, rows: int, cols: int) -> jax.Array:
        if rows == cols == self.grid:
            return pos
        grid = pos[:, 1:].reshape(self.grid, self.grid, self.width)
        offset = self.interpolate_offset
        row_matrix = torch_bicubic_matrix(self.grid, rows, offset and (rows + offset) / self.grid)
        col_matrix = torch_bicubic_matrix(self.grid, cols, offset and (cols + offset) / self.grid)
        grid = jnp.einsum("rg,ghc->rhc", row_matrix.astype(np.float32), grid,
                          precision=_PRECISION)
        grid = jnp.einsum("sh,rhc->rsc", col_matrix.astype(np.float32), grid,
                          precision=_PRECISION)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, rows * cols, self.width)], axis=1)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch, padding="VALID",
                    precision=_PRECISION, name="patch_embed_proj")(x)
        n, rows, cols, _ = x.shape
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
        pos = self.param("pos_embed", nn.initializers.normal(0.02),
                         (1, 1 + self.grid * self.grid, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, self.width)),
                             x.reshape(n, rows * cols, self.width)], axis=1)
        x = x + self._position_embedding(pos, rows, cols)
        for i in range(self.depth):
            x = _Block(self.heads, self.mlp_hidden, self.eps, name=f"blocks_{i}")(x)
        return nn.LayerNorm(self.eps, name="norm")(x)[:, 0]


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma"}


def _torch_name(flax_path: tuple[str, ...]) -> str:
    """("params", "blocks_3", "attn", "qkv", "kernel") -> "blocks.3.attn.qkv.weight"."""
    *modules, leaf = flax_path[1:]
    name = ".".join(modules + [_TORCH_LEAF.get(leaf, leaf)] if modules else [leaf])
    return re.sub(r"^(blocks|patch_embed)_", r"\1.", name)


@functools.lru_cache(maxsize=8)
def _flax_shapes(module: DINOv2) -> dict[tuple[str, ...], tuple[int, ...]]:
    size = module.patch * module.grid
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0),
                              jnp.zeros((1, size, size, 3), jnp.float32))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(dict(abstract)).items()}


def _layout_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """PyTorch-layout shape: convolutions and linear kernels transposed, the rest as is."""
    return torch_shape(shape) if path[-1] == "kernel" else tuple(shape)


def expected_weight_shapes(module: DINOv2 | None = None) -> dict[str, tuple[int, ...]]:
    """{state-dict name: PyTorch-layout shape} of every tensor `module` (ViT-L/14) needs."""
    shapes = _flax_shapes(module or DINOv2())
    return {_torch_name(path): _layout_shape(path, shape) for path, shape in shapes.items()}


def _missing_weights_message(path: str) -> str:
    return (f"DINOv2 weights not found at {path!r}: set config.eval.dinov2_weights=auto to fetch "
            f"{WEIGHTS_FILE} on first use, or download it from {WEIGHTS_URL} and set "
            f"config.eval.dinov2_weights to its path")


def check_config(eval_config: ml_collections.ConfigDict, wanted: bool) -> None:
    """config.eval.dinov2_*: a 64-hex-digit SHA-256 and, when FD-DINOv2 is `wanted` with a path
    rather than "auto", an existing file."""
    if not downloads.SHA256_PATTERN.fullmatch(str(eval_config.dinov2_sha256).lower()):
        raise ConfigError(f"config.eval.dinov2_sha256={eval_config.dinov2_sha256!r}: needs the "
                          f"64 hex digits of the weights file's SHA-256 ({WEIGHTS_SHA256} for "
                          f"{WEIGHTS_FILE})")
    value = str(eval_config.dinov2_weights)
    if wanted and value != "auto" and not os.path.isfile(os.path.expanduser(value)):
        raise ConfigError(f"config.eval.dinov2_weights={value!r} is not a file; fd_dinov2 needs "
                          f"{WEIGHTS_FILE} (or an .npz of its tensors), or set it to auto")


def resolve_weights(eval_config: ml_collections.ConfigDict) -> str:
    """The local path of the DINOv2 weights named by config.eval: dinov2_weights="auto" fetches
    dinov2_url into the user cache unless a copy matching dinov2_sha256 is there; any other
    value is a path."""
    value = str(eval_config.dinov2_weights)
    if value != "auto":
        path = os.path.expanduser(value)
        if not value or not os.path.isfile(path):
            raise MissingInputFileError(_missing_weights_message(value))
        return path
    check_config(eval_config, wanted=True)
    url = str(eval_config.dinov2_url)
    filename = os.path.basename(urllib.parse.urlparse(url).path) or WEIGHTS_FILE
    try:
        return downloads.fetch(url, str(eval_config.dinov2_sha256), filename)
    except DownloadError as error:
        raise DownloadError(f"DINOv2 weights: {error}; or set config.eval.dinov2_weights to a "
                            f"local copy") from error


def load_dinov2(path: str, module: DINOv2 | None = None) -> tuple[DINOv2, dict]:
    """(module, variables) from the released .pth (or an .npz with its names). Every tensor
    `module` (default ViT-L/14) needs must be present with its shape, finite, and nothing else
    but `mask_token`; never substitutes random weights."""
    path, module = os.fspath(path), module or DINOv2()
    if not os.path.isfile(path):
        raise MissingInputFileError(_missing_weights_message(path))
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as file:
                found = {name: file[name] for name in file.files}
        except (OSError, ValueError) as error:
            raise InputFileError(f"{path}: not a readable .npz of DINOv2 weights "
                                 f"({error})") from None
    else:
        found = torch_pickle.load_state_dict(path)
    expected = expected_weight_shapes(module)
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected) - {"mask_token"})
    if missing or unexpected:
        raise InputFileError(f"{path} is not DINOv2 ViT-L/14 ({WEIGHTS_FILE}): {len(missing)} "
                             f"tensors missing {missing[:5]}, {len(unexpected)} unexpected "
                             f"{unexpected[:5]}")
    flat = {}
    for flax_path in _flax_shapes(module):
        name = _torch_name(flax_path)
        array = np.asarray(found[name])
        if array.shape != expected[name]:
            raise InputFileError(f"{path}: tensor {name} has shape {array.shape}, expected "
                                 f"{expected[name]}")
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise InputFileError(f"{path}: tensor {name} must be finite floats, got {array.dtype}")
        value = to_flax_layout(array) if flax_path[-1] == "kernel" else array
        flat[flax_path] = jnp.asarray(value, jnp.float32)
    return module, traverse_util.unflatten_dict(flat)


def _pil_fixed_point_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's int32 coefficients for resizing 8-bit images with BICUBIC: its float weights
    (antialiased when shrinking) times 2^22, rounded half away from zero."""
    weights = pil_bicubic_matrix(in_size, out_size) * (1 << _PIL_PRECISION_BITS)
    return np.trunc(weights + np.where(weights < 0, -0.5, 0.5)).astype(np.int32)


def _pil_pass(x: jax.Array, matrix: np.ndarray, axis: str) -> jax.Array:
    """One pass of Pillow's 8-bit resampling along `axis` ("h" or "w") of int32 NHWC pixels:
    (sum of coefficient x pixel + 2^21) >> 22, clipped to 0..255, as Pillow stores each pass."""
    spec = "oh,nhwc->nowc" if axis == "h" else "ow,nhwc->nhoc"
    total = jnp.einsum(spec, jnp.asarray(matrix), x, preferred_element_type=jnp.int32)
    rounded = jnp.right_shift(total + (1 << (_PIL_PRECISION_BITS - 1)), _PIL_PRECISION_BITS)
    return jnp.clip(rounded, 0, 255)


def preprocess(images_uint8: jax.Array) -> jax.Array:
    """uint8 [N, H, W, C] (C = 1 or 3; grey is repeated to RGB) -> float32 [N, 224, 224, 3]:
    Pillow's bicubic resize of the uint8 image (width pass, then height pass, each rounded to
    uint8 as Pillow does), x / 255, then (x - mean) / std with ImageNet's mean and std."""
    x = jnp.asarray(images_uint8).astype(jnp.int32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[2] != INPUT_SIZE:  # Pillow skips a pass whose size does not change
        x = _pil_pass(x, _pil_fixed_point_matrix(x.shape[2], INPUT_SIZE), "w")
    if x.shape[1] != INPUT_SIZE:
        x = _pil_pass(x, _pil_fixed_point_matrix(x.shape[1], INPUT_SIZE), "h")
    x = x.astype(jnp.float32) / 255.0
    return (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


_preprocess_jit = jax.jit(preprocess)


@functools.partial(jax.jit, static_argnums=0)
def _network(module: DINOv2, variables: dict, x: jax.Array) -> jax.Array:
    return module.apply(variables, x)


def dinov2_features(module: DINOv2, variables: dict, images_uint8: np.ndarray,
                    batch_size: int = 200, mesh: Mesh | None = None) -> np.ndarray:
    """Class-token features [N, width] (float32 numpy) of uint8 NHWC images of any size,
    preprocessed as dgm-eval does (`preprocess`). Batches are padded to `batch_size` (rounded
    up to the mesh's device count) and split over the `mesh`'s devices."""
    images_uint8, mesh, batch_size = feature_batching(images_uint8, batch_size, mesh,
                                                      "dinov2_features")
    variables = parallel.replicate(variables, mesh)
    return parallel.map_batches(
        lambda i, batch: _network(module, variables, _preprocess_jit(batch)),
        (images_uint8,), batch_size, mesh)
