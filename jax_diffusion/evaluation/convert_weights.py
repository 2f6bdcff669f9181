"""Convert pytorch-fid's Inception weights to an .npz that needs no PyTorch to read:

  python -m jax_diffusion.evaluation.convert_weights pt_inception-2015-12-05-6726825d.pth \
      inception_fid.npz

Run it wherever PyTorch is installed; then set config.eval.inception_weights=inception_fid.npz.
The output is checked by loading it back (names and shapes of the FID Inception-v3).
"""
import sys

import numpy as np

from jax_diffusion.evaluation.inception import _read_weight_file, load_inception


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    source, target = argv[1], argv[2]
    weights = {name: value for name, value in _read_weight_file(source).items()
               if not name.endswith("num_batches_tracked")}
    np.savez(target, **weights)
    load_inception(target)
    print(f"wrote {len(weights)} arrays to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
