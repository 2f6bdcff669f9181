"""Convert pytorch-fid's Inception weights to an .npz (PyTorch is not needed for either):

  python -m jax_diffusion.evaluation.convert_weights pt_inception-2015-12-05-6726825d.pth \\
      inception_fid.npz

The .pth is read with the safe reader (jax_diffusion.convert.torch_pickle) and the evaluation reads
it
directly too; the .npz is for tools that want plain arrays. The output is checked by loading it
back (names and shapes of the FID Inception-v3).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from jax_diffusion.errors import UserError
from jax_diffusion.evaluation.inception import _read_weight_file, load_inception


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jax_diffusion.evaluation.convert_weights",
        description="Convert the FID Inception weights (pytorch-fid's .pth) to an .npz.")
    parser.add_argument("source", help="pt_inception-2015-12-05-6726825d.pth (or .pt / .bin)")
    parser.add_argument("target", help="the .npz to write")
    args = parser.parse_args(argv)
    try:
        weights = {name: value for name, value in _read_weight_file(args.source).items()
                   if not name.endswith("num_batches_tracked")}
        np.savez(args.target, **weights)
        load_inception(args.target)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(weights)} arrays to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
