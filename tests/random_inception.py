"""Fixed random weights for the FID Inception-v3, with pytorch-fid's names and shapes, scaled so
that activations stay O(1) through all 94 conv layers (tests compare implementations on them)."""
import numpy as np

from jax_diffusion.evaluation import expected_weight_shapes


def random_inception_weights(seed: int = 8) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_weight_shapes().items():
        if name.endswith("conv.weight"):
            value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif name == "fc.weight":
            value = rng.normal(size=shape) / np.sqrt(shape[1])
        elif name.endswith("running_var"):
            value = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("bn.weight"):
            value = rng.uniform(0.8, 1.2, shape)
        else:  # BatchNorm bias and running mean, fc bias
            value = rng.normal(size=shape) * 0.1
        weights[name] = value.astype(np.float32)
    return weights
