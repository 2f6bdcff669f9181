"""Reading a published PyTorch model's weights into this project's parameter tree, in memory:
a diffusers UNet2DModel directory or an improved-diffusion state-dict file. --mode=import writes
the result as a checkpoint; `Pipeline.from_pretrained` samples it directly."""
from __future__ import annotations

import json
import os

import ml_collections

from jax_diffusion import errors
from jax_diffusion.convert.diffusers_config import check_unet2d_config
from jax_diffusion.convert.readers import PICKLE_NAME, SAFETENSORS_NAME, read_state_dict
from jax_diffusion.convert.weights import params_from_state_dict

FORMATS = ("auto", "diffusers", "improved_diffusion")
_STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def resolve_format(source: str, fmt: str) -> str:
    """"diffusers" or "improved_diffusion" for `source` under config.convert.format `fmt`."""
    if fmt != "auto":
        return fmt
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "config.json")):
            return "diffusers"
        raise errors.InputFileError(
            f"{source} is a directory without config.json, so not a diffusers model directory: "
            f"point config.convert.source at one (config.json + {SAFETENSORS_NAME}) or at a "
            f"state-dict file")
    if os.path.isfile(source):
        return "improved_diffusion"
    raise errors.InputFileError(f"config.convert.source={source!r} does not exist")


def _diffusers_weights_file(directory: str) -> str:
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if os.path.isfile(os.path.join(directory, name)):
            return os.path.join(directory, name)
    raise errors.InputFileError(f"{directory} has a config.json but neither {SAFETENSORS_NAME} nor "
                                f"{PICKLE_NAME}: download the weights into it")


def read_source(config: ml_collections.ConfigDict) -> dict:
    """The parameter tree of config's U-Net from config.convert.source, every name, shape and
    (for diffusers) architecture setting checked."""
    source = config.convert.source
    fmt = resolve_format(source, config.convert.format)
    if fmt == "diffusers":
        if not os.path.isdir(source):
            raise errors.InputFileError(f"config.convert.format='diffusers' needs a directory with "
                                        f"config.json, and {source} is not one")
        config_path = os.path.join(source, "config.json")
        try:
            with open(config_path) as f:
                found = json.load(f)
        except (OSError, ValueError) as e:
            raise errors.InputFileError(f"{config_path} is not readable JSON ({e})") from None
        if not isinstance(found, dict):
            raise errors.InputFileError(f"{config_path} is not a JSON object")
        check_unet2d_config(found, config, config_path)
        weights = _diffusers_weights_file(source)
        return params_from_state_dict(read_state_dict(weights), config, "diffusers", weights)
    if os.path.isdir(source) or not source.endswith(_STATE_DICT_SUFFIXES):
        raise errors.InputFileError(
            f"config.convert.format='improved_diffusion' needs a state-dict file "
            f"({', '.join(_STATE_DICT_SUFFIXES)}), not {source}")
    return params_from_state_dict(read_state_dict(source), config, fmt, source)
