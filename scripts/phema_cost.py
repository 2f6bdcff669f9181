"""What post-hoc EMA costs for a config's network: the bytes one power-EMA snapshot takes on disk
(per million parameters), and the time --mode=phema's reconstruction takes over N snapshots.
Random parameters stand in for trained ones (the cost does not depend on the values).

    PYTHONPATH=$PWD python scripts/phema_cost.py configs/cifar10.py 8

Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

import jax
import numpy as np

from jax_diffusion.config_files import load_config_file
from jax_diffusion.models import create_model
from jax_diffusion.runtime import parallel
from jax_diffusion.training import power_ema
from jax_diffusion.training.train_state import abstract_train_state


def _tree_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names)


def main(config_path: str, num_snapshots: int) -> dict:
    config = load_config_file(config_path)
    mesh = parallel.create_mesh()
    sharding = parallel.replicated(mesh)
    template = abstract_train_state(config, create_model(config.model)).params
    leaves, treedef = jax.tree.flatten(template)
    num_params = sum(int(np.prod(leaf.shape)) for leaf in leaves)
    rng = np.random.default_rng(0)
    sigma_rels = tuple(float(s) for s in config.train.ema_sigma_rels)
    with tempfile.TemporaryDirectory() as workdir:
        writer = power_ema.SnapshotWriter(workdir, sigma_rels, every=1,
                                          last_step=num_snapshots, resumed_step=0)
        for step in range(1, num_snapshots + 1):
            emas = tuple(jax.device_put(treedef.unflatten(
                [rng.standard_normal(leaf.shape, np.float32) for leaf in leaves]), sharding)
                for _ in sigma_rels)
            writer.after_step(step, emas)
        writer.close()
        snapshot_bytes = _tree_bytes(os.path.join(workdir, power_ema.SNAPSHOT_DIR, "1"))
        start = time.perf_counter()
        params, _ = power_ema.reconstruct(workdir, template, sharding, 0.13)
        jax.block_until_ready(params)
        seconds = time.perf_counter() - start
    return {"config": config_path, "params": num_params, "tracked_widths": len(sigma_rels),
            "snapshot_bytes": snapshot_bytes,
            "snapshot_bytes_per_million_params": snapshot_bytes / (num_params / 1e6),
            "snapshots": num_snapshots, "reconstruction_s": seconds,
            "device": jax.devices()[0].device_kind}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], int(sys.argv[2]))))
