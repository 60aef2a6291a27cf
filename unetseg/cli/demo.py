"""`make demo`: train on the embedded dataset, predict a few images with overlays, say where everything is."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from unetseg.cli import predict as predict_cli
from unetseg.cli import train as train_cli
from unetseg.synthetic import make_nuclei_dataset


def command(name: str) -> str:
    """How to call an installed command from this shell: `.venv/bin/NAME` when it is not on PATH."""
    installed = Path(sys.executable).parent / name
    if shutil.which(name) == str(installed) or not installed.is_file():
        return name
    try:
        return os.path.relpath(installed)
    except ValueError:  # another drive (Windows)
        return str(installed)


def main(argv: list[str] | None = None, out: str = "runs/demo") -> int:
    started = time.time()
    out = Path(out)
    print("Training a small U-Net on the embedded synthetic nuclei (a few minutes on a CPU; a line per epoch).")
    train_cli.main(["--config", "demo", "--trainer.default_root_dir", str(out)])
    checkpoint = out / "checkpoints" / "best.ckpt"
    # Unseen images from the same generator (another seed), larger than a training tile.
    unseen = make_nuclei_dataset(out / "unseen", count=3, shape=(300, 420), seed=123)
    predictions = out / "predictions"
    status = predict_cli.main(
        [
            str(unseen / "images"),
            str(predictions),
            "--checkpoint",
            str(checkpoint),
            "--output",
            "labels",
            "--tile-size",
            "128",
            "--overlap",
            "32",
            "--overwrite",
            "--overlay",
        ]
    )
    overlays = sorted(predictions.glob("*_overlay.png"))
    print(f"\nDemo finished in {time.time() - started:.0f} s.")
    print(f"  checkpoint:   {checkpoint}")
    print(f"  curves:       {out / 'curves.png'}  (metrics in {out / 'metrics.csv'})")
    print(f"  input images: {unseen / 'images'}")
    print(f"  masks:        {predictions}  (instance labels, TIFF)")
    print(f"  overlays:     {overlays[0] if overlays else predictions} ... (input with predicted outlines, PNG)")
    print(f"  score them:   {command('unetseg-evaluate')} {predictions} {unseen / 'masks'}")
    print("  (or `source .venv/bin/activate` once, then every unetseg-... command works as written in the README)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
