"""Peak memory of the whole `unetseg-predict` process on a 12000 x 12000 uint16 TIFF.

    .venv/bin/python benchmarks/bench_predict_memory.py [--size 12000] [--output mask]

A tiny U-Net checkpoint (configs/tiny.yaml, one short epoch) predicts the image through the
command line in a fresh process; its peak resident memory (GNU time's %M) is compared
with the 1.5 GB goal, and with a bare `import torch` process as the floor any PyTorch program
pays. This script imports neither torch nor unetseg itself, and writes the image band by band,
so the child's peak is its own.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from child_memory import child_peak_mb  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--output", choices=("mask", "prob"), default="mask")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/unetseg_bench_memory"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    image_path = work / f"huge_{args.size}.tif"
    if not image_path.exists():
        image = tifffile.memmap(image_path, shape=(args.size, args.size), dtype=np.uint16)
        rng = np.random.default_rng(0)
        for start in range(0, args.size, 1000):
            rows = min(1000, args.size - start)
            image[start : start + rows] = rng.integers(0, 4096, size=(rows, args.size), dtype=np.uint16)
        image.flush()
        del image
    checkpoint = work / "tiny" / "checkpoints" / "best.ckpt"
    if not checkpoint.exists():
        subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "train.py"),
                "--config",
                str(REPO / "configs/tiny.yaml"),
                "--trainer.default_root_dir",
                str(work / "tiny"),
                "--trainer.max_epochs",
                "1",
                "--data.tiles_per_epoch",
                "16",
                "--trainer.enable_progress_bar",
                "false",
            ],
            check=True,
            capture_output=True,
            env={"UNETSEG_CACHE": str(work / "cache"), "PATH": ""},
        )
    floor, _, _ = child_peak_mb([sys.executable, "-c", "import torch; torch.zeros(1)"])
    peak, seconds, summary = child_peak_mb(
        [
            sys.executable,
            str(REPO / "scripts" / "predict.py"),
            str(image_path),
            str(work / "out.tif"),
            "--checkpoint",
            str(checkpoint),
            "--output",
            args.output,
            "--overwrite",
        ]
    )
    out = tifffile.TiffFile(work / "out.tif")
    shape = out.pages[0].shape
    print("| image | output | peak RSS, whole process | `import torch` alone | goal | time |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.size} x {args.size} uint16 | {args.output} {shape} | {peak:.0f} MB | {floor:.0f} MB | "
        f"< 1536 MB ({peak / 1536:.2f} of it) | {seconds:.0f} s |"
    )
    print(summary)


if __name__ == "__main__":
    main()
