"""Peak memory of `unetseg-predict --output labels` on a 12000 x 12000 image stored as a compressed tiled TIFF
and as OME-Zarr.

    .venv/bin/python benchmarks/bench_big_labels.py [--size 12000] [--checkpoint CKPT]

The image is a tiled pattern of touching round nuclei on a noisy background (uint16), written
tile by tile: a zlib-compressed TIFF with 256 x 256 tiles, and an OME-Zarr image (zarr v3,
1024 x 1024 chunks, 0.25 um pixels). A tiny U-Net (configs/tiny.yaml, 6 epochs, trained
once into the work folder unless --checkpoint is given) predicts instance labels through the
command line in a fresh process: the TIFF into a TIFF, the OME-Zarr into its own labels/
group. Each child's peak resident memory (GNU time's %M, as bench_predict_memory.py) is
compared with the 1.5 GB goal and with a bare `import torch` process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import tifffile
from child_memory import CHILD_ENV, child_peak_mb  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
PATTERN = 480  # side of the repeated pattern of nuclei
TILE = 256


def pattern(seed: int = 0) -> np.ndarray:
    """A PATTERN x PATTERN uint16 image of round nuclei (radius 5-11, some touching) on noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:PATTERN, :PATTERN]
    inside = np.zeros((PATTERN, PATTERN), bool)
    for cy in range(13, PATTERN, 26):
        for cx in range(13, PATTERN, 26):
            y, x, radius = cy + rng.uniform(-7, 7), cx + rng.uniform(-7, 7), rng.uniform(5, 11)
            inside |= (rows - y) ** 2 + (cols - x) ** 2 <= radius**2
    image = inside * 2500.0 + 300 + rng.normal(0, 150, inside.shape)
    return image.clip(0, 4095).astype(np.uint16)


def region(base: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    """Rows and columns of the image that repeats `base`."""
    rows = np.arange(top, top + height) % PATTERN
    cols = np.arange(left, left + width) % PATTERN
    return base[np.ix_(rows, cols)]


def write_inputs(work: Path, size: int) -> tuple[Path, Path]:
    """The compressed tiled TIFF and the OME-Zarr image, written tile by tile (made once)."""
    import zarr
    from ome_zarr.writer import write_multiscales_metadata

    base = pattern()
    tiff, store = work / f"nuclei_{size}.tif", work / f"nuclei_{size}.ome.zarr"
    if not tiff.exists():
        tiles = (region(base, top, left, TILE, TILE) for top in range(0, size, TILE) for left in range(0, size, TILE))
        tifffile.imwrite(
            tiff,
            tiles,
            shape=(size, size),
            dtype=np.uint16,
            tile=(TILE, TILE),
            compression="zlib",
            resolution=(4.0, 4.0),
            imagej=False,
        )
    if not store.exists():
        group = zarr.open_group(str(store), mode="w", zarr_format=3)
        array = group.create_array("0", shape=(size, size), dtype=np.uint16, chunks=(1024, 1024))
        for top in range(0, size, 1024):
            array[top : top + 1024] = region(base, top, 0, min(1024, size - top), size)
        axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
        datasets = [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [0.25, 0.25]}]}]
        write_multiscales_metadata(group, datasets, axes=axes)
    return tiff, store


def train_checkpoint(work: Path) -> Path:
    """A tiny U-Net trained for 6 epochs on the embedded synthetic nuclei (a few minutes on a CPU)."""
    checkpoint = work / "tiny" / "checkpoints" / "best.ckpt"
    if not checkpoint.exists():
        subprocess.run(
            [sys.executable, "-m", "unetseg", "train", "--config", str(REPO / "configs/tiny.yaml")]
            + ["--trainer.default_root_dir", str(work / "tiny"), "--trainer.max_epochs", "6"]
            + ["--trainer.enable_progress_bar", "false", "--trainer.logger", "false"],
            check=True,
            capture_output=True,
            env={**os.environ, "UNETSEG_CACHE": str(work / "cache"), "PYTHONPATH": str(REPO)},
        )
    return checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--checkpoint", type=Path, help="a 1-channel foreground checkpoint (default: train one)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/unetseg_bench_labels"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tiff, store = write_inputs(work, args.size)
    checkpoint = args.checkpoint or train_checkpoint(work)
    floor, _, _ = child_peak_mb(
        [sys.executable, "-c", "import torch; torch.zeros(1)"], CHILD_ENV | {"PYTHONPATH": str(REPO)}
    )
    predict = [sys.executable, "-m", "unetseg", "predict"]
    options = ["--checkpoint", str(checkpoint), "--output", "labels"]
    runs = {
        "compressed tiled TIFF -> TIFF": ([str(tiff), str(work / "labels.tif"), "--overwrite"], work / "labels.tif"),
        "OME-Zarr -> its labels/ group": (
            [str(store), str(work / "out"), "--format", "ome-zarr", "--overwrite"],
            store / "labels" / "labels",
        ),
    }
    print("| input | output | peak RSS, whole process | `import torch` alone | goal | time | objects |")
    print("|---|---|---|---|---|---|---|")
    for name, (arguments, output) in runs.items():
        shutil.rmtree(store / "labels", ignore_errors=True)
        peak, seconds, summary = child_peak_mb(predict + arguments + options, CHILD_ENV | {"PYTHONPATH": str(REPO)})
        if output.suffix == ".tif":
            objects = int(tifffile.memmap(output, mode="r").max())
        else:
            import zarr

            labels = zarr.open_group(str(output), mode="r")["0"]
            objects = max(int(np.asarray(labels[top : top + 1024]).max()) for top in range(0, args.size, 1024))
        print(
            f"| {args.size} x {args.size} uint16, {name} | labels | {peak:.0f} MB | {floor:.0f} MB | "
            f"< 1536 MB ({peak / 1536:.2f} of it) | {seconds:.0f} s | {objects} |"
        )
        print(f"<!-- {summary} -->")


if __name__ == "__main__":
    main()
