"""The Flax DINOv2 against transformers' Dinov2Model on the same random weights (saved with
torch.save under the released file's names, read by our safe reader), the position-embedding
resampling against torch's F.interpolate, the preprocessing against Pillow, the weight-file
checks, and the weights' download on a loopback server."""
import hashlib
import http.server
import os

import jax
import numpy as np
import pytest
from tiny_config import default_eval_config
from loopback import serving
from PIL import Image
from torch_reference import import_torch

from jax_diffusion import downloads
from jax_diffusion.errors import ConfigError, DownloadError, InputFileError, MissingInputFileError
from jax_diffusion.evaluation import dinov2
from jax_diffusion.runtime import parallel

torch = import_torch()
F = torch.nn.functional
Dinov2Config = pytest.importorskip("transformers").Dinov2Config
Dinov2Model = pytest.importorskip("transformers").Dinov2Model

TOLERANCE = 1e-4  # of the largest |reference| value
WIDTH, DEPTH, HEADS, GRID = 32, 2, 2, 5  # a small ViT/14 with a 5 x 5 position grid (70 px)


def _relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def _released_names(state: dict) -> dict[str, torch.Tensor]:
    """transformers' Dinov2Model state dict -> the names of dinov2_vitl14_pretrain.pth."""
    out = {"cls_token": state["embeddings.cls_token"],
           "mask_token": state["embeddings.mask_token"],
           "pos_embed": state["embeddings.position_embeddings"],
           "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
    for i in range(DEPTH):
        ours, theirs = f"blocks.{i}.", f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            out[ours + f"attn.qkv.{leaf}"] = torch.cat(
                [state[theirs + f"attention.{p}_proj.{leaf}"] for p in "qkv"])
            out[ours + f"attn.proj.{leaf}"] = state[theirs + f"attention.o_proj.{leaf}"]
            for name in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                out[ours + f"{name}.{leaf}"] = state[theirs + f"{name}.{leaf}"]
        out[ours + "ls1.gamma"] = state[theirs + "layer_scale1.lambda1"]
        out[ours + "ls2.gamma"] = state[theirs + "layer_scale2.lambda1"]
    return {name: value.contiguous() for name, value in out.items()}


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    """(transformers' model, our module, our variables, the .pth path) on one set of random
    weights; every tensor (norms, LayerScale, biases, tokens included) drawn at random."""
    torch.manual_seed(0)
    reference = Dinov2Model(Dinov2Config(
        hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
        intermediate_size=4 * WIDTH, patch_size=14, image_size=14 * GRID, layer_norm_eps=1e-6,
        hidden_act="gelu")).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            noise = torch.randn(tensor.shape, generator=generator)
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "lambda1")):
                tensor.copy_(1.0 + 0.3 * noise)
            elif tensor.dim() >= 2 and "token" not in name and "position" not in name:
                tensor.copy_(noise / np.sqrt(np.prod(tensor.shape[1:])))
            else:
                tensor.copy_(0.5 * noise)
    path = str(tmp_path_factory.mktemp("dinov2") / dinov2.WEIGHTS_FILE)
    torch.save(_released_names(reference.state_dict()), path)
    module = dinov2.DINOv2(width=WIDTH, depth=DEPTH, heads=HEADS, mlp_hidden=4 * WIDTH,
                           grid=GRID, interpolate_offset=0.0)
    module, variables = dinov2.load_dinov2(path, module)  # read without torch
    return reference, module, variables, path


def _theirs(reference, x_nhwc: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        pixels = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
        return reference(pixel_values=pixels).pooler_output.numpy()


@pytest.mark.parametrize("size", [14 * GRID, 224])
def test_features_match_transformers(networks, size):
    """At the weights' own grid (no resampling) and at 224 (16 x 16 patches: resampled)."""
    reference, module, variables, _ = networks
    x = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    want = _theirs(reference, x)
    got = np.asarray(dinov2._network(module, variables, x))
    assert got.shape == want.shape == (2, WIDTH)
    assert np.abs(want).mean() > 0.1 and np.abs(want[0] - want[1]).max() > 0.1  # not constant
    assert _relative_error(got, want) <= TOLERANCE
    if size == 224:
        # Negative control: DINOv2's own resampling (scale factor with the 0.1 offset) is not
        # transformers' by-size one: the features move well outside the tolerance.
        offset = module.clone(interpolate_offset=0.1)
        assert _relative_error(np.asarray(dinov2._network(offset, variables, x)),
                               want) > 10 * TOLERANCE


def test_features_sharded_over_8_devices_equal_one_device(networks):
    _, module, variables, _ = networks
    images = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    one = dinov2.dinov2_features(module, variables, images, batch_size=2)
    eight = dinov2.dinov2_features(module, variables, images, batch_size=8,
                                   mesh=parallel.create_mesh(jax.devices()[:8]))
    assert one.shape == (5, WIDTH)
    np.testing.assert_allclose(eight, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in_size, out_size, offset", [(37, 16, 0.1), (5, 16, 0.1), (37, 16, 0.0),
                                                       (5, 16, 0.0)])
def test_position_resampling_matches_torch_interpolate(in_size, out_size, offset):
    """DINOv2's call: scale_factor = (out + 0.1) / in (its default offset), or size = out."""
    grid = torch.from_numpy(np.random.default_rng(4).normal(size=(1, 3, in_size, in_size)))
    if offset:
        scale = (out_size + offset) / in_size
        want = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic",
                             align_corners=False)
    else:
        scale = 0.0
        want = F.interpolate(grid, size=(out_size, out_size), mode="bicubic",
                             align_corners=False)
    assert want.shape[-1] == out_size
    matrix = dinov2.torch_bicubic_matrix(in_size, out_size, scale or None)
    got = np.einsum("ri,ncij,sj->ncrs", matrix, grid.numpy(), matrix)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-10)
    other = dinov2.torch_bicubic_matrix(in_size, out_size, None if offset else 16.1 / in_size)
    assert np.abs(np.einsum("ri,ncij,sj->ncrs", other, grid.numpy(), other)
                  - want.numpy()).max() > 1e-3  # negative control: the offset matters


def _pil_reference(images_uint8: np.ndarray) -> np.ndarray:
    """dgm-eval's input: torchvision's Resize((224, 224), BICUBIC) on the PIL image (Pillow's
    resize), ToTensor (/ 255), Normalize with ImageNet's mean and std; NHWC float32."""
    out = []
    for image in images_uint8:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).convert("RGB")
        resized = np.asarray(pil.resize((224, 224), Image.Resampling.BICUBIC), np.float32)
        out.append((resized / 255.0 - np.float32(dinov2.IMAGENET_MEAN))
                   / np.float32(dinov2.IMAGENET_STD))
    return np.stack(out)


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (1, 256, 300, 3), (2, 17, 40, 1),
                                   (1, 224, 224, 3)])
def test_preprocessing_matches_pillow(shape):
    images = np.random.default_rng(5).integers(0, 256, shape, dtype=np.uint8)
    got = np.asarray(dinov2.preprocess(images))
    want = _pil_reference(images)
    # The same uint8 pixels after the resize: the normalisation leaves float32 round-off only.
    np.testing.assert_allclose(got, want, atol=2e-6)
    if shape[1:3] != (224, 224):
        # Negative control: the same bicubic resize without Pillow's rounding to uint8 after each
        # pass (clean-fid's float resize) is off by whole pixel levels (1/255/std ~ 0.017).
        floats = np.stack([np.stack([np.asarray(Image.fromarray(
            image[..., min(c, image.shape[-1] - 1)].astype(np.float32)).resize(
            (224, 224), Image.Resampling.BICUBIC)) for c in range(3)], -1) for image in images])
        unrounded = (floats / 255.0 - np.float32(dinov2.IMAGENET_MEAN)) / np.float32(
            dinov2.IMAGENET_STD)
        assert np.abs(unrounded - want).max() > 0.01


# ---------------------------------------------------------------------------------------------
# The weights: expected names, file checks, config.eval.dinov2_*, the download


def test_vit_l14_expects_the_released_tensors():
    shapes = dinov2.expected_weight_shapes()
    assert len(shapes) == 24 * 14 + 6  # the released file holds these and mask_token
    assert shapes["pos_embed"] == (1, 1 + 37 * 37, 1024)
    assert shapes["patch_embed.proj.weight"] == (1024, 3, 14, 14)
    assert shapes["blocks.23.attn.qkv.weight"] == (3072, 1024)
    assert shapes["blocks.23.mlp.fc1.weight"] == (4096, 1024)
    assert shapes["blocks.0.ls1.gamma"] == (1024,) and shapes["norm.bias"] == (1024,)
    params = sum(int(np.prod(s)) for s in shapes.values())
    assert 303e6 < params < 305e6  # ViT-L/14: 304M


def test_a_file_of_another_network_is_one_error(networks, tmp_path):
    _, module, _, path = networks
    with pytest.raises(InputFileError, match="is not DINOv2 ViT-L/14.*tensors missing"):
        dinov2.load_dinov2(path)  # the small file against ViT-L/14's names
    state = torch.load(path, weights_only=True)
    state["pos_embed"] = state["pos_embed"][:, :10]
    bad = str(tmp_path / "bad.pth")
    torch.save(state, bad)
    with pytest.raises(InputFileError, match="pos_embed has shape"):
        dinov2.load_dinov2(bad, module)
    with pytest.raises(MissingInputFileError, match="config.eval.dinov2_weights"):
        dinov2.load_dinov2(str(tmp_path / "absent.pth"), module)


def test_default_config_fetches_the_released_weights():
    config = default_eval_config()
    assert config.dinov2_weights == "auto"
    assert config.dinov2_url == dinov2.WEIGHTS_URL
    assert config.dinov2_sha256 == dinov2.WEIGHTS_SHA256


def test_config_checks_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.eval\.dinov2_sha256='d5383ea8'"):
        dinov2.check_config(default_eval_config(dinov2_sha256="d5383ea8"), wanted=False)
    absent = str(tmp_path / "absent.pth")
    with pytest.raises(ConfigError, match=r"config\.eval\.dinov2_weights=.*is not a file"):
        dinov2.check_config(default_eval_config(dinov2_weights=absent), wanted=True)
    dinov2.check_config(default_eval_config(dinov2_weights=absent), wanted=False)  # not asked for


PAYLOAD = os.urandom(2 * (1 << 20) + 777)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """/dinov2.pth: the payload; /other.pth: other bytes; /cut.pth: half of the announced."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.requests.append(self.path)
        bodies = {"/dinov2.pth": PAYLOAD, "/other.pth": bytes(len(PAYLOAD)),
                  "/cut.pth": PAYLOAD[:len(PAYLOAD) // 2]}
        if self.path not in bodies:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PAYLOAD)))
        self.end_headers()
        self.wfile.write(bodies[self.path])
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.requests, httpd.daemon_threads = [], True
    with serving(httpd):
        yield httpd


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("JAX_DIFFUSION_CACHE_DIR", str(directory))
    monkeypatch.setattr(downloads, "_VERIFIED", {})
    return directory


def test_auto_weights_are_fetched_once_into_the_cache(server, cache):
    config = default_eval_config(dinov2_url=f"{server.url}/dinov2.pth",
                                 dinov2_sha256=PAYLOAD_SHA256)
    path = dinov2.resolve_weights(config)
    assert path == str(cache / "dinov2.pth")
    with open(path, "rb") as file:
        assert file.read() == PAYLOAD
    assert dinov2.resolve_weights(config) == path and server.requests == ["/dinov2.pth"]


@pytest.mark.parametrize("route, reason", [
    ("/other.pth", f"expected {PAYLOAD_SHA256}"),
    ("/cut.pth", f"connection closed after {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes"),
])
def test_a_wrong_or_cut_download_leaves_nothing(server, cache, route, reason):
    config = default_eval_config(dinov2_url=f"{server.url}{route}", dinov2_sha256=PAYLOAD_SHA256)
    with pytest.raises(DownloadError) as error:
        dinov2.resolve_weights(config)
    message = str(error.value)
    assert "\n" not in message and reason in message
    assert message.startswith("DINOv2 weights:") and "config.eval.dinov2_weights" in message
    assert not cache.exists() or os.listdir(cache) == []  # neither the file nor a temporary


def test_weights_given_as_a_path(tmp_path):
    given = tmp_path / "mine.pth"
    given.write_bytes(b"x")
    assert dinov2.resolve_weights(default_eval_config(dinov2_weights=str(given))) == str(given)
    with pytest.raises(MissingInputFileError, match="dinov2_weights=auto"):
        dinov2.resolve_weights(default_eval_config(dinov2_weights=str(tmp_path / "absent.pth")))


def test_vit_l14_forward_flops():
    """The bench's analytic count at 224 x 224 (257 tokens): without attention's two products
    (4 T^2 C per block) it is the 77.8 G multiply-adds published for ViT-L/14 at 224."""
    from jax_diffusion.bench.evaluation import dinov2_flops_per_image
    flops = dinov2_flops_per_image(dinov2.DINOv2())
    attention_products = 24 * 4 * 257 ** 2 * 1024
    assert (flops - attention_products) / 2 == pytest.approx(77.8e9, rel=2e-3)
