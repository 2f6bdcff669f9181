"""Reading PyTorch state dicts into numpy without ever executing pickle code.

.safetensors: the `safetensors` package (no PyTorch needed). .bin / .pt / .pth (PyTorch pickles):
`torch.load(..., weights_only=True)` when PyTorch is installed, else the project's restricted
reader `jax_diffusion.convert.torch_pickle`;
with neither, a MissingDependencyError saying what to install.
"""
from __future__ import annotations

import os

import numpy as np

from jax_diffusion import errors

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_NAME = "diffusion_pytorch_model.bin"


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: float32 array} from a .safetensors file or a PyTorch pickle (.bin/.pt/.pth)."""
    if not os.path.isfile(path):
        raise errors.InputFileError(f"{path} is not a file: point config.convert.source at a "
                                    f"diffusers model directory or a .safetensors/.pt state dict")
    tensors = _read_safetensors(path) if path.endswith(".safetensors") else _read_pickle(path)
    return {name: np.asarray(value, dtype=np.float32) for name, value in tensors.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise errors.InputFileError(f"{path} is not a readable safetensors file ({first_line}); "
                                    f"it may be truncated: download it again") from None


def _read_pickle(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001  (torch raises many types for one bad file)
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise errors.InputFileError(
                f"{path} could not be read as a PyTorch state dict with weights_only=True "
                f"({type(e).__name__}: {first_line[:200]})") from None
        if not isinstance(state, dict):
            raise errors.ConversionError(f"{path} holds a {type(state).__name__}, not a state dict "
                                         f"(a mapping of parameter names to tensors)")
        return {name: _torch_to_numpy(value) for name, value in state.items()
                if isinstance(value, torch.Tensor)}
    try:
        from jax_diffusion.convert.torch_pickle import load_state_dict
    except ImportError:
        raise errors.MissingDependencyError(
            f"reading {os.path.basename(path)} (a PyTorch pickle) needs PyTorch: pip install "
            f"torch==2.13.0, or give a .safetensors file instead") from None
    return load_state_dict(path)


def _torch_to_numpy(tensor) -> np.ndarray:
    import torch
    return tensor.detach().to(torch.float32).cpu().numpy()
