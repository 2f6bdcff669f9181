"""U-Net tests: published parameter counts, FLOPs vs XLA, shapes, conditioning, dropout, bf16,
config errors."""
import importlib.util
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jax_diffusion.bench.flops import train_flops_per_image, unet_forward_flops
from jax_diffusion.errors import ConfigError
from jax_diffusion.models import create_model
from jax_diffusion.models.embeddings import timestep_embedding
from jax_diffusion.models.layers import GroupNorm, ResBlock

# Model inits use rbg keys: a threefry init compiles ~3x slower on CPU, and the key's kind is
# irrelevant here.
KEY = jax.random.key(0, impl="rbg")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def load_config(name: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"configs_{name}",
                                                  os.path.join(CONFIGS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def tiny_config(**overrides) -> ml_collections.ConfigDict:
    """A 2-level, 32-channel U-Net (attention at 8x8): compiles in seconds on a CPU."""
    cfg = load_config("default").model
    cfg.update(dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                    num_heads=2, dropout=0.1))
    cfg.update(overrides)
    return cfg


def count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def abstract_params(cfg, image_size: int, channels: int):
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(create_model(cfg).init, jax.random.key(0), x, t)


def perturb_zero_leaves(variables, seed: int, scale: float = 1.0):
    """Give every all-zero leaf (zero-initialised convs/projections and biases) random values:
    kernels N(0, scale^2 / fan_in), vectors N(0, (0.1 * scale)^2).

    numpy, not jax.random: eager jax.random would compile one kernel per leaf shape.
    """
    rng = np.random.default_rng(seed)

    def perturb(leaf):
        leaf = np.asarray(leaf)
        if np.any(leaf != 0):
            return leaf
        std = scale / math.sqrt(math.prod(leaf.shape[:-1])) if leaf.ndim >= 2 else 0.1 * scale
        return (std * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

    return jax.tree.map(perturb, variables)


# ---------------------------------------------------------------- published architectures


@pytest.mark.parametrize("name, expected",
                         [("cifar10", 35_746_307), ("cifar10_improved", 52_552_070)])
def test_parameter_count_matches_published_model(name, expected):
    variables = abstract_params(load_config(name).model, 32, 3)
    assert set(variables) == {"params"}
    assert count(variables) == expected


def test_improved_model_has_null_label_row_and_scale_shift_projections():
    params = abstract_params(load_config("cifar10_improved").model, 32, 3)["params"]
    assert params["embed"]["label_embed"]["embedding"].shape == (11, 512)
    assert params["down1_res0"]["emb_proj"]["kernel"].shape == (512, 2 * 256)
    assert params["conv_out"]["kernel"].shape == (3, 3, 128, 6)  # learned sigma: 2C outputs


@pytest.mark.parametrize("skip_conv3x3, scale_shift",
                         [(False, False), (True, False), (False, True)])
def test_resblock_layout(skip_conv3x3, scale_shift):
    c_in, c_out, emb = 32, 64, 128
    block = ResBlock(c_out, use_scale_shift_norm=scale_shift, skip_conv3x3=skip_conv3x3)
    x, e = jnp.zeros((1, 8, 8, c_in)), jnp.zeros((1, emb))
    variables = jax.eval_shape(lambda key: block.init(key, x, e, False), jax.random.key(0))
    k = 3 if skip_conv3x3 else 1
    expected = (2 * c_in + 9 * c_in * c_out + c_out                        # norm1, conv1
                + emb * c_out * (2 if scale_shift else 1)                  # emb_proj
                + c_out * (2 if scale_shift else 1)
                + 2 * c_out + 9 * c_out * c_out + c_out                    # norm2, conv2
                + k * k * c_in * c_out + c_out)                            # skip
    assert count(variables) == expected


@pytest.mark.parametrize("num_groups, reaches", [(32, False), (8, True)])
def test_the_embedding_reaches_a_32_channel_resblock_only_with_fewer_groups(num_groups, reaches):
    """DDPM's ResBlock adds the time-and-label embedding per channel just before norm2: at 32
    channels in 32 groups (the digits demo's first level) the norm subtracts it again, so the
    block's output ignores the embedding; in 8 groups of 4 channels it does not."""
    block = ResBlock(32, num_groups=num_groups)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 8, 32)).astype(np.float32)
    emb_a, emb_b = rng.standard_normal((2, 2, 128)).astype(np.float32)
    variables = perturb_zero_leaves(block.init(KEY, x, emb_a, False), 4)  # conv2 is zero-init
    apply = jax.jit(block.apply, static_argnums=3)
    diff = float(jnp.max(jnp.abs(apply(variables, x, emb_a, False)
                                 - apply(variables, x, emb_b, False))))
    assert (diff > 1e-2) if reaches else (diff < 1e-4), diff


def test_num_groups_reaches_every_group_norm_and_changes_no_parameter_shape():
    """config.model.num_groups sets the groups of every GroupNorm (ResBlocks' norm1 and norm2,
    attention's norm, norm_out); the parameter tree is the 32-group model's."""
    x, t = jax.ShapeDtypeStruct(X.shape, jnp.float32), jax.ShapeDtypeStruct(T.shape, jnp.int32)
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, GroupNorm) and context.method_name == "__call__":
            seen.append((context.module.name, context.module.num_groups))
        return next_fun(*args, **kwargs)

    shapes = {}
    for groups in (8, 32):
        seen.clear()
        with nn.intercept_methods(record):
            variables = jax.eval_shape(create_model(tiny_config(num_groups=groups)).init,
                                       KEY, x, t)
        shapes[groups] = jax.tree.map(jnp.shape, variables)
        n_norms = sum(1 for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]
                      if "norm" in str(path[-2]) and str(path[-1]) == "['scale']")
        assert len(seen) == n_norms > 10
        assert {g for _, g in seen} == {groups}
    assert shapes[8] == shapes[32]
    assert create_model(load_config("default").model).num_groups == 32


def test_timestep_embedding_is_the_sinusoid():
    t = jnp.array([0, 7, 999])
    emb = np.asarray(timestep_embedding(t, 8))
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    args = np.array([0, 7, 999])[:, None] * freqs
    np.testing.assert_allclose(emb, np.concatenate([np.cos(args), np.sin(args)], -1), atol=1e-4)


def test_timestep_embedding_ddpm_convention():
    """Ho et al.: f_i = exp(-log(10000) i / (half - 1)), [sin | cos]; float t as well."""
    t = np.array([0.0, 7.5, 249.75])
    emb = np.asarray(timestep_embedding(jnp.asarray(t, jnp.float32), 8, freq_shift=1,
                                        flip_sin_to_cos=False))
    args = t[:, None] * np.exp(-np.log(10000.0) * np.arange(4) / 3)
    np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], -1), atol=1e-4)
    assert abs(args[2, 3] - 249.75 / 10000) < 1e-12  # the last frequency is exactly 1 / 10000


def test_rescale_timesteps_feeds_t_times_1000_over_T():
    from jax_diffusion.diffusion import create_diffusion
    config = load_config("cifar10_improved")
    assert config.diffusion.rescale_timesteps
    diffusion = create_diffusion(config.diffusion, "ddim10")
    t = jnp.arange(10)
    got = diffusion.timesteps_for_model(t)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.arange(0, 4000, 400) / 4.0)
    plain = create_diffusion(load_config("cifar10").diffusion, "ddim10").timesteps_for_model(t)
    assert plain.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(plain), np.arange(0, 1000, 100))


# ---------------------------------------------------------------- FLOPs


def xla_flops(cfg, image_size: int, channels: int, compile_: bool) -> float:
    model = create_model(cfg)
    variables = abstract_params(cfg, image_size, channels)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    lowered = jax.jit(model.apply).lower(variables, x, t)
    analysis = lowered.compile().cost_analysis() if compile_ else lowered.cost_analysis()
    return analysis["flops"]


@pytest.mark.slow  # compiles the full-size published models
@pytest.mark.parametrize("name", ["cifar10", "cifar10_improved"])
def test_forward_flops_of_published_models_match_xla(name):
    cfg = load_config(name).model
    nominal, as_computed = (unet_forward_flops(cfg, 32, 3),
                            unet_forward_flops(cfg, 32, 3, as_computed=True))
    measured = xla_flops(cfg, 32, 3, compile_=True)
    # XLA counts only the non-padding taps of each convolution, so it is a few % below the dense
    # count.
    assert abs(as_computed - measured) / measured < 0.10, (as_computed, measured)
    assert train_flops_per_image(cfg, 32, 3) == 3 * nominal
    assert train_flops_per_image(cfg, 32, 3, as_computed=True) == 3 * as_computed
    if name == "cifar10":
        assert 12.3e9 < nominal < 12.5e9  # the published ~12.4 GFLOPs
        # The three upsampling convolutions (256 channels, to 8x8, 16x16, 32x32) run 4 of their 9
        # taps.
        upsampling = sum(2 * size * size * 9 * 256 * 256 for size in (8, 16, 32))
        assert nominal - as_computed == upsampling * 5 // 9


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(resblock_updown=True, use_scale_shift_norm=True, learn_sigma=True, num_classes=10),
    dict(conv_resample=False, ch_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16, 8)),
])
def test_forward_flops_of_small_models_match_xla(overrides):
    cfg = tiny_config(**{"attention_resolutions": (16,), **overrides})
    analytic = unet_forward_flops(cfg, 32, 3, as_computed=True)
    measured = xla_flops(cfg, 32, 3, compile_=False)
    assert abs(analytic - measured) / measured < 0.10, (analytic, measured)
    if cfg.conv_resample or cfg.resblock_updown:
        assert analytic < unet_forward_flops(cfg, 32, 3)
    else:
        assert analytic == unet_forward_flops(cfg, 32, 3)


# ---------------------------------------------------------------- shapes


@pytest.mark.parametrize("image_size, channels, overrides", [
    (8, 1, dict(attention_resolutions=(4,), conv_resample=False)),
    (32, 1, dict(ch_mult=(1, 2, 2), attention_resolutions=(16, 8), num_head_channels=32,
                 learn_sigma=True)),
])
def test_output_shape(image_size, channels, overrides):
    cfg = tiny_config(**overrides)
    model = create_model(cfg)
    x = (np.random.default_rng(1).standard_normal((2, image_size, image_size, channels))
         .astype(np.float32))
    t = jnp.array([0, 999])
    variables = perturb_zero_leaves(jax.jit(model.init)(KEY, x, t), 2)
    out = jax.jit(model.apply)(variables, x, t)
    out_channels = channels * (2 if cfg.learn_sigma else 1)
    assert out.shape == (2, image_size, image_size, out_channels)
    assert out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0


# ---------------------------------------------------------------- conditioning, dropout, zero init

X = np.random.default_rng(10).standard_normal((2, 16, 16, 3)).astype(np.float32)
T = jnp.array([3, 700])
COND = dict(num_classes=10, use_scale_shift_norm=True, learn_sigma=True, resblock_updown=True)


@pytest.fixture(scope="module")
def cond():
    """Class-conditional AdaGN model with BigGAN up/down ResBlocks, learned sigma.

    Returns its fresh variables, the variables with perturbed zero-init layers, and a jitted apply.
    """
    model = create_model(tiny_config(**COND))
    variables = jax.jit(model.init)(KEY, X, T)
    perturbed = perturb_zero_leaves(variables, 1)
    apply = jax.jit(model.apply, static_argnames="train")
    return variables, perturbed, apply


def test_conditional_model_output_shape(cond):
    _, params, apply = cond
    out = apply(params, X, T, jnp.array([1, 2]))
    assert out.shape == (2, 16, 16, 6) and out.dtype == jnp.float32  # learn_sigma: 2C channels
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0


def test_variables_are_float32_params_only(cond):
    variables, _, _ = cond
    assert set(variables) == {"params"}
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}


def test_zero_initialised_output_layer(cond):
    variables, _, apply = cond
    assert bool(jnp.all(apply(variables, X, T, jnp.array([1, 2])) == 0))
    params = dict(variables["params"])
    params["conv_out"] = perturb_zero_leaves(params["conv_out"], 3)
    assert float(jnp.mean(jnp.abs(apply({"params": params}, X, T, jnp.array([1, 2]))))) > 1e-3


def test_dropout_only_when_training(cond):
    _, params, apply = cond
    y = jnp.array([1, 2])
    eval_a = apply(params, X, T, y)
    eval_b = apply(params, X, T, y, rngs={"dropout": jax.random.key(5)})
    train_a = apply(params, X, T, y, train=True, rngs={"dropout": jax.random.key(1)})
    train_a2 = apply(params, X, T, y, train=True, rngs={"dropout": jax.random.key(1)})
    train_b = apply(params, X, T, y, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(train_a, train_a2)
    assert float(jnp.max(jnp.abs(train_a - train_b))) > 1e-3
    assert float(jnp.max(jnp.abs(train_a - eval_a))) > 1e-3


def test_labels_condition_the_output_and_none_is_the_null_label(cond):
    _, params, apply = cond
    out_0 = apply(params, X, T, jnp.array([0, 0]))
    out_5 = apply(params, X, T, jnp.array([5, 5]))
    out_null = apply(params, X, T, jnp.array([10, 10]))
    out_none = apply(params, X, T, None)
    assert float(jnp.max(jnp.abs(out_0 - out_5))) > 1e-3
    assert float(jnp.max(jnp.abs(out_0 - out_null))) > 1e-3
    np.testing.assert_array_equal(out_none, out_null)


def test_float_timesteps_equal_integer_ones(cond):
    """rescale_timesteps feeds float t: the U-Net takes it, and integral floats change nothing."""
    _, params, apply = cond
    y = jnp.array([1, 2])
    ints = apply(params, X, T, y)
    floats = apply(params, X, T.astype(jnp.float32), y)
    np.testing.assert_array_equal(np.asarray(ints), np.asarray(floats))
    halves = apply(params, X, T.astype(jnp.float32) + jnp.array([0.5, 0.0]), y)
    assert float(jnp.max(jnp.abs(halves - ints)[0])) > 1e-4


def test_labels_on_an_unconditional_model_raise():
    model = create_model(tiny_config())
    with pytest.raises(ValueError, match="num_classes=0"):
        jax.eval_shape(model.init, jax.random.key(0), X, T, jnp.array([1, 2]))


def test_remat_checkpoints_every_resblock_and_keeps_the_values():
    cfg = tiny_config(ch_mult=(1,), attention_resolutions=(), dropout=0.0)
    x, t = X[:1, :8, :8], T[:1]
    params = perturb_zero_leaves(jax.jit(create_model(cfg).init)(KEY, x, t), 1)
    outputs, remats = [], []
    for remat in (False, True):
        model = create_model(tiny_config(**{**cfg, "remat": remat}))
        outputs.append(jax.jit(model.apply)(params, x, t))
        grad_fn = jax.grad(lambda p, model=model: jnp.sum(model.apply(p, x, t)))
        grad_jaxpr = str(jax.make_jaxpr(grad_fn)(params))
        remats.append(len(re.findall(r"\bremat\w*", grad_jaxpr)))
    n_resblocks = sum("_res" in name for name in params["params"])
    assert remats == [0, n_resblocks]
    np.testing.assert_allclose(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bfloat16


def test_bfloat16_model_keeps_float32_params_and_matches_float32(cond):
    variables, _, apply_f32 = cond
    # Residual branches and output layer at 10% of the init scale, like a network early in training.
    # (At full scale the error of this random net reaches ~2%: rounding only the params and the
    # input to bf16 already costs ~0.7% there, so that setting measures the net's sensitivity, not
    # the casts.)
    params = perturb_zero_leaves(variables, 4, scale=0.1)
    model_bf16 = create_model(tiny_config(dtype="bfloat16", **COND))
    init_dtypes = {leaf.dtype for leaf in jax.tree.leaves(jax.eval_shape(model_bf16.init,
                                                                         jax.random.key(0), X, T))}
    assert init_dtypes == {jnp.dtype(jnp.float32)}
    y = jnp.array([1, 2])
    ref = apply_f32(params, X, T, y)
    out = jax.jit(model_bf16.apply)(params, X, T, y)
    assert out.dtype == jnp.float32
    # Relative RMS error ||out - ref|| / ||ref||: bf16 keeps 8 significant bits (0.4% per rounding),
    # so a correct mixed-precision net lands near 1%; a wrong cast or lost term is O(1).
    rel_rms = float(jnp.sqrt(jnp.mean((out - ref) ** 2) / jnp.mean(ref ** 2)))
    assert rel_rms < 2e-2, rel_rms
    assert float(jnp.sqrt(jnp.mean(ref ** 2))) > 1e-2  # the comparison is not trivially 0 == 0


def test_bfloat16_lowering_runs_convolutions_and_matmuls_in_bf16(cond):
    _, params, _ = cond
    model = create_model(tiny_config(dtype="bfloat16", **COND))
    text = jax.jit(model.apply).lower(params, X, T, jnp.array([1, 2])).as_text()
    convs = re.findall(r"stablehlo\.convolution.*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    n_conv_kernels = sum(leaf.ndim == 4 for leaf in jax.tree.leaves(params))
    # An upsampling ResBlock's conv1 runs as four sub-pixel convolutions (models/upsample_conv.py).
    n_upsampling = sum(name.endswith("_upsample") for name in params["params"])
    assert n_upsampling > 0
    assert len(convs) == n_conv_kernels + 3 * n_upsampling
    assert all(a.endswith("xbf16>") and b.endswith("xbf16>") for a, b in convs), convs
    dots = re.findall(r"stablehlo\.dot_general.*: \((tensor<[^>]*>), (tensor<[^>]*>)\)", text)
    assert len(dots) > 0
    assert all(a.endswith("xbf16>") and b.endswith("xbf16>") for a, b in dots), dots
    assert "f64" not in text


# ---------------------------------------------------------------- config errors


@pytest.mark.parametrize("overrides, message", [
    (dict(ch=48), r"config\.model\.ch=48 must be divisible by config\.model\.num_groups=32 "
                  r"\(GroupNorm groups\): use a positive multiple of 32 .* or "
                  r"config\.model\.num_groups=24"),
    (dict(num_heads=3),
     r"config\.model\.num_heads=3 must be a positive divisor of the 64 channels"),
    (dict(num_head_channels=48),
     r"config\.model\.num_head_channels=48 must divide the 64 channels"),
    (dict(dtype="float16"),
     r"config\.model\.dtype='float16' must be one of \['bfloat16', 'float32'\]"),
])
def test_bad_config_raises_at_create_model(overrides, message):
    with pytest.raises(ValueError, match=message):
        create_model(tiny_config(**overrides))


@pytest.mark.parametrize("overrides, message", [
    (dict(num_groups=0), "config.model.num_groups=0 must be a positive integer dividing "
                         "config.model.ch"),
    (dict(num_groups=-8), "config.model.num_groups=-8 must be a positive integer"),
    (dict(num_groups=12), "config.model.ch=32 must be divisible by config.model.num_groups=12"),
    (dict(num_groups=64), "config.model.ch=32 must be divisible by config.model.num_groups=64"),
])
def test_num_groups_errors_are_one_config_error_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        create_model(tiny_config(**overrides))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_num_groups_dividing_ch_is_accepted_at_any_width():
    for ch, groups in ((32, 8), (48, 16), (8, 8), (32, 1)):
        create_model(tiny_config(ch=ch, num_groups=groups))


@pytest.mark.parametrize("image_size, overrides, message", [
    (8, dict(attention_resolutions=(16,)),
     r"config\.model\.attention_resolutions=\(16,\) contains 16, .* image size 8 .* "
     r"allowed sizes: \(8, 4\)"),
    # the middle (64 ch) is fine, 16x16 has 32
    (16, dict(attention_resolutions=(16,), num_head_channels=64),
     r"config\.model\.num_head_channels=64 must divide the 32 channels"),
    (10, dict(ch_mult=(1, 2, 2), attention_resolutions=()),
     r"config.data.image_size=10 must be divisible by 4"),
])
def test_bad_config_for_the_image_size_raises_when_called(image_size, overrides, message):
    model = create_model(tiny_config(**overrides))
    x = jnp.zeros((1, image_size, image_size, 3))
    with pytest.raises(ValueError, match=message):
        jax.eval_shape(model.init, jax.random.key(0), x, jnp.zeros((1,), jnp.int32))


@pytest.mark.parametrize("name", ["cifar10", "cifar10_improved"])
def test_experiment_configs_only_override_existing_keys(name):
    def keys(cfg, prefix=""):
        out = set()
        for k, v in cfg.items():
            out |= (keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict)
                    else {prefix + k})
        return out

    assert keys(load_config(name)) == keys(load_config("default"))
