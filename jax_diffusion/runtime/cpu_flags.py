"""XLA:CPU settings for the U-Net, applied through XLA_FLAGS before JAX creates its backend.

XLA:CPU (jaxlib 0.10) runs convolutions through YNNPACK, whose kernel-gradient convolution is
~4x slower than its forward one at 32x32 (the "kernel" is the whole output gradient and the
contracted dimension is the small batch). Sending convolutions back to XLA's Eigen path and
keeping YNNPACK for the rest made the DDPM CIFAR-10 train step 1.57x and the forward pass 1.17x
faster on the 2-core test machine, with the same results (README, Performance). The flag only
affects CPU compilation; GPU and TPU ignore it. It is an experimental XLA flag: re-measure on
every jax upgrade (make bench).
"""
from __future__ import annotations

import os
from collections.abc import MutableMapping

EIGEN_CONVOLUTIONS = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_FLAG_NAME = EIGEN_CONVOLUTIONS.split("=")[0]


def use_fast_cpu_convolutions(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add the flag to XLA_FLAGS unless the user has set that flag already. No effect once JAX
    has created its CPU backend, so call it before anything touches a device."""
    flags = environ.get("XLA_FLAGS", "")
    if _FLAG_NAME not in flags:
        environ["XLA_FLAGS"] = f"{flags} {EIGEN_CONVOLUTIONS}".strip()
