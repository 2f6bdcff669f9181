"""--mode=bench part `eval`: Inception feature extraction (the FID/IS/KID network) in img/s,
this project's Flax port against torch-fidelity's extractor on the same CPU and batch, in
alternating windows so that a shared machine's drift hits both alike; DINOv2 ViT-L/14 (FD-DINOv2)
in img/s when config.eval.metrics asks for fd_dinov2; the device's idle time
between sampling batches with and without the overlap of parallel.map_batches; and the
end-to-end time of `--mode=eval` on config.eval.num_samples samples projected per accelerator
from the measured parts.

Throughput does not depend on the weights, so both networks run with random weights (no
weights file is needed). torch-fidelity is optional: without torch and torch-fidelity its side
is reported as None. Its package __init__ imports torchvision (not installed), so its module
files are loaded on their own.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import io_callback

from jax_diffusion.bench.flops import unet_forward_flops
from jax_diffusion.config_files import comma_list
from jax_diffusion.evaluation import dinov2, inception, metrics
from jax_diffusion.generation import sampling
from jax_diffusion.runtime import parallel

# The model FLOP utilisation the accelerator projections assume (as the README's tables).
PROJECTED_MFU = 0.40


def torch_fidelity_extractor() -> Callable[[np.ndarray], None] | None:
    """torch-fidelity's InceptionV3 feature extractor with random weights, as a function of
    uint8 NHWC images (features computed, discarded); None when torch or torch-fidelity is
    missing."""
    try:
        import torch
    except ImportError:
        return None
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        return None
    if "torch_fidelity" not in sys.modules:
        package = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec("torch_fidelity", None, is_package=True))
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomWeights(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    with tempfile.TemporaryDirectory() as directory:
        empty = os.path.join(directory, "empty.pth")
        torch.save({}, empty)
        model = RandomWeights("inception-v3-compat", ["2048", "logits_unbiased"],
                              feature_extractor_weights_path=empty).eval()

    def extract(images_uint8: np.ndarray) -> None:
        with torch.no_grad():
            model(torch.from_numpy(np.ascontiguousarray(images_uint8.transpose(0, 3, 1, 2))))

    return extract


def _random_inception() -> tuple[inception.FIDInceptionV3, dict]:
    module = inception.FIDInceptionV3()
    variables = jax.jit(module.init)(jax.random.PRNGKey(0),
                                     jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))
    return module, variables


def _jax_extractor(module, variables, batch: int, mesh) -> Callable[[np.ndarray], None]:
    def extract(images_uint8: np.ndarray) -> None:
        jax.block_until_ready(inception.inception_features(module, variables, images_uint8,
                                                           batch_size=batch, mesh=mesh))

    return extract


def inception_flops_per_image(module, variables, size: int, channels: int,
                              preprocess: str = "tf1") -> float:
    """XLA's FLOP count of one image's features: the resize to 299 and the network, compiled
    for a batch of 8 on one device."""
    batch = 8
    images = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.uint8)
    features = jax.jit(lambda v, x: module.apply(v, inception.preprocess(x, preprocess)))
    return features.lower(variables, images).compile().cost_analysis()["flops"] / batch


def dinov2_flops_per_image(module: dinov2.DINOv2, size: int = dinov2.INPUT_SIZE) -> float:
    """Analytic forward FLOPs (2 per multiply-add) of one size x size image: the patch
    embedding, then per block the qkv and output projections 2T(4C^2), the MLP 2T(2 C H) and
    attention's two products 2(2 T^2 C), T = patches + 1 tokens of width C, MLP width H."""
    patches = (size // module.patch) ** 2
    tokens, width = patches + 1, module.width
    embed = 2 * patches * width * 3 * module.patch ** 2
    block = (2 * tokens * 4 * width ** 2 + 2 * tokens * 2 * width * module.mlp_hidden
             + 2 * 2 * tokens ** 2 * width)
    return float(embed + module.depth * block)


def _dinov2_rate(batch: int, mesh, images: np.ndarray, windows: int) -> float:
    """img/s of DINOv2 ViT-L/14 features (random weights, the resize to 224 included): the
    median of `windows` batches after one warm-up batch."""
    module = dinov2.DINOv2()
    variables = jax.jit(module.init)(jax.random.PRNGKey(0),
                                     jnp.zeros((1, dinov2.INPUT_SIZE, dinov2.INPUT_SIZE, 3)))
    seconds = []
    for window in range(windows + 1):
        start = time.perf_counter()
        jax.block_until_ready(dinov2.dinov2_features(module, variables, images, batch, mesh))
        if window:
            seconds.append(time.perf_counter() - start)
    return batch / statistics.median(seconds)


def batch_gaps_s(sample_fn, params, labels: np.ndarray, batch: int, mesh,
                 overlap: bool) -> list[float]:
    """The device's idle time before each sampling batch after the first, in
    sampling.generate_samples: from the end of batch i's program to the start of batch i+1's,
    both stamped by host callbacks inside the program (data dependencies and an optimization
    barrier put them before and after all of the sampler's work); 0 where the programs
    overlapped."""
    stamps = {"start": [], "end": []}

    def stamp(kind: str):
        def record(value):
            stamps[kind].append(time.perf_counter())
            return value
        return record

    @jax.jit
    def stamped(params, key, chunk):
        key = io_callback(stamp("start"), jax.ShapeDtypeStruct(key.shape, key.dtype), key)
        # Nothing of the sampler, not even its work on the parameters or labels alone, may be
        # scheduled before the start stamp.
        params, key, chunk = jax.lax.optimization_barrier((params, key, chunk))
        images = sample_fn(params, key, chunk)
        return io_callback(stamp("end"), jax.ShapeDtypeStruct(images.shape, images.dtype),
                           images)

    sampling.generate_samples(stamped, params, labels, batch, 0, mesh, progress=False,
                              overlap=overlap)
    starts, ends = stamps["start"], stamps["end"]
    return [max(0.0, starts[i + 1] - ends[i]) for i in range(len(starts) - 1)]


def _gaps(config: ml_collections.ConfigDict, model, params) -> dict:
    """Median device idle time between sampling batches (config.sample's sampler with one
    network evaluation: the gap is host and launch work, whatever a batch costs on the device),
    batches of config.bench.sample_batch_size on one device, config.bench.gap_batches batches a
    window, windows alternating overlapped and sequential."""
    one_step = config.copy_and_resolve_references()
    one_step.sample.num_steps = 1
    batch = config.bench.sample_batch_size
    # One device: the stamping callbacks would gather a sharded batch onto one device.
    mesh = parallel.create_mesh(jax.local_devices()[:1])
    params = parallel.replicate(params, mesh)
    sample_fn = sampling.make_sample_fn(one_step, model, mesh, batch)
    labels = sampling.default_labels(batch * config.bench.gap_batches, config.model.num_classes)
    gaps = {True: [], False: []}
    batch_gaps_s(sample_fn, params, labels[:2 * batch], batch, mesh, True)  # compile, warm up
    for _ in range(config.bench.windows):
        for overlap in gaps:
            gaps[overlap] += batch_gaps_s(sample_fn, params, labels, batch, mesh, overlap)
    result = {"eval_batch_gap_ms": 1e3 * statistics.median(gaps[True]),
              "eval_batch_gap_ms_sequential": 1e3 * statistics.median(gaps[False])}
    logging.info("eval: device idle between sampling batches of %d: %.2f ms overlapped, %.2f ms "
                 "sequential (medians of %d gaps each)", batch, result["eval_batch_gap_ms"],
                 result["eval_batch_gap_ms_sequential"], len(gaps[True]))
    return result


def fid_arithmetic_s(num_samples: int, windows: int) -> float:
    """Seconds of FID's host arithmetic on num_samples 2048-d features: mean and covariance
    (timed on min(num_samples, 5,000) random features, scaled linearly in N) and the Frechet
    distance against a second Gaussian (its matrix square roots do not depend on N)."""
    timed_n = min(num_samples, 5_000)
    features = np.random.default_rng(0).standard_normal((timed_n, 2048), dtype=np.float32)
    stats_s, distance_s = [], []
    for _ in range(windows):
        start = time.perf_counter()
        mu, sigma = metrics.feature_statistics(features)
        stats_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        metrics.frechet_distance(mu, sigma, mu + 0.1, sigma * 1.1)
        distance_s.append(time.perf_counter() - start)
    return (statistics.median(stats_s) * num_samples / timed_n + statistics.median(distance_s))


def project_eval(config: ml_collections.ConfigDict, inception_flops: float, host_s: float,
                 chips: dict[str, float], dinov2_flops: float = 0.0
                 ) -> dict[str, dict[str, float]]:
    """--mode=eval on config.eval.num_samples samples per accelerator of `chips` (name -> peak
    FLOP/s) at PROJECTED_MFU: sampling (config.sample's NFE, doubled by classifier-free
    guidance, times the U-Net's analytic forward FLOPs), Inception features (XLA's count),
    DINOv2 features (`dinov2_flops` per image, 0 without fd_dinov2), and `host_s` of host work
    that does not overlap the device."""
    sample = config.sample
    guided = config.model.num_classes > 0 and sample.guidance_scale != 1.0
    forward = unet_forward_flops(config.model, config.data.image_size, config.data.channels)
    n = config.eval.num_samples
    table = {}
    for chip, peak in chips.items():
        rate = PROJECTED_MFU * peak
        sampling_s = n * sample.num_steps * (2 if guided else 1) * forward / rate
        features_s = n * inception_flops / rate
        dinov2_s = n * dinov2_flops / rate
        table[chip] = {"sampling_s": sampling_s, "inception_s": features_s, "dinov2_s": dinov2_s,
                       "host_s": host_s, "total_s": sampling_s + features_s + dinov2_s + host_s}
    return table


def bench_eval(config: ml_collections.ConfigDict, mesh, model, params,
               sample_img_per_s: float | None, chips: dict[str, float]) -> dict:
    """`eval`: img/s of Inception features (resize to 299 included) at config.eval.batch_size
    on 32x32x3 uint8 images, JAX and torch-fidelity side by side (median over
    config.bench.windows alternating windows of one batch each, after one warm-up batch); the
    device idle time between sampling batches, overlapped and sequential (`_gaps`); and the
    --mode=eval time on config.eval.num_samples samples: here in sequence from the measured
    rates (`eval_projected_s`, with `sample_img_per_s` from the `sample` part when measured), and
    per accelerator of `chips` from the FLOPs (`eval_projected_s_by_chip`, project_eval) plus
    the host work measured here that does not overlap the device (the gaps between batches and,
    when config.eval.metrics has fid, FID's arithmetic)."""
    batch = config.eval.batch_size
    images = np.random.default_rng(config.bench.seed).integers(0, 256, (batch, 32, 32, 3),
                                                               dtype=np.uint8)
    module, variables = _random_inception()
    sides = {"jax": _jax_extractor(module, variables, batch, mesh)}
    torch_side = torch_fidelity_extractor()
    if torch_side is not None:
        sides["torch_fidelity"] = torch_side
    seconds = {name: [] for name in sides}
    for extract in sides.values():
        extract(images)  # compile / first-run costs
    for _ in range(config.bench.windows):
        for name, extract in sides.items():
            start = time.perf_counter()
            extract(images)
            seconds[name].append(time.perf_counter() - start)
    rate = {name: batch / statistics.median(s) for name, s in seconds.items()}
    result = {"inception_img_per_s": rate["jax"],
              "inception_torch_fidelity_img_per_s": rate.get("torch_fidelity"),
              "inception_ratio_vs_torch_fidelity":
                  rate["jax"] / rate["torch_fidelity"] if "torch_fidelity" in rate else None,
              "inception_batch": batch}
    logging.info("eval: Inception %.1f img/s (JAX), %s (torch-fidelity), batch %d", rate["jax"],
                 f"{rate['torch_fidelity']:.1f} img/s" if "torch_fidelity" in rate else "n/a",
                 batch)
    n = config.eval.num_samples
    wanted = comma_list(config.eval.metrics, "config.eval.metrics")
    dinov2_flops = 0.0
    if "fd_dinov2" in wanted:
        result["dinov2_img_per_s"] = _dinov2_rate(batch, mesh, images, config.bench.windows)
        dinov2_flops = result["dinov2_flops_per_img"] = dinov2_flops_per_image(dinov2.DINOv2())
        logging.info("eval: DINOv2 ViT-L/14 %.2f img/s (JAX), batch %d",
                     result["dinov2_img_per_s"], batch)
    result["eval_projected_s"] = (
        n / sample_img_per_s + n / rate["jax"] + n / result.get("dinov2_img_per_s", np.inf)
        if sample_img_per_s else None)
    result.update(_gaps(config, model, params))
    result["inception_flops_per_img"] = inception_flops_per_image(
        module, variables, 32, 3, config.eval.inception_preprocess)
    wants_fid = "fid" in wanted
    result["eval_fid_arithmetic_s"] = (fid_arithmetic_s(n, config.bench.windows) if wants_fid
                                       else 0.0)
    batches = -(-n // config.sample.batch_size) + -(-n // batch)
    host_s = batches * result["eval_batch_gap_ms"] / 1e3 + result["eval_fid_arithmetic_s"]
    result["eval_projected_s_by_chip"] = project_eval(
        config, result["inception_flops_per_img"], host_s, chips, dinov2_flops)
    for chip, row in result["eval_projected_s_by_chip"].items():
        logging.info("eval: %d samples on one %s at %.0f%% MFU: sampling %.0f s + Inception "
                     "%.0f s + DINOv2 %.0f s + host %.1f s = %.1f min", n, chip,
                     100 * PROJECTED_MFU, row["sampling_s"], row["inception_s"], row["dinov2_s"],
                     row["host_s"], row["total_s"] / 60)
    return result
