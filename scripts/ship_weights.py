"""Slim a training checkpoint into shippable weights:

python scripts/ship_weights.py BEST.ckpt unetseg/weights/nuclei.ckpt
"""

import sys

from unetseg.models.checkpoint import slim_checkpoint

if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(slim_checkpoint(sys.argv[1], sys.argv[2]))
