"""--mode=bench part `eval`: Inception feature extraction (the FID/IS/KID network) in img/s,
this project's Flax port against torch-fidelity's extractor on the same CPU and batch, in
alternating windows so that a shared machine's drift hits both alike; and the end-to-end time of
`--mode=eval` on config.eval.num_samples samples projected from the measured parts.

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

from jax_diffusion.evaluation import inception


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


def _jax_extractor(batch: int, mesh) -> Callable[[np.ndarray], None]:
    module = inception.FIDInceptionV3()
    variables = jax.jit(module.init)(jax.random.PRNGKey(0),
                                     jnp.zeros((1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)))

    def extract(images_uint8: np.ndarray) -> None:
        jax.block_until_ready(inception.inception_features(module, variables, images_uint8,
                                                           batch_size=batch, mesh=mesh))

    return extract


def bench_eval(config: ml_collections.ConfigDict, mesh, sample_img_per_s: float | None) -> dict:
    """`eval`: img/s of Inception features (resize to 299 included) at config.eval.batch_size
    on 32x32x3 uint8 images, JAX and torch-fidelity side by side (median over
    config.bench.windows alternating windows of one batch each, after one warm-up batch), and
    the projected --mode=eval time on config.eval.num_samples samples: sampling at
    `sample_img_per_s` (the `sample` part, when measured) plus feature extraction, in sequence
    (the upper bound: no overlap)."""
    batch = config.eval.batch_size
    images = np.random.default_rng(config.bench.seed).integers(0, 256, (batch, 32, 32, 3),
                                                               dtype=np.uint8)
    sides = {"jax": _jax_extractor(batch, mesh)}
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
    n = config.eval.num_samples
    result["eval_projected_s"] = (n / sample_img_per_s + n / rate["jax"]
                                  if sample_img_per_s else None)
    logging.info("eval: Inception %.1f img/s (JAX), %s (torch-fidelity), batch %d", rate["jax"],
                 f"{rate['torch_fidelity']:.1f} img/s" if "torch_fidelity" in rate else "n/a",
                 batch)
    return result
