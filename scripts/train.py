"""Train a segmentation model: `python scripts/train.py --config configs/unet.yaml` (same as `unetseg-train`)."""

from unetseg.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
