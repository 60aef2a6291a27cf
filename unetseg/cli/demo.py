"""`make demo`: train on the embedded dataset, predict a few images, say where everything is."""

from __future__ import annotations

import time
from pathlib import Path

from unetseg.cli import predict as predict_cli
from unetseg.cli import train as train_cli
from unetseg.synthetic import make_nuclei_dataset


def main(argv: list[str] | None = None, out: str = "runs/demo") -> int:
    started = time.time()
    out = Path(out)
    train_cli.main(["--config", "demo", "--trainer.default_root_dir", str(out)])
    checkpoint = out / "checkpoints" / "best.ckpt"
    # Unseen images from the same generator (another seed), larger than a training tile.
    unseen = make_nuclei_dataset(out / "unseen", count=3, shape=(300, 420), seed=123)
    status = predict_cli.main(
        [
            str(unseen / "images"),
            str(out / "predictions"),
            "--checkpoint",
            str(checkpoint),
            "--output",
            "labels",
            "--tile-size",
            "128",
            "--overlap",
            "32",
            "--overwrite",
        ]
    )
    print(f"\nDemo finished in {time.time() - started:.0f} s.")
    print(f"  checkpoint:   {checkpoint}")
    print(f"  curves:       {out / 'curves.png'}  (metrics in {out / 'metrics.csv'})")
    print(f"  input images: {unseen / 'images'}")
    print(f"  masks:        {out / 'predictions'}  (instance labels, TIFF)")
    print(f"  score them:   unetseg-evaluate {out / 'predictions'} {unseen / 'masks'}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
