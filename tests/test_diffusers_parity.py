"""The project's U-Net against diffusers' UNet2DModel on the same weights (converted by
jax_diffusion.convert): configs/cifar10.py is google/ddpm-cifar10-32's network, configs/
cifar10_improved.py improved-diffusion's (as diffusers builds it: scale-shift norm, 4 heads,
attention at 16 and 8, class embedding). Every tensor is random and non-zero, float32, inputs
x ~ N(0, 1) with random t and labels; each DDPM convention switched back breaks the parity."""
import numpy as np
import pytest
from convert_helpers import (
    diffusers_unet,
    jax_forward,
    load_config,
    random_inputs,
    small,
    torch_forward,
)

from jax_diffusion.convert.diffusers_config import unet2d_config
from jax_diffusion.convert.weights import params_from_state_dict

# Integration: networks run in Flax and in diffusers. In `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow

TOL = 1e-4


def converted_outputs(config, state, x, t, y=None):
    return jax_forward(config, params_from_state_dict(state, config, "diffusers", "test"), x, t, y)


def test_ddpm_config_is_google_ddpm_cifar10_32():
    """The facts of google/ddpm-cifar10-32's config.json (the architecture arguments)."""
    want = {"block_out_channels": [128, 256, 256, 256], "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
            "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6,
            "norm_num_groups": 32, "attention_head_dim": None, "resnet_time_scale_shift": "default",
            "in_channels": 3, "out_channels": 3, "sample_size": 32, "act_fn": "silu",
            "center_input_sample": False, "mid_block_scale_factor": 1, "num_class_embeds": None,
            "time_embedding_type": "positional"}
    got = unet2d_config(load_config("cifar10"))
    assert {k: got[k] for k in want} == want


def test_full_size_ddpm_matches_diffusers():
    config = load_config("cifar10")
    unet, state = diffusers_unet(config, seed=0)
    x, t, _ = random_inputs(config, 2, seed=1)
    ours, ref = converted_outputs(config, state, x, t), torch_forward(unet, x, t)
    diff = np.abs(ours - ref).max()
    print(f"full-size DDPM: max |ours - diffusers| = {diff:.2e} "
          f"(outputs up to {np.abs(ref).max():.1f})")
    assert diff <= TOL


def ddpm_small_case(seed=0, scale_conv_in=1.0):
    config = small(load_config("cifar10"))
    unet, state = diffusers_unet(config, seed=seed)
    if scale_conv_in != 1.0:  # tiny first activations: the first GroupNorms' eps then matters
        state = dict(state, **{k: state[k] * scale_conv_in
                               for k in ("conv_in.weight", "conv_in.bias")})
        unet, state = diffusers_unet(config, state)
    x, t, _ = random_inputs(config, 4, seed=seed + 1)
    return config, state, x, t, torch_forward(unet, x, t)


@pytest.mark.parametrize("scale_conv_in", [1.0, 1e-2])
def test_small_ddpm_matches_diffusers(scale_conv_in):
    config, state, x, t, ref = ddpm_small_case(scale_conv_in=scale_conv_in)
    diff = np.abs(converted_outputs(config, state, x, t) - ref).max()
    print(f"small DDPM, conv_in x {scale_conv_in}: max diff {diff:.2e}")
    assert diff <= TOL


def test_small_ddpm_with_8_groups_matches_diffusers():
    """config.model.num_groups=8 is diffusers' norm_num_groups=8; our 32 groups on the same
    weights (the negative control) are another function."""
    config = small(load_config("cifar10"), num_groups=8)
    unet, state = diffusers_unet(config, seed=5)
    assert unet.config.norm_num_groups == 8
    x, t, _ = random_inputs(config, 2, seed=6)
    ref = torch_forward(unet, x, t)
    diff = np.abs(converted_outputs(config, state, x, t) - ref).max()
    assert diff <= TOL, diff
    config.model.num_groups = 32
    assert np.abs(converted_outputs(config, state, x, t) - ref).max() > 100 * TOL


@pytest.mark.parametrize("key, wrong, scale_conv_in", [
    ("time_embedding_freq_shift", 0, 1.0),
    ("time_embedding_flip_sin_to_cos", True, 1.0),
    ("downsample_padding", "symmetric", 1.0),
    ("norm_eps", 1e-5, 1e-2),
])
def test_each_ddpm_convention_switched_back_breaks_parity(key, wrong, scale_conv_in):
    """Negative controls: the parity test sees every convention on its own. norm_eps alone moves
    the outputs by only ~3e-5 on these weights, so its control scales conv_in by 1e-2: the first
    GroupNorms then see a variance near their epsilon."""
    config, state, x, t, ref = ddpm_small_case(scale_conv_in=scale_conv_in)
    config.model[key] = wrong
    diff = np.abs(converted_outputs(config, state, x, t) - ref).max()
    print(f"{key}={wrong!r}: max diff {diff:.2e}")
    assert diff > 100 * TOL


@pytest.mark.parametrize("full_size", [False, True])
def test_improved_config_matches_diffusers_scale_shift_unet(full_size):
    """improved-diffusion's network as diffusers builds it, class-conditional, learned sigma, fed
    float timesteps (rescale_timesteps)."""
    config = load_config("cifar10_improved")
    if not full_size:
        config = small(config, ch=64, ch_mult=(1, 1), num_heads=4, attention_resolutions=(16, 8))
    unet, state = diffusers_unet(config, seed=3)
    assert unet.config.resnet_time_scale_shift == "scale_shift"
    assert unet.config.num_class_embeds == 11
    x, t, y = random_inputs(config, 2, seed=4, float_t=True)
    ours, ref = converted_outputs(config, state, x, t, y), torch_forward(unet, x, t, y)
    assert ours.shape[-1] == 6
    diff = np.abs(ours - ref).max()
    print(f"improved (full size {full_size}): max diff {diff:.2e}")
    assert diff <= TOL
