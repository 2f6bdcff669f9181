"""Peak dense FLOP/s of one accelerator chip, per precision of its matrix units: MFU's denominator.

Vendors' dense figures (no structured sparsity), per chip. Rows are matched in order as
substrings of the lower-cased jax `device_kind` ("nvidia h100 80gb hbm3", "nvidia h200",
"tpu v5 lite"), the more specific names first. TPUs have one figure: their matrix units
multiply in bfloat16, and a float32 matmul at JAX's default precision is one bfloat16 pass.
"""
from __future__ import annotations

PRECISIONS = ("bfloat16", "tf32", "float32")

_NVIDIA_SXM_HOPPER = {"bfloat16": 989e12, "tf32": 495e12, "float32": 67e12}
_NVIDIA_NVL_HOPPER = {"bfloat16": 835e12, "tf32": 418e12, "float32": 60e12}

PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("h100 pcie", {"bfloat16": 756e12, "tf32": 378e12, "float32": 51e12}),
    ("h100 nvl", _NVIDIA_NVL_HOPPER),
    ("h100", _NVIDIA_SXM_HOPPER),
    ("h200 nvl", _NVIDIA_NVL_HOPPER),
    ("h200", _NVIDIA_SXM_HOPPER),
    ("a100", {"bfloat16": 312e12, "tf32": 156e12, "float32": 19.5e12}),
    ("tpu v5 lite", {"bfloat16": 197e12}),  # v5e's device_kind
    ("tpu v5e", {"bfloat16": 197e12}),
    ("tpu v5p", {"bfloat16": 459e12}),
    ("tpu v5", {"bfloat16": 459e12}),       # v5p's device_kind
    ("tpu v4", {"bfloat16": 275e12}),
)


def peak_flops(device_kind: str, precision: str = "bfloat16") -> float | None:
    """Peak FLOP/s of one device of this kind at `precision` (one of PRECISIONS), or None when
    unknown (e.g. a CPU). A TPU answers its bfloat16 figure for every precision."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    kind = device_kind.lower()
    for name, peaks in PEAKS:
        if name in kind:
            return peaks.get(precision, peaks["bfloat16"])
    return None


def default_precision(platform: str, dtype: str) -> str:
    """The precision a model computing in `dtype` ("float32" or "bfloat16") runs its
    convolutions and matmuls at on `platform` (jax's "gpu", "tpu", "cpu") under JAX's default
    matmul precision: float32 is TF32 on NVIDIA GPUs (Ampere and later) and a bfloat16 pass on
    TPUs."""
    if dtype == "bfloat16":
        return "bfloat16"
    return {"gpu": "tf32", "cuda": "tf32", "tpu": "bfloat16"}.get(platform, "float32")
