"""The PyTorch yardstick (jax_diffusion/bench/torch_yardstick.py) is the project's U-Net: the same
parameter count as the Flax model for the published configs, improved-diffusion's parameter names
(the converter's layout loads into it with strict=True), and the same outputs on the same random,
non-zero weights; its training step learns and its benchmark reports throughputs."""
import os

import jax
import numpy as np
import pytest
from convert_helpers import jax_forward, load_config, random_inputs, random_state_dict, small
from tiny_config import ROOT
from torch_reference import import_torch

from jax_diffusion.convert.layouts import abstract_params
from jax_diffusion.convert.weights import params_from_state_dict

torch = import_torch()

from jax_diffusion.bench import torch_yardstick  # noqa: E402  (imports torch)

TOL = 1e-4


@pytest.mark.parametrize("name, params", [("cifar10", 35_746_307),
                                          ("cifar10_improved", 52_552_070)])
def test_parameter_count_is_the_flax_models(name, params):
    config = load_config(name)
    flax_count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract_params(config)))
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = torch_yardstick.create_model(config)
    assert torch_yardstick.parameter_count(model) == flax_count == params


# Integration: networks run in Flax and in PyTorch. In `make test`, not in `make test-fast`.
@pytest.mark.slow
@pytest.mark.parametrize("name, overrides", [
    ("cifar10", {}),  # tf_same downsampling, [sin | cos] with freq_shift 1, eps 1e-6
    ("cifar10_improved", {"num_res_blocks": 2}),  # AdaGN, 4 heads, learned sigma, labels
    ("cifar10_improved", {"resblock_updown": True, "num_head_channels": 16}),
    ("cifar10", {"conv_resample": False}),
    ("cifar10_improved", {"num_groups": 8}),  # every GroupNorm, the attention's included
])
def test_same_outputs_as_flax_on_the_same_weights(name, overrides):
    config = small(load_config(name), **overrides)
    model = torch_yardstick.create_model(config).eval()
    state = random_state_dict(model, seed=0)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x, t, y = random_inputs(config, 3, seed=1)
    with torch.no_grad():
        ours = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t),
                     None if y is None else torch.from_numpy(y)).numpy().transpose(0, 2, 3, 1)
    flax = jax_forward(config, params_from_state_dict(state, config, "improved_diffusion", "test"),
                       x, t, y)
    assert ours.shape == flax.shape
    assert np.abs(ours - flax).max() < TOL * max(1.0, np.abs(flax).max())
    assert np.abs(flax).mean() > 0.01  # the comparison is not between two near-zero outputs


@pytest.mark.slow
def test_train_step_lowers_the_loss_on_a_fixed_batch():
    config = small(load_config("cifar10"), dropout=0.0, attention_resolutions=(4,))
    config.data.image_size = 8
    config.train.lr = 1e-3
    torch.manual_seed(0)
    model = torch_yardstick.create_model(config)
    step = torch_yardstick.make_train_step(model, config, "float32")
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    losses = [float(step(x0, None)) for _ in range(16)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4])


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_benchmark_reports_positive_throughputs(dtype):
    config = small(load_config("cifar10_improved"))
    result = torch_yardstick.benchmark(config, batch=2, fwd_batch=2, dtype=dtype, device="cpu",
                                       warmup=1, steps=1)
    assert result["params"] == torch_yardstick.parameter_count(
        torch_yardstick.create_model(config))
    assert result["train_img_per_s"] > 0 and result["fwd_img_per_s"] > 0


def test_no_library_module_imports_the_yardstick():
    """PyTorch is a bench-only dependency: only scripts and tests import the yardstick."""
    for folder, _, files in os.walk(os.path.join(ROOT, "jax_diffusion")):
        for name in files:
            if name.endswith(".py") and name != "torch_yardstick.py":
                with open(os.path.join(folder, name)) as file:
                    assert "torch_yardstick" not in file.read(), os.path.join(folder, name)
