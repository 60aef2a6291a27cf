"""Export a checkpoint: `python scripts/export.py CKPT OUT.onnx` (same as `unetseg-export`)."""

from unetseg.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
