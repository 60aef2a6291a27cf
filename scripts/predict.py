"""Segment images: `python scripts/predict.py INPUT OUTPUT --checkpoint best.ckpt` (same as `unetseg-predict`)."""

from unetseg.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
