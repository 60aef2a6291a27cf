"""Peak memory of the whole `unetseg predict` process on a 256 x 1024 x 1024 uint16 volume (ZYX TIFF).

    .venv/bin/python benchmarks/bench_volume_memory.py [--shape 256 1024 1024] [--output labels]

A tiny 3-D U-Net checkpoint (configs/tiny3d.yaml, trained for a few seconds on the embedded
synthetic nuclei volumes) predicts a volume of ellipsoidal nuclei through the command line in
a fresh process, in 3-D tiles, slab by slab along Z; instance labels are made block by block
of planes (`unetseg.inference.labeling`). Its peak resident memory (GNU time's %M) is compared
with the 2 GB goal, with a bare `import torch` process, and with the peer measured in the same
run on a smaller volume (`--peer-planes`): the probabilities of the whole volume held in memory
and labelled by one 3-D watershed, as unetseg made 3-D labels before the merged pipeline. The
volume is written plane by plane and read through a memory map; outputs are written through
one, so neither needs to fit in memory. This script imports neither torch nor unetseg, so each
child's peak is its own.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from child_memory import child_peak_mb  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
GOAL_MB = 2048


NUCLEUS_PITCH, NUCLEUS_RADIUS, NUCLEUS_PLANES = 32, 10, 12  # lattice step and radius (px); planes per layer

WHOLE_VOLUME_PEER = """
import sys, numpy as np, torch
from unetseg.inference.loading import load_predictor
from unetseg.inference.postprocess import to_labels
from unetseg.inference.volume import predict_volume_tiled
from unetseg.io.volumes import VolumeChannels, open_volume, volume_range
from functools import partial
model, spec = load_predictor(sys.argv[1], "cpu")
volume = open_volume(sys.argv[2])
tile, overlap = (tuple(int(n) for n in sys.argv[k].split(",")) for k in (3, 4))
value_range = volume_range(volume.planes, 1, spec.normalization)
probs = predict_volume_tiled(model, VolumeChannels(volume.planes, 1), tile_size=tile, overlap=overlap,
    normalize=partial(spec.normalization.apply, value_range=value_range), amp=False)
labels = to_labels(probs, spacing=volume.spacing)
print("objects", int(labels.max()))
"""


def write_volume(path: Path, shape: tuple[int, int, int]) -> None:
    """A uint16 ZYX ImageJ stack (2.0 x 0.5 x 0.5 micron voxels): noise and bright ellipsoidal nuclei on a
    lattice (layers of NUCLEUS_PLANES planes, each nucleus 5 planes deep), written plane by plane."""
    calibration = {"resolution": (2.0, 2.0), "imagej": True, "metadata": {"axes": "ZYX", "spacing": 2.0}}
    volume = tifffile.memmap(path, shape=shape, dtype=np.uint16, **calibration)
    rng = np.random.default_rng(0)
    yy = (np.arange(shape[1]) % NUCLEUS_PITCH - NUCLEUS_PITCH // 2)[:, None] ** 2
    xx = (np.arange(shape[2]) % NUCLEUS_PITCH - NUCLEUS_PITCH // 2)[None, :] ** 2
    for z in range(shape[0]):
        plane = rng.integers(0, 1024, size=shape[1:], dtype=np.uint16)
        depth = (z % NUCLEUS_PLANES - NUCLEUS_PLANES // 2) / 2.5  # 5 planes inside each layer, 7 between layers
        if abs(depth) < 1:
            plane[yy + xx < NUCLEUS_RADIUS**2 * (1 - depth**2)] += 2048
        volume[z] = plane
    volume.flush()
    del volume


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 1024, 1024), metavar=("Z", "Y", "X"))
    parser.add_argument("--output", choices=("mask", "prob", "labels"), default="labels")
    parser.add_argument("--peer-planes", type=int, default=32, help="planes of the volume the peer is measured on")
    parser.add_argument("--volume-tile", default="16,128,128", help="3-D tile of the prediction (Z,Y,X): the default")
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
                "--trainer.default_root_dir",
                str(work / "tiny3d"),
                "--trainer.max_epochs",
                "4",
                "--data.tiles_per_epoch",
                "16",
                "--trainer.enable_progress_bar",
                "false",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
    floor, _, _ = child_peak_mb([sys.executable, "-c", "import torch; torch.zeros(1)"], env)

    def predict(path: Path) -> tuple[float, float, str]:
        command = [sys.executable, "-m", "unetseg", "predict", str(path), str(work / "out.tif")]
        command += ["--checkpoint", str(checkpoint), "--output", args.output, "--volume-tile", args.volume_tile]
        command += ["--volume-overlap", args.volume_overlap, "--overwrite", "-q"]
        return child_peak_mb(command, env)

    print("| volume | output | tile (Z,Y,X) | peak RSS, whole process | `import torch` alone | goal | time |")
    print("|---|---|---|---|---|---|---|")
    peer_shape = (min(args.peer_planes, shape[0]), *shape[1:])
    peer_path = work / f"volume_{'x'.join(map(str, peer_shape))}.tif"
    if args.output == "labels" and not peer_path.exists():
        write_volume(peer_path, peer_shape)
    runs = [(shape, volume_path)] + ([(peer_shape, peer_path)] if args.output == "labels" else [])
    for run_shape, path in runs:
        peak, seconds, summary = predict(path)
        out = tifffile.TiffFile(work / "out.tif")
        written, spacing = out.series[0].shape, (out.imagej_metadata or {}).get("spacing")
        objects = f", {int(out.asarray().max())} objects" if args.output == "labels" else ""
        voxels = int(np.prod(run_shape))
        print(
            f"| {' x '.join(map(str, run_shape))} uint16 ({voxels * 2 / 2**20:.0f} MB) | {args.output} {written}, "
            f"Z spacing {spacing}{objects} | {args.volume_tile} | {peak:.0f} MB | {floor:.0f} MB | "
            f"< {GOAL_MB} MB ({peak / GOAL_MB:.2f} of it) | {seconds:.0f} s ({voxels / seconds / 1e6:.2f} Mvoxel/s) |"
        )
        if run_shape == peer_shape and args.output == "labels":
            command = [sys.executable, "-c", WHOLE_VOLUME_PEER, str(checkpoint), str(peer_path)]
            peer, peer_seconds, peer_summary = child_peak_mb(command + [args.volume_tile, args.volume_overlap], env)
            print(
                f"| {' x '.join(map(str, run_shape))}, peer: whole probability volume + one 3-D watershed | "
                f"labels, {peer_summary} | {args.volume_tile} | {peer:.0f} MB | {floor:.0f} MB | "
                f"unetseg uses {peak / peer:.2f} of it | {peer_seconds:.0f} s |"
            )
    print(summary)


if __name__ == "__main__":
    main()
