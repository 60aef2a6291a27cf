"""Peak memory of the whole `unetseg predict` process on a 256 x 1024 x 1024 uint16 volume (ZYX TIFF).

    .venv/bin/python benchmarks/bench_volume_memory.py [--shape 256 1024 1024] [--output mask]

A tiny 3-D U-Net checkpoint (configs/tiny3d.yaml at depth 1, width 2, one short epoch)
predicts the volume through the command line in a fresh process, in 3-D tiles, slab by slab
along Z; its peak resident memory (GNU time's %M) is compared with the 2 GB goal and with a
bare `import torch` process. The volume (512 MB) is written plane by plane and read through a
memory map; the mask is written through one, so neither needs to fit in memory. This script
imports neither torch nor unetseg, so the child's peak is its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from peak import child_peak_mb  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
GOAL_MB = 2048


def write_volume(path: Path, shape: tuple[int, int, int]) -> None:
    """A uint16 ZYX ImageJ stack (2.0 x 0.5 x 0.5 micron voxels) of noise and bright blobs, plane by plane."""
    calibration = {"resolution": (2.0, 2.0), "imagej": True, "metadata": {"axes": "ZYX", "spacing": 2.0}}
    volume = tifffile.memmap(path, shape=shape, dtype=np.uint16, **calibration)
    rng = np.random.default_rng(0)
    for z in range(shape[0]):
        plane = rng.integers(0, 1024, size=shape[1:], dtype=np.uint16)
        plane[(np.arange(shape[1]) // 40) % 2 == 0] += 2048  # stripes of "nuclei"
        volume[z] = plane
    volume.flush()
    del volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 1024, 1024), metavar=("Z", "Y", "X"))
    parser.add_argument("--output", choices=("mask", "prob"), default="mask")
    parser.add_argument("--volume-tile", default="16,256,256", help="3-D tile of the prediction (Z,Y,X)")
    parser.add_argument("--volume-overlap", default="4,32,32")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/unetseg_bench_volume_memory"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    shape = tuple(args.shape)
    volume_path = work / f"volume_{'x'.join(map(str, shape))}.tif"
    if not volume_path.exists():
        write_volume(volume_path, shape)
    env = {
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),  # this checkout's code, whatever is installed
        "UNETSEG_CACHE": str(work / "cache"),
    }
    checkpoint = work / "tiny3d" / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "unetseg",
                "train",
                "--config",
                "tiny3d",
                "--model.net.init_args.depth",
                "1",
                "--model.net.init_args.width",
                "2",
                "--model.net.init_args.pool",
                "[[1, 2, 2]]",
                "--trainer.default_root_dir",
                str(work / "tiny3d"),
                "--trainer.max_epochs",
                "1",
                "--data.tiles_per_epoch",
                "4",
                "--trainer.enable_progress_bar",
                "false",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
    floor, _, _ = child_peak_mb([sys.executable, "-c", "import torch; torch.zeros(1)"], env)
    peak, seconds, summary = child_peak_mb(
        [
            sys.executable,
            "-m",
            "unetseg",
            "predict",
            str(volume_path),
            str(work / "out.tif"),
            "--checkpoint",
            str(checkpoint),
            "--output",
            args.output,
            "--volume-tile",
            args.volume_tile,
            "--volume-overlap",
            args.volume_overlap,
            "--overwrite",
            "-q",
        ],
        env,
    )
    out = tifffile.TiffFile(work / "out.tif")
    written = out.series[0].shape
    spacing = (out.imagej_metadata or {}).get("spacing")
    voxels = int(np.prod(shape))
    print("| volume | output | tile (Z,Y,X) | peak RSS, whole process | `import torch` alone | goal | time |")
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {' x '.join(map(str, shape))} uint16 ({voxels * 2 / 2**20:.0f} MB) | {args.output} {written}, "
        f"Z spacing {spacing} | {args.volume_tile} | {peak:.0f} MB | {floor:.0f} MB | "
        f"< {GOAL_MB} MB ({peak / GOAL_MB:.2f} of it) | {seconds:.0f} s ({voxels / seconds / 1e6:.2f} Mvoxel/s) |"
    )
    print(summary)


if __name__ == "__main__":
    main()
