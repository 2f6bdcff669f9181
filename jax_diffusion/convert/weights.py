"""PyTorch state dict <-> the project's U-Net parameters, every name and shape checked first."""
from __future__ import annotations

import logging

import flax
import ml_collections
import numpy as np

from jax_diffusion import errors
from jax_diffusion.convert.layouts import TensorSpec, tensor_specs

_SHOWN = 5  # names listed per kind of mismatch; the counts are always complete


def _label_rows(spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    """A class table of num_classes rows gets our extra null-label row, zero: the null label
    then adds nothing to the time embedding. Only a model trained with label dropout has
    learned what that means, so classifier-free guidance needs such a model."""
    if array.shape[0] == spec.shape[0] - 1:
        logging.info("%s has %d rows: appending a zero null-label row (guidance needs a model "
                     "trained with label dropout)", spec.sources[0], array.shape[0])
        return np.concatenate([array, np.zeros_like(array[:1])])
    return array


def _listed(kind: str, names: list[str]) -> str:
    more = f", ... ({len(names) - _SHOWN} more)" if len(names) > _SHOWN else ""
    return f"{len(names)} {kind} ({', '.join(names[:_SHOWN])}{more})"


def params_from_state_dict(state: dict[str, np.ndarray], config: ml_collections.ConfigDict,
                           layout: str, source: str) -> dict:
    """The parameter tree of config's U-Net from a state dict in `layout` ("diffusers" or
    "improved_diffusion"). Raises one ConversionError listing every missing, unexpected and
    wrong-shaped tensor."""
    specs = tensor_specs(config, layout)
    needed = {name for spec in specs for name in spec.sources}
    missing = sorted(needed - set(state))
    unexpected = sorted(set(state) - needed)
    wrong = []
    for spec in specs:
        for name, shape in zip(spec.sources, spec.source_shapes, strict=True):
            if name not in state:
                continue
            have = tuple(state[name].shape)
            null_row_missing = spec.path.endswith("label_embed/embedding") and have == (
                shape[0] - 1,) + shape[1:]
            if have != shape and not null_row_missing:
                wrong.append(f"{name} is {have}, the config needs {shape}")
    if missing or unexpected or wrong:
        kinds = (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", wrong))
        parts = [_listed(kind, names) for kind, names in kinds if names]
        raise errors.ConversionError(f"{source} does not fit the model of this config "
                                     f"({layout} layout): " + "; ".join(parts))
    flat = {}
    for spec in specs:
        array = spec.to_ours(*(state[name] for name in spec.sources))
        if spec.path.endswith("label_embed/embedding"):
            array = _label_rows(spec, array)
        flat[tuple(spec.path.split("/"))] = np.ascontiguousarray(array, dtype=np.float32)
    return flax.traverse_util.unflatten_dict(flat)


def state_dict_from_params(params, config: ml_collections.ConfigDict, layout: str = "diffusers"
                           ) -> dict[str, np.ndarray]:
    """The PyTorch state dict (float32 numpy) holding config's U-Net parameters in `layout`."""
    flat = {"/".join(k): np.asarray(v, np.float32)
            for k, v in flax.traverse_util.flatten_dict(params).items()}
    state = {}
    for spec in tensor_specs(config, layout):
        if spec.path not in flat or flat[spec.path].shape != spec.shape:
            raise errors.ConversionError(
                f"the parameters do not fit the model of this config at {spec.path}: was the "
                f"checkpoint trained with another config.model?")
        for name, array in zip(spec.sources, spec.to_source(flat[spec.path]), strict=True):
            state[name] = np.ascontiguousarray(array)
    return state
