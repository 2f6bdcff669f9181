"""The FID Inception-v3 as a Flax module, its weight import, and image features for FID/IS/KID/sFID.

The network is the 2015 TensorFlow Inception graph behind the standard FID numbers, as ported
to PyTorch by pytorch-fid: torchvision's Inception-v3 with its FIDInceptionA/C/E blocks, whose
3x3 average pools exclude the padding (TF's behaviour) and whose last block (Mixed_7c) pools
with a max pool. Parameter names follow pytorch-fid's state dict ("Mixed_5b.branch1x1.conv.weight",
"fc.bias", ...), so its pt_inception-2015-12-05-6726825d.pth maps 1:1 onto the module. That file is
read without PyTorch (jax_diffusion.convert.torch_pickle) and, with
config.eval.inception_weights="auto",
fetched on first use into the user cache (jax_diffusion.downloads), verified by its SHA-256.

The input convention is a choice (PREPROCESS_MODES) because it moves FID: "tf1" is the
TensorFlow graph the DDPM / DDIM / Improved DDPM papers scored with (and that torch-fidelity
reproduces), "pytorch_fid" is pytorch-fid's, "clean" is clean-fid's.
"""
from __future__ import annotations

import functools
import os
import urllib.parse
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from jax_diffusion import downloads
from jax_diffusion.convert import torch_pickle
from jax_diffusion.errors import (
    ConfigError,
    DownloadError,
    InceptionWeightsNotFoundError,
    InputFileError,
)
from jax_diffusion.runtime import parallel

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_FILE)
# SHA-256 of WEIGHTS_FILE (its name carries the first 8 hex digits).
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INPUT_SIZE = 299
PREPROCESS_MODES = ("tf1", "pytorch_fid", "clean")
SPATIAL_CHANNELS = 7  # of mixed_6/conv, for sFID (ADM's evaluator): 7 x 17 x 17 = 2023 features
# FID must not depend on the accelerator: TPUs and GPUs otherwise run float32 convs in bf16/tf32.
_PRECISION = jax.lax.Precision.HIGHEST


class _BasicConv(nn.Module):
    """torchvision's BasicConv2d: conv without bias, BatchNorm (eps 1e-3, running stats), ReLU."""
    features: int
    kernel: tuple[int, int]
    stride: int = 1
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.features, self.kernel, strides=self.stride,
                    padding=[(p, p) for p in self.padding], use_bias=False,
                    precision=_PRECISION, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    """TF's 3x3/1 SAME average pool: border windows average only their in-image pixels."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


def _max_pool_3x3_same(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_reduce(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2))


class _InceptionA(nn.Module):
    """35x35 block (FIDInceptionA): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b1 = _BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = _BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = _BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = _BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = _BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
    """35 -> 17 reduction (torchvision InceptionB): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _BasicConv(384, (3, 3), stride=2, name="branch3x3")(x)
        bd = _BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = _BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = _BasicConv(96, (3, 3), stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_reduce(x)], axis=-1)


class _InceptionC(nn.Module):
    """17x17 block (FIDInceptionC) with factorized 7x7 convolutions and an avgpool branch."""
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
        b1 = _BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = _BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = _BasicConv(c7, **row, name="branch7x7_2")(b7)
        b7 = _BasicConv(192, **col, name="branch7x7_3")(b7)
        bd = _BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = _BasicConv(c7, **col, name="branch7x7dbl_2")(bd)
        bd = _BasicConv(c7, **row, name="branch7x7dbl_3")(bd)
        bd = _BasicConv(c7, **col, name="branch7x7dbl_4")(bd)
        bd = _BasicConv(192, **row, name="branch7x7dbl_5")(bd)
        bp = _BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
    """17 -> 8 reduction (torchvision InceptionD): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = _BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = _BasicConv(320, (3, 3), stride=2, name="branch3x3_2")(b3)
        b7 = _BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = _BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = _BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = _BasicConv(192, (3, 3), stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_reduce(x)], axis=-1)


class _InceptionE(nn.Module):
    """8x8 block (FIDInceptionE_1 with pool="avg", FIDInceptionE_2 with pool="max")."""
    pool: str

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
        b1 = _BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = _BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([_BasicConv(384, **row, name="branch3x3_2a")(b3),
                              _BasicConv(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = _BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = _BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([_BasicConv(384, **row, name="branch3x3dbl_3a")(bd),
                              _BasicConv(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        pooled = _max_pool_3x3_same(x) if self.pool == "max" else _avg_pool_3x3_same(x)
        bp = _BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _UnbiasedLinear(nn.Module):
    """The 2048 -> 1008 classifier, applied without its bias (torch-fidelity's "logits_unbiased",
    the Inception Score's input). The bias is a parameter only so the state dict maps 1:1."""
    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        self.param("bias", nn.initializers.zeros, (self.features,))
        return jnp.dot(x, kernel, precision=_PRECISION)


class FIDInceptionV3(nn.Module):
    """images [N, 299, 299, 3] in [-1, 1] -> (pool features [N, 2048], logits [N, 1008]), and with
    `spatial` the sFID features [N, 17 * 17 * 7] third: the first SPATIAL_CHANNELS channels of
    the TF graph's mixed_6/conv (the ReLU output of Mixed_6d's 1x1 branch, which leads the block's
    concatenation), flattened in TF's (row, column, channel) order, as ADM's evaluator takes them
    (Nash et al. 2021)."""
    spatial: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        x = _BasicConv(32, (3, 3), stride=2, name="Conv2d_1a_3x3")(x)
        x = _BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = _BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_reduce(x)
        x = _BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = _BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_reduce(x)
        x = _InceptionA(32, name="Mixed_5b")(x)
        x = _InceptionA(64, name="Mixed_5c")(x)
        x = _InceptionA(64, name="Mixed_5d")(x)
        x = _InceptionB(name="Mixed_6a")(x)
        for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                               ("Mixed_6e", 192)):
            x = _InceptionC(channels, name=name)(x)
            if name == "Mixed_6d":
                mixed_6 = x[..., :SPATIAL_CHANNELS].reshape(len(x), -1)
        x = _InceptionD(name="Mixed_7a")(x)
        x = _InceptionE("avg", name="Mixed_7b")(x)
        x = _InceptionE("max", name="Mixed_7c")(x)
        pool = jnp.mean(x, axis=(1, 2))
        logits = _UnbiasedLinear(1008, name="fc")(pool)
        return (pool, logits, mixed_6) if self.spatial else (pool, logits)


# Flax leaf name -> PyTorch state-dict suffix.
_TORCH_LEAF = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def _torch_name(flax_path: tuple[str, ...]) -> str:
    collection, *modules, leaf = flax_path
    return ".".join(modules + [_TORCH_LEAF[(collection, leaf)]])


def to_flax_layout(array: np.ndarray) -> np.ndarray:
    """PyTorch conv [O, I, kh, kw] -> Flax [kh, kw, I, O]; linear [O, I] -> [I, O]."""
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def torch_shape(flax_shape: Sequence[int]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        kh, kw, cin, cout = flax_shape
        return (cout, cin, kh, kw)
    return tuple(reversed(flax_shape))  # [I, O] -> [O, I]; vectors unchanged


@functools.lru_cache(maxsize=1)
def _flax_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """{(collection, module..., leaf): shape} of the network's variables, without computing them."""
    abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                              jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
    return {path: leaf.shape for path, leaf in traverse_util.flatten_dict(dict(abstract)).items()}


def expected_weight_shapes() -> dict[str, tuple[int, ...]]:
    """{pytorch-fid parameter name: PyTorch-layout shape} for every tensor the network needs."""
    return {_torch_name(path): torch_shape(shape) for path, shape in _flax_shapes().items()}


def _missing_weights_message(path: str) -> str:
    return (f"FID Inception weights not found at {path!r}: set config.eval.inception_weights="
            f"auto to fetch {WEIGHTS_FILE} (the weights pytorch-fid and torch-fidelity use) on "
            f"first use, or download it from {WEIGHTS_URL} and set config.eval.inception_weights "
            f"to its path (the .pth, or an .npz with the same parameter names and shapes)")


def resolve_weights(eval_config: ml_collections.ConfigDict) -> str:
    """The local path of the FID Inception weights named by `eval_config` (config.eval):
    inception_weights="auto" fetches inception_url into the user cache (downloads.cache_dir())
    unless a copy matching inception_sha256 is there; any other value is a path."""
    value = str(eval_config.inception_weights)
    if value != "auto":
        path = os.path.expanduser(value)
        if not value or not os.path.isfile(path):
            raise InceptionWeightsNotFoundError(_missing_weights_message(value))
        return path
    sha256 = str(eval_config.inception_sha256).lower()
    if not downloads.SHA256_PATTERN.fullmatch(sha256):
        raise ConfigError(f"config.eval.inception_sha256={eval_config.inception_sha256!r}: "
                          f"needs the 64 hex digits of the weights file's SHA-256 "
                          f"({WEIGHTS_SHA256} for {WEIGHTS_FILE})")
    url = str(eval_config.inception_url)
    filename = os.path.basename(urllib.parse.urlparse(url).path) or WEIGHTS_FILE
    try:
        return downloads.fetch(url, sha256, filename)
    except DownloadError as error:
        raise DownloadError(f"FID Inception weights: {error}; or set "
                            f"config.eval.inception_weights to a local copy") from error


def _read_weight_file(path: str) -> dict[str, np.ndarray]:
    """{name: array} of an .npz or of a PyTorch state dict (.pth/.pt/.bin, read without torch)."""
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as file:
                return {name: file[name] for name in file.files}
        except (OSError, ValueError) as error:
            raise InputFileError(f"{path}: not a readable .npz file of FID Inception weights "
                                 f"({error})") from error
    return torch_pickle.load_state_dict(path)


def load_inception(path: str) -> tuple[FIDInceptionV3, dict]:
    """(module, variables) from pytorch-fid's .pth or an .npz with its parameter names. Checks
    that every expected name is present with its PyTorch-layout shape and no others (besides
    BatchNorm's num_batches_tracked counters); never substitutes random weights."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InceptionWeightsNotFoundError(_missing_weights_message(path))
    found = _read_weight_file(path)
    expected = expected_weight_shapes()
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(name for name in set(found) - set(expected)
                        if not name.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise InputFileError(f"{path} is not the FID Inception-v3 ({WEIGHTS_FILE}): "
                             f"{len(missing)} parameters missing {missing[:5]}, "
                             f"{len(unexpected)} unexpected {unexpected[:5]}")
    flat = {}
    for flax_path in _flax_shapes():
        name = _torch_name(flax_path)
        array = np.asarray(found[name])
        if array.shape != expected[name]:
            raise InputFileError(f"{path}: parameter {name} has shape {array.shape}, expected "
                                 f"{expected[name]}")
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array)):
            raise InputFileError(f"{path}: parameter {name} must be finite floats, got "
                                 f"{array.dtype}")
        flat[flax_path] = jnp.asarray(to_flax_layout(array), jnp.float32)
    return FIDInceptionV3(), traverse_util.unflatten_dict(flat)


# Resize matrices [out, in], applied as two matrix products in float32 at HIGHEST precision.


def _linear_matrix(src: np.ndarray, in_size: int) -> np.ndarray:
    """Linear interpolation at source positions `src` (>= 0), the upper neighbour clamped to the
    last pixel."""
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    matrix = np.zeros((len(src), in_size))
    np.add.at(matrix, (np.arange(len(src)), lo), 1.0 - frac)
    np.add.at(matrix, (np.arange(len(src)), hi), frac)
    return matrix


def _tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """TF1's ResizeBilinear (align_corners=False, no half-pixel centres), the resize inside the
    2015 Inception graph: output pixel i samples the input at i * in/out, a position TF computes
    in float32 (as torch-fidelity does); float64 would move outputs by up to 3e-6 at 32 -> 299."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    return _linear_matrix(src.astype(np.float64), in_size)


def _half_pixel_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """PyTorch's F.interpolate(mode="bilinear", align_corners=False), no antialiasing: output
    pixel i samples the input at max((i + 1/2) in/out - 1/2, 0)."""
    return _linear_matrix(np.maximum((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0),
                          in_size)


def _pil_bicubic_weight(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (Keys, a = -0.5), support 2."""
    a, x = -0.5, np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Pillow's Image.resize(resample=BICUBIC) on a float ("F") image, as clean-fid calls it:
    pixel centres at (i + 1/2) in/out, the kernel stretched by in/out when shrinking
    (antialiasing), taps outside the image dropped and the rest renormalized to sum to 1."""
    scale = in_size / out_size
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    matrix = np.zeros((out_size, in_size))
    for i in range(out_size):
        centre = (i + 0.5) * scale
        first = max(int(centre - support + 0.5), 0)
        stop = min(int(centre + support + 0.5), in_size)
        taps = np.arange(first, stop)
        weights = _pil_bicubic_weight((taps - centre + 0.5) / stretch)
        matrix[i, first:stop] = weights / weights.sum()
    return matrix


_RESIZE_MATRICES = {"tf1": _tf1_bilinear_matrix, "pytorch_fid": _half_pixel_bilinear_matrix,
                    "clean": pil_bicubic_matrix}


def _resize(x: jax.Array, mode: str) -> jax.Array:
    """[N, H, W, C] -> [N, 299, 299, C] with the mode's resize, as two matrix products."""
    rows = _RESIZE_MATRICES[mode](x.shape[1], INPUT_SIZE).astype(np.float32)
    cols = _RESIZE_MATRICES[mode](x.shape[2], INPUT_SIZE).astype(np.float32)
    x = jnp.einsum("oh,nhwc->nowc", rows, x, precision=_PRECISION)
    return jnp.einsum("pw,nowc->nopc", cols, x, precision=_PRECISION)


def check_preprocess_mode(mode: str) -> None:
    if mode not in PREPROCESS_MODES:
        raise ConfigError(f"config.eval.inception_preprocess={mode!r}: allowed are "
                          f"{', '.join(PREPROCESS_MODES)} (tf1 = the papers' TensorFlow FID)")


def preprocess(images_uint8: jax.Array, mode: str) -> jax.Array:
    """uint8 [N, H, W, C] (C = 1 or 3; grey is repeated to RGB) -> the network's float32
    [N, 299, 299, 3] input, by the convention `mode`:

      tf1          TF1 bilinear resize (source = i * in/out) of the pixel values, then
                   (x - 128) / 128: the TF Inception graph of the papers' FIDs, torch-fidelity
      pytorch_fid  x / 255, F.interpolate's half-pixel bilinear resize, then 2x - 1
      clean        clean-fid: Pillow's antialiased bicubic resize of each channel as float,
                   clipped to [0, 255], then (x - 128) / 128
    """
    check_preprocess_mode(mode)
    x = jnp.asarray(images_uint8).astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if mode == "pytorch_fid":
        return 2.0 * _resize(x / 255.0, mode) - 1.0
    x = _resize(x, mode)
    if mode == "clean":
        x = jnp.clip(x, 0.0, 255.0)
    return (x - 128.0) / 128.0


# Preprocessing and the network are compiled apart: one compilation of the network then serves
# every input size and preprocessing mode.
_preprocess_jit = jax.jit(preprocess, static_argnames="mode")


@functools.partial(jax.jit, static_argnums=0)
def _network(module: FIDInceptionV3, variables: dict, x: jax.Array) -> tuple[jax.Array, ...]:
    return module.apply(variables, x)


def feature_batching(images_uint8: np.ndarray, batch_size: int, mesh: Mesh | None, what: str
                     ) -> tuple[np.ndarray, Mesh, int]:
    """(images, mesh, batch size) for a feature network: the images checked to be uint8
    [N, H, W, 1 or 3] (InputFileError naming `what` otherwise), the mesh defaulting to one local
    device, the batch at most N and rounded up to the mesh's device count."""
    images_uint8 = np.asarray(images_uint8)
    if (images_uint8.dtype != np.uint8 or images_uint8.ndim != 4
            or images_uint8.shape[-1] not in (1, 3)):
        raise InputFileError(f"{what} needs uint8 [N, H, W, 1 or 3] images, got "
                             f"{images_uint8.dtype} {images_uint8.shape}")
    mesh = parallel.create_mesh(jax.local_devices()[:1]) if mesh is None else mesh
    batch_size = parallel.round_up_to_devices(max(1, min(batch_size, len(images_uint8))), mesh)
    return images_uint8, mesh, batch_size


def inception_features(module: FIDInceptionV3, variables: dict, images_uint8: np.ndarray,
                       batch_size: int = 200, mesh: Mesh | None = None,
                       preprocess: str = "tf1", spatial: bool = False
                       ) -> tuple[np.ndarray, ...]:
    """(pool features [N, 2048], logits without the fc bias [N, 1008]) as float32 numpy, for
    uint8 NHWC images of any size, preprocessed by the convention `preprocess` (one of
    PREPROCESS_MODES; "tf1" matches the papers); with `spatial` the sFID features [N, 2023]
    third, from the same pass (FIDInceptionV3). Batches are padded to `batch_size` so one
    compilation serves all of them. With a `mesh` (of this process's devices, e.g.
    parallel.create_mesh(jax.local_devices())) each batch is split over its devices, the batch
    size rounded up to a multiple of the device count."""
    check_preprocess_mode(preprocess)
    images_uint8, mesh, batch_size = feature_batching(images_uint8, batch_size, mesh,
                                                      "inception_features")
    variables = parallel.replicate(variables, mesh)
    mode, module = preprocess, module.clone(spatial=spatial)
    return parallel.map_batches(
        lambda i, batch: _network(module, variables, _preprocess_jit(batch, mode=mode)),
        (images_uint8,), batch_size, mesh)
