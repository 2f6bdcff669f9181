"""The benchmark without timing anything: the analytic training FLOPs against XLA's count of the
compiled train step, the MFU arithmetic and peak table, the config parsers, and the parsing and
ratio helpers of scripts/bench_vs_torch.py on fake runs, and that the XLA:CPU convolution flag
takes effect. `--mode=bench` itself runs end to end in test_main.py."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest
from tiny_config import ROOT, tiny_config

from jax_diffusion.bench import run as bench
from jax_diffusion.bench.flops import train_flops_per_image, unet_forward_flops
from jax_diffusion.models import create_model
from jax_diffusion.runtime import cpu_flags
from jax_diffusion.runtime import parallel
from jax_diffusion.training.train_state import abstract_train_state, create_optimizer
from jax_diffusion.training.train_step import make_train_step


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "bench_vs_torch", os.path.join(ROOT, "scripts", "bench_vs_torch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_vs_torch = _load_script()


@pytest.mark.slow  # compiles the full CIFAR models
# ---------------------------------------------------------------- FLOPs behind the MFU
def test_train_flops_per_image_match_xla_cost_analysis():
    """The analytic count (as computed: the upsampling convolution at 4 of 9 taps, flops.py) is
    within 10% of XLA's count for the compiled train step (forward, backward, optimizer) on one
    device: measured 2.2% above it at 32x32, since XLA skips the
    convolution taps on zero padding, and XLA's train step is 3.03x its forward pass (the 3x
    rule: backward = two matmuls per forward one; the input image needs no gradient, and the
    elementwise ops and the optimizer add a little)."""
    config = tiny_config(data__image_size=32, data__channels=3, model__ch_mult=(1, 2),
                         model__attention_resolutions=(16,))
    batch, size = 8, 32
    mesh = parallel.create_mesh(jax.devices()[:1])  # cost_analysis is per device
    model = create_model(config.model)
    tx = create_optimizer(config.train)
    train_step = make_train_step(config, model, tx, mesh)
    state = abstract_train_state(config, model)
    batches = {"image": jax.ShapeDtypeStruct((1, batch, size, size, 3), jnp.float32),
               "label": jax.ShapeDtypeStruct((1, batch), jnp.int32)}
    xla_train = train_step.lower(state, batches).compile().cost_analysis()["flops"] / batch
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    t = jax.ShapeDtypeStruct((batch,), jnp.int32)
    forward = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
    xla_forward = forward.lower(state.params, x, t, t).compile().cost_analysis()["flops"] / batch

    analytic = train_flops_per_image(config.model, size, 3, as_computed=True)
    assert analytic == 3 * unet_forward_flops(config.model, size, 3, as_computed=True)
    assert abs(analytic - xla_train) / xla_train < 0.10, (analytic, xla_train)
    assert 2.9 < xla_train / xla_forward < 3.2, (xla_train, xla_forward)


def test_achieved_tflops_and_mfu_by_construction():
    """achieved = FLOPs per image x img/s; MFU divides by the peak of every device."""
    achieved, mfu = bench.flop_rates(37_000_000_000, 1000.0, "NVIDIA H100 80GB HBM3", 2)
    assert achieved == pytest.approx(37.0)
    assert mfu == pytest.approx(37e12 / (2 * 989e12))
    assert bench.flop_rates(37_000_000_000, 1000.0, "cpu", 1) == (pytest.approx(37.0), None)
    assert bench.flop_rates(37_000_000_000, None, "TPU v4", 1) == (None, None)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12), ("cpu", None),
])
def test_peak_flops_table(kind, peak):
    assert bench.peak_flops(kind) == peak


# ---------------------------------------------------------------- config parsing
def test_parse_steps_and_parts():
    assert bench.parse_steps(10) == (10,)
    assert bench.parse_steps("10,50, 250") == (10, 50, 250)
    assert bench.parse_parts("train, sample") == ("train", "sample")
    for bad in ("", "ten", "10,0"):
        with pytest.raises(ValueError, match="config.bench.sample_steps"):
            bench.parse_steps(bad)
    assert bench.parse_parts("data,host,checkpoint,memory,eval") == (
        "data", "host", "checkpoint", "memory", "eval")
    with pytest.raises(ValueError, match="unknown .'evals'.; allowed: train, fwd, sample, data, "
                                         "host, checkpoint, memory, eval"):
        bench.parse_parts("train,evals")


# ---------------------------------------------------------------- scripts/bench_vs_torch.py
def _jax(train, fwd):
    return {"framework": "jax", "train_img_per_s": train, "fwd_img_per_s": fwd}


def _torch(train, fwd):
    return {"framework": "pytorch", "train_img_per_s": train, "fwd_img_per_s": fwd}


def test_last_json_line_skips_progress_output():
    stdout = 'loading...\n{"not": "last"}\n{"train_img_per_s": 4.5, "fwd_img_per_s": null}\n\n'
    assert bench_vs_torch.last_json_line(stdout) == {"train_img_per_s": 4.5,
                                                     "fwd_img_per_s": None}
    for bad in ("", "done\n", "[1, 2]\n"):
        with pytest.raises(ValueError):
            bench_vs_torch.last_json_line(bad)


def test_summary_medians_and_ratios():
    jax_runs = {"float32": [_jax(10.0, 40.0), _jax(12.0, 44.0), _jax(30.0, 42.0)],
                "bfloat16": [_jax(6.0, None), _jax(8.0, None), _jax(7.0, None)]}
    torch_runs = {"float32": [_torch(5.0, 20.0), _torch(4.0, 22.0), _torch(6.0, 21.0)],
                  "bfloat16": [_torch(2.0, 10.0), _torch(3.5, 11.0), _torch(3.0, 12.0)]}
    split_runs = {"float32": [_jax(None, 50.0), _jax(None, 63.0), _jax(None, 60.0)],
                  "bfloat16": [_jax(None, 1.0), _jax(None, 2.0), _jax(None, 3.0)]}
    summary = bench_vs_torch.summarize(jax_runs, torch_runs, split_runs)
    assert summary["float32"] == {
        "jax_train_img_per_s": 12.0, "torch_train_img_per_s": 5.0, "train_ratio": 2.4,
        "jax_fwd_img_per_s": 42.0, "torch_fwd_img_per_s": 21.0, "fwd_ratio": 2.0,
        "jax_fwd_split_img_per_s": 60.0, "fwd_split_ratio": 60.0 / 21.0}
    assert summary["bfloat16"]["train_ratio"] == pytest.approx(7.0 / 3.0)
    assert summary["bfloat16"]["jax_fwd_img_per_s"] is None
    assert summary["bfloat16"]["fwd_ratio"] is None
    lines = bench_vs_torch.format_summary(summary)
    assert len(lines) == 6 and "2.40" in lines[0] and "2.86" in lines[2] and "n/a" in lines[4]
    assert len(bench_vs_torch.format_summary(bench_vs_torch.summarize(jax_runs, torch_runs))) == 4


def test_side_by_side_commands_are_the_documented_ones():
    """Same batches on both sides; bf16 switches the JAX compute dtype and torch autocast."""
    jax_command = bench_vs_torch.jax_command("bfloat16", "/tmp/w")
    assert "--mode=bench" in jax_command and "--config.model.dtype=bfloat16" in jax_command
    assert any(arg.endswith("configs/cifar10.py") for arg in jax_command)
    assert "--config.bench.batch_size=8" in jax_command
    assert "--config.bench.sample_batch_size=16" in jax_command
    assert "--config.distributed.local_device_count=1" in jax_command
    split = bench_vs_torch.jax_command("float32", "/tmp/w", split_forward=True)
    assert "--config.bench.parts=fwd" in split and "--config.model.dtype=float32" in split
    devices = bench_vs_torch.CPU_DEVICES
    assert f"--config.distributed.local_device_count={devices}" in split and 16 % devices == 0
    torch_command = bench_vs_torch.torch_command("bfloat16")
    assert torch_command[1:3] == ["-m", "jax_diffusion.bench.torch_yardstick"]
    assert torch_command[3] == f"--config={os.path.join(ROOT, 'configs', 'cifar10.py')}"
    assert {"--batch=8", "--fwd-batch=16", "--dtype=bfloat16", "--device=cpu"} <= set(torch_command)
    assert "--dtype=float32" in bench_vs_torch.torch_command("float32")


# ------------------------------------------------------------------ XLA:CPU convolution flag
def test_fast_cpu_convolution_flag_is_added_once_and_respects_the_user():
    environ = {}
    cpu_flags.use_fast_cpu_convolutions(environ)
    assert environ["XLA_FLAGS"] == cpu_flags.EIGEN_CONVOLUTIONS
    environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/d"}
    cpu_flags.use_fast_cpu_convolutions(environ)
    cpu_flags.use_fast_cpu_convolutions(environ)
    assert environ["XLA_FLAGS"] == f"--xla_dump_to=/tmp/d {cpu_flags.EIGEN_CONVOLUTIONS}"
    users = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"}
    cpu_flags.use_fast_cpu_convolutions(users)
    assert users["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=individual_convolution"


def test_convolutions_compile_to_plain_xla_convolutions():
    """conftest.py applies the flag as main.py does. A U-Net-sized conv and its gradients then
    compile to plain `convolution` ops; without the flag XLA:CPU wraps them in YNNPACK custom
    fusions (`ynn_fusion`), whose kernel gradient is ~4x slower. Compiled, never run."""
    def loss(x, w):
        y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)

    x = jax.ShapeDtypeStruct((8, 32, 32, 128), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 128, 128), jnp.float32)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
    assert hlo.count(" convolution(") == 3  # forward, input gradient, kernel gradient
    assert "ynn_fusion" not in hlo


# ---------------------------------------------------------------- eval projection
def test_eval_projection_is_the_flop_count_over_the_projected_rate():
    """DDPM CIFAR-10, 50,000 samples of DDIM-100 on one H100 SXM at 40% MFU: 50,000 x 100 x
    12.44 GFLOP / (0.4 x 989 TFLOP/s) = 157 s (the README's 2.6 min); classifier-free guidance
    doubles the sampling FLOPs; Inception and host time add."""
    from jax_diffusion.bench import evaluation as bench_eval
    from jax_diffusion.config_files import load_config_file
    config = load_config_file(os.path.join(ROOT, "configs", "cifar10.py"))
    config.sample.num_steps, config.eval.num_samples = 100, 50_000
    forward = unet_forward_flops(config.model, 32, 3)
    assert 12.4e9 < forward < 12.5e9
    table = bench_eval.project_eval(config, 11e9, 3.0, {"H100 SXM": 989e12})
    row = table["H100 SXM"]
    assert row["sampling_s"] == pytest.approx(50_000 * 100 * forward / (0.4 * 989e12))
    assert 150 < row["sampling_s"] < 160
    assert row["inception_s"] == pytest.approx(50_000 * 11e9 / (0.4 * 989e12))
    assert row["total_s"] == pytest.approx(row["sampling_s"] + row["inception_s"] + 3.0)
    config.model.num_classes, config.sample.guidance_scale = 10, 2.0
    guided = bench_eval.project_eval(config, 11e9, 3.0, {"H100 SXM": 989e12})["H100 SXM"]
    assert guided["sampling_s"] == pytest.approx(2 * row["sampling_s"])
    config.sample.guidance_scale = 1.0  # a plain conditional model: one pass per step
    plain = bench_eval.project_eval(config, 11e9, 3.0, {"H100 SXM": 989e12})["H100 SXM"]
    assert plain["sampling_s"] == pytest.approx(row["sampling_s"])
