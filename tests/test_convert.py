"""--mode=import / --mode=export: a small random diffusers model saved with save_pretrained ->
Orbax checkpoint -> sampling; Orbax -> diffusers directory -> from_pretrained gives the same
outputs; improved-diffusion state dicts; bad inputs (one clear line, nothing written)."""
import builtins
import os
import subprocess

import flax
import numpy as np
import pytest
from cli_helpers import ENV, TIMEOUT, plain_command
from convert_helpers import diffusers_unet, load_config, random_inputs, small, torch_forward
from tiny_config import ROOT

from jax_diffusion import errors
from jax_diffusion.convert.readers import SAFETENSORS_NAME
from jax_diffusion.convert.run import run_export, run_import
from jax_diffusion.convert.weights import params_from_state_dict, state_dict_from_params
from jax_diffusion.runtime import parallel

# Integration: diffusers models built, saved and converted. In `make test`, not in `make test-fast`.
pytestmark = pytest.mark.slow



def ddpm_config(workdir_source="", **model_overrides):
    config = small(load_config("cifar10"), **model_overrides)
    config.convert.source = workdir_source
    config.sample.update(num_samples=8, batch_size=8, num_steps=3, method="ddim")
    return config


def saved_diffusers_model(config, directory, seed=0):
    unet, state = diffusers_unet(config, seed=seed)
    unet.save_pretrained(directory)
    return unet, state


def flat(tree):
    return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _cli_flags(source: str) -> list[str]:
    """ddpm_config(source) as main.py flags."""
    return [f"--config={os.path.join(ROOT, 'configs', 'cifar10.py')}",
            "--config.data.image_size=16", "--config.model.ch=32", "--config.model.ch_mult=(1,2)",
            "--config.model.num_res_blocks=1", "--config.model.attention_resolutions=(8,)",
            f"--config.convert.source={source}", "--config.sample.num_samples=8",
            "--config.sample.batch_size=8", "--config.sample.num_steps=3",
            "--config.sample.method=ddim"]


def test_import_then_sample_restores_the_imported_weights(tmp_path):
    """--mode=import then --mode=sample through main.py; the restored weights are the imported
    ones and compute diffusers' function."""
    from jax_diffusion.models import create_model
    from jax_diffusion.generation.restore import restore_for_sampling

    config = ddpm_config(str(tmp_path / "hf"))
    unet, state = saved_diffusers_model(config, config.convert.source)
    workdir = str(tmp_path / "wd")
    for mode in ("import", "sample"):
        result = subprocess.run(plain_command(workdir, f"--mode={mode}",
                                              *_cli_flags(config.convert.source)),
                                env=ENV, cwd=ROOT, capture_output=True, text=True,
                                timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["0"]

    mesh = parallel.create_mesh()
    model = create_model(config.model)
    expected = flat(params_from_state_dict(state, config, "diffusers", "test"))
    for use_ema in (True, False):
        config.sample.use_ema = use_ema
        params, step = restore_for_sampling(config, workdir, mesh, model)
        got = flat(params)
        assert step == 0 and got.keys() == expected.keys()
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # the restored network is diffusers' network
    x, t, _ = random_inputs(config, 2, seed=1)
    ours = np.asarray(model.apply({"params": params}, x, t))
    assert np.abs(ours - torch_forward(unet, x, t)).max() <= 1e-4

    with np.load(os.path.join(workdir, "samples", "samples_0.npz")) as f:
        images = f["images"]
    assert images.shape[0] == 8 and images.shape[1:3] == (16, 16) and images.shape[-1] == 3
    with pytest.raises(errors.ConversionError, match="already holds checkpoints"):
        run_import(config, workdir)


def test_export_reloads_in_diffusers_with_the_same_outputs(tmp_path):
    from diffusers import UNet2DModel

    config = ddpm_config(str(tmp_path / "hf"))
    unet, state = saved_diffusers_model(config, config.convert.source, seed=2)
    run_import(config, str(tmp_path / "wd"))
    config.convert.target = str(tmp_path / "exported")
    run_export(config, str(tmp_path / "wd"))
    assert sorted(os.listdir(config.convert.target)) == ["config.json", SAFETENSORS_NAME]
    reloaded = UNet2DModel.from_pretrained(config.convert.target).eval()
    x, t, _ = random_inputs(config, 3, seed=3)
    np.testing.assert_array_equal(torch_forward(reloaded, x, t), torch_forward(unet, x, t))
    for name, value in reloaded.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), state[name], err_msg=name)


def test_class_table_gets_a_zero_null_row_and_exports_it():
    config = small(load_config("cifar10"), num_classes=10)
    unet, state = diffusers_unet(config, seed=4)  # num_class_embeds = 11 (ours)
    state = dict(state, **{"class_embedding.weight": state["class_embedding.weight"][:10]})
    params = params_from_state_dict(state, config, "diffusers", "test")
    table = np.asarray(params["embed"]["label_embed"]["embedding"])
    assert table.shape == (11, 128)
    np.testing.assert_array_equal(table[:10], state["class_embedding.weight"])
    np.testing.assert_array_equal(table[10], 0.0)
    assert state_dict_from_params(params, config)["class_embedding.weight"].shape == (11, 128)


def test_improved_diffusion_state_dict_round_trip_through_a_pt_file(tmp_path):
    """A .pt in improved-diffusion's names (read with torch.load(weights_only=True)) imports to
    the same parameters; the name layout itself was checked against improved-diffusion's
    UNetModel (max diff 3e-7 when it was written)."""
    import torch
    config = small(load_config("cifar10_improved"), ch=64, ch_mult=(1, 1), num_heads=4,
                   attention_resolutions=(16, 8))
    _, state = diffusers_unet(config, seed=5)
    params = params_from_state_dict(state, config, "diffusers", "test")
    improved = state_dict_from_params(params, config, "improved_diffusion")
    assert "input_blocks.1.1.qkv.weight" in improved and "label_emb.weight" in improved
    path = tmp_path / "model.pt"
    torch.save({k: torch.from_numpy(v) for k, v in improved.items()}, path)
    config.convert.source = str(path)
    run_import(config, str(tmp_path / "wd"))
    from jax_diffusion.models import create_model
    from jax_diffusion.generation.restore import restore_for_sampling
    restored, _ = restore_for_sampling(config, str(tmp_path / "wd"), parallel.create_mesh(),
                                       create_model(config.model))
    expected, got = flat(params), flat(restored)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


# ------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("key, value, phrase", [
    ("source", "", "config.convert.source is empty"),
    ("format", "torch", "config.convert.format='torch' is not one of auto, diffusers, "
                        "improved_diffusion"),
    ("step", -1, "config.convert.step=-1"),
])
def test_convert_config_errors(tmp_path, key, value, phrase):
    config = ddpm_config(str(tmp_path))
    config.convert[key] = value
    import_fails(config, tmp_path / "wd", errors.ConfigError, phrase)


def test_export_needs_a_target(tmp_path):
    with pytest.raises(errors.ConfigError, match="config.convert.target is empty"):
        run_export(ddpm_config(), str(tmp_path))


def import_fails(config, workdir, error_type, *phrases):
    with pytest.raises(error_type) as info:
        run_import(config, str(workdir))
    message = str(info.value)
    assert isinstance(info.value, errors.UserError) and "\n" not in message
    for phrase in phrases:
        assert phrase in message, message
    assert not os.path.exists(os.path.join(workdir, "checkpoints")), "something was written"
    return message


def test_directory_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.txt").write_text("x")
    config = ddpm_config(str(tmp_path / "notamodel"))
    import_fails(config, tmp_path / "wd", errors.InputFileError, "without config.json")


def test_diffusers_model_with_other_conventions_names_them(tmp_path):
    source = str(tmp_path / "hf")
    saved_diffusers_model(ddpm_config(norm_eps=1e-5, downsample_padding="symmetric"), source)
    message = import_fails(ddpm_config(source), tmp_path / "wd", errors.ConversionError,
                           "norm_eps=1e-05", "config.model.norm_eps", "downsample_padding=1")
    assert "freq_shift" not in message


def test_num_groups_is_exported_as_norm_num_groups_and_read_back():
    from jax_diffusion.config_files import default_config
    from jax_diffusion.convert.diffusers_config import (
        check_unet2d_config,
        config_from_unet2d,
        unet2d_config,
    )
    config = ddpm_config(num_groups=8)
    exported = unet2d_config(config)
    assert exported["norm_num_groups"] == 8 and exported["attn_norm_num_groups"] is None
    config.model.use_scale_shift_norm = True  # diffusers' middle attention then needs its own
    assert unet2d_config(config)["attn_norm_num_groups"] == 8
    imported = config_from_unet2d(exported, default_config())
    assert imported.model.num_groups == 8
    check_unet2d_config(exported, imported, "exported")
    assert config_from_unet2d({}, default_config()).model.num_groups == 32  # diffusers' default
    with pytest.raises(errors.ConversionError, match=r"norm_num_groups=8 \(the config needs 32: "
                                                     r"config\.model\.num_groups\)"):
        check_unet2d_config(exported, ddpm_config(), "exported")


def test_state_dict_of_another_architecture_names_the_wrong_shapes(tmp_path):
    from safetensors.numpy import save_file
    other = small(load_config("cifar10_improved"), ch=64, ch_mult=(1, 1), num_heads=4,
                  attention_resolutions=(16, 8))
    _, state = diffusers_unet(other, seed=6)
    improved = state_dict_from_params(params_from_state_dict(state, other, "diffusers", "t"),
                                      other, "improved_diffusion")
    save_file(improved, str(tmp_path / "other.safetensors"))
    config = small(load_config("cifar10_improved"), ch=32, ch_mult=(1, 2), num_heads=4,
                   attention_resolutions=(8,))
    config.convert.source = str(tmp_path / "other.safetensors")
    import_fails(config, tmp_path / "wd", errors.ConversionError, "wrong-shaped",
                 "input_blocks.0.0.weight is (64, 3, 3, 3), the config needs (32, 3, 3, 3)",
                 "unexpected")


def test_truncated_safetensors(tmp_path):
    source = tmp_path / "hf"
    saved_diffusers_model(ddpm_config(), str(source))
    weights = source / SAFETENSORS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    import_fails(ddpm_config(str(source)), tmp_path / "wd", errors.InputFileError,
                 SAFETENSORS_NAME, "truncated")


def test_pt_without_pytorch_or_the_restricted_reader(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02not read")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith(("torch.", "jax_diffusion.convert.torch_pickle")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    config = small(load_config("cifar10_improved"))
    config.convert.source = str(path)
    import_fails(config, tmp_path / "wd", errors.MissingDependencyError,
                 "pip install torch==2.13.0")


def test_improved_uncond_config_is_the_released_cifar10_model():
    """improved-diffusion's CIFAR-10 flags (its README and script_util defaults)."""
    config = load_config("cifar10_improved_uncond")
    m, d = config.model, config.diffusion
    assert (m.ch, tuple(m.ch_mult), m.num_res_blocks, tuple(m.attention_resolutions)) == (
        128, (1, 2, 2, 2), 3, (16, 8))
    assert (m.num_heads, m.use_scale_shift_norm, m.learn_sigma, m.num_classes, m.dropout) == (
        4, True, True, 0, 0.3)
    assert (m.time_embedding_freq_shift, m.time_embedding_flip_sin_to_cos, m.norm_eps,
            m.downsample_padding) == (0, True, 1e-5, "symmetric")
    assert (d.schedule, d.num_timesteps, d.var_type, d.loss_type, d.rescale_timesteps) == (
        "cosine", 4000, "learned_range", "hybrid", True)
