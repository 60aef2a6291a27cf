"""Tiled inference: speed against MONAI's sliding_window_inference, stitching overhead, memory on a huge image.

    .venv/bin/pip install monai   # for this benchmark only
    .venv/bin/python benchmarks/bench_inference.py --part speed
    .venv/bin/python benchmarks/bench_inference.py --part memory

speed: predict_tiled and MONAI (same model, tile, overlap, gaussian blend, batch) alternated in
one process for several rounds, with the raw forward pass of the same number of tiles batched
identically; best times and ratios. Image sizes are chosen so that both cut the same number of
tiles (predict_tiled adds overlap // 2 of mirrored context at the borders; MONAI does not).
memory: a 12000 x 12000 uint16 TIFF predicted band by band into a float32 TIFF by a tiny
model, in a fresh subprocess that reports its own peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from torch import nn

from unetseg.inference import predict_tiled
from unetseg.inference.tiling import padding, tile_starts
from unetseg.io import Normalization
from unetseg.models.unet import UNet
from unetseg.predict import plane_range

THREADS = 2  # the machine this was written on has 2 cores
TILE_SIZE = 256
OVERLAP = 64
BATCH_SIZE = 8
HUGE = 12000


def tiny_model() -> nn.Module:
    """Two 3x3 convolutions, width 4: the forward pass is cheap, so stitching costs show."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)).eval()


def unet_model() -> nn.Module:
    """The package's U-Net at a small size: a realistic forward pass."""
    torch.manual_seed(0)
    return UNet(in_channels=1, classes=1, depth=3, width=16).eval()


def tile_count(height: int, width: int) -> int:
    """Tiles predict_tiled cuts from an image, from the tiling geometry."""
    counts = []
    for length in (height, width):
        before, after = padding(length, TILE_SIZE, OVERLAP)
        counts.append(len(tile_starts(before + length + after, TILE_SIZE, OVERLAP)))
    return counts[0] * counts[1]


def synthetic_image(size: int) -> np.ndarray:
    """A normalised (1, size, size) float32 image with blobs and noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / 37.0
    return (np.sin(y) * np.cos(x) + 0.3 * rng.normal(size=(size, size))).astype(np.float32)[None]


def run_speed(rounds: int) -> None:
    """Alternate predict_tiled, MONAI and the raw forward of the same batches; print best times and ratios."""
    from monai.inferers import sliding_window_inference

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, tile {TILE_SIZE}, overlap {OVERLAP}, "
        f"batch {BATCH_SIZE}, gaussian blend, best of {rounds} rounds, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"{'model':<6}{'image':>11}{'tiles':>7}{'unetseg s':>11}{'MONAI s':>9}{'forward s':>11}"
        f"{'unetseg Mpx/s':>15}{'MONAI Mpx/s':>13}{'MONAI/unetseg':>15}"
        f"{'stitching':>11}{'in-run':>8}{'MONAI in-run':>14}"
    )
    for name, model, size in (("unet", unet_model(), 548), ("tiny", tiny_model(), 2084)):
        image = synthetic_image(size)
        tiles = tile_count(size, size)
        raw_tiles = torch.randn(tiles, 1, TILE_SIZE, TILE_SIZE)
        clock = ForwardClock(model)

        def ours():
            return predict_tiled(model, image, tile_size=TILE_SIZE, overlap=OVERLAP, batch_size=BATCH_SIZE)

        def monai():
            with torch.inference_mode():
                return sliding_window_inference(
                    torch.from_numpy(image)[None],
                    (TILE_SIZE, TILE_SIZE),
                    BATCH_SIZE,
                    lambda x: torch.sigmoid(model(x)),
                    overlap=OVERLAP / TILE_SIZE,
                    mode="gaussian",
                    sigma_scale=0.125,
                    padding_mode="reflect",
                )[0].numpy()

        def forward():  # the model alone on the batches predict_tiled ran
            with torch.inference_mode():
                first = 0
                for batch in batches:
                    model(raw_tiles[first : first + batch])
                    first += batch

        clock.reset()
        ours_probs = ours()
        batches = list(clock.batches)
        if sum(batches) != tiles:
            raise SystemExit(f"predict_tiled ran {sum(batches)} tiles, the geometry says {tiles}")
        difference = np.abs(ours_probs - monai()).max()  # also a warm-up
        forward()
        times = {key: [] for key in ("ours", "monai", "forward")}
        inside = {key: [] for key in ("ours", "monai")}  # time spent in the model during the same call
        for _ in range(rounds):
            for key, function in (("ours", ours), ("monai", monai), ("forward", forward)):
                clock.reset()
                start = time.perf_counter()
                function()
                times[key].append(time.perf_counter() - start)
                if key in inside:
                    inside[key].append((times[key][-1] - clock.seconds) / clock.seconds)
        # Best of the rounds: on a shared machine other processes only ever add time.
        ours_s, monai_s, forward_s = (min(times[key]) for key in ("ours", "monai", "forward"))
        megapixels = size * size / 1e6
        print(
            f"{name:<6}{f'{size}x{size}':>11}{tiles:>7}{ours_s:>11.3f}{monai_s:>9.3f}{forward_s:>11.3f}"
            f"{megapixels / ours_s:>15.3f}{megapixels / monai_s:>13.3f}{monai_s / ours_s:>15.2f}"
            f"{(ours_s - forward_s) / forward_s:>11.1%}{statistics.median(inside['ours']):>8.1%}"
            f"{statistics.median(inside['monai']):>14.1%}"
        )
        print(f"{'':<6}max |unetseg - MONAI| = {difference:.2e} (image borders: mirrored context vs none)")
    print("stitching = (unetseg - forward) / forward, forward = the model alone on the same batches of tiles;")
    print("in-run = (call - time inside the model) / time inside the model, within the same call (median)")


class ForwardClock:
    """Forward hooks that add up the seconds a model spends in forward and the batch sizes it sees."""

    def __init__(self, model: nn.Module):
        model.register_forward_pre_hook(self._start)
        model.register_forward_hook(self._stop)
        self.reset()

    def reset(self) -> None:
        self.seconds, self.batches, self._started = 0.0, [], 0.0

    def _start(self, module, inputs) -> None:
        self.batches.append(inputs[0].shape[0])
        self._started = time.perf_counter()

    def _stop(self, module, inputs, output) -> None:
        self.seconds += time.perf_counter() - self._started


class TiffRows:
    """Rows of an uncompressed contiguous 2D TIFF as a (1, H, W) array-like, read with plain file reads."""

    def __init__(self, path: Path):
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            if not page.is_contiguous:
                raise ValueError(f"{path}: not an uncompressed contiguous TIFF")
            self.shape, self.dtype, self.offset = (1, *page.shape), page.dtype, page.dataoffsets[0]
        self.path = path

    def __getitem__(self, key):
        rows = key[1]
        width = self.shape[2]
        count = (rows.stop - rows.start) * width
        start = self.offset + rows.start * width * self.dtype.itemsize
        return np.fromfile(self.path, dtype=self.dtype, count=count, offset=start).reshape(1, -1, width)


class TiffRowWriter:
    """An empty float32 TIFF of (1, H, W) filled band by band with `writer[:, start:stop] = probs` (no mmap)."""

    def __init__(self, path: Path, shape: tuple[int, int, int]):
        tifffile.imwrite(path, shape=shape[1:], dtype=np.float32)  # sparse, contiguous, zero-filled
        with tifffile.TiffFile(path) as tiff:
            self.offset = tiff.pages[0].dataoffsets[0]
        self.shape, self.path = shape, path

    def __setitem__(self, key, probs):
        start = self.offset + key[1].start * self.shape[2] * 4
        with open(self.path, "r+b") as file:
            os.pwrite(file.fileno(), np.ascontiguousarray(probs, dtype=np.float32).tobytes(), start)


def memory_status_mb(field: str) -> float:
    """A field of /proc/self/status in MiB: VmRSS (resident now) or VmHWM (peak resident).

    VmHWM rather than getrusage's ru_maxrss: Linux carries ru_maxrss over exec, so a child
    would report at least the RSS its parent had when it was started.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(mode: str, source_path: Path, output_path: Path, value_range: tuple[float, float]) -> None:
    """One measured process: print its wall time and peak RSS as JSON."""
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    normalization = Normalization()
    if mode == "range":  # how unetseg.predict takes it: a histogram summed band by band
        result = {"range": plane_range(tifffile.memmap(source_path, mode="r"), 1, normalization)}
    elif mode == "range-whole":
        result = {"range": normalization.range(tifffile.memmap(source_path, mode="r"))}
    elif mode == "baseline":  # torch loaded and the model run once on a batch: the floor under everything
        with torch.inference_mode():
            tiny_model()(torch.zeros(BATCH_SIZE, 1, TILE_SIZE, TILE_SIZE))
        result = {}
    else:
        source = tifffile.memmap(source_path, mode="r")[None] if mode == "memmap" else TiffRows(source_path)
        out = TiffRowWriter(output_path, source.shape)
        model = tiny_model()
        before = memory_status_mb("VmRSS")
        predict_tiled(
            model,
            source,
            tile_size=TILE_SIZE,
            overlap=OVERLAP,
            batch_size=BATCH_SIZE,
            normalize=lambda band: normalization.apply(band, value_range),
            out=out,
        )
        result = {"rss_before_mb": before}
    result["seconds"] = time.perf_counter() - start
    result["peak_rss_mb"] = memory_status_mb("VmHWM")
    print(json.dumps(result))


def run_child(*args: str) -> dict:
    """Run `child` in a fresh interpreter and parse its report."""
    command = [sys.executable, __file__, "--child", *args]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run_memory(workdir: Path, modes: list[str]) -> None:
    """Predict a 12000 x 12000 uint16 TIFF into a float32 TIFF in subprocesses; print peak RSS."""
    workdir.mkdir(parents=True, exist_ok=True)
    source_path, output_path = workdir / f"huge_{HUGE}.tif", workdir / "huge_probs.tif"
    if not source_path.exists():
        image = tifffile.memmap(source_path, shape=(HUGE, HUGE), dtype=np.uint16)
        rng = np.random.default_rng(0)
        for start in range(0, HUGE, 1000):
            image[start : start + 1000] = rng.integers(100, 4000, size=(min(1000, HUGE - start), HUGE))
        image.flush()
        del image
    value_range = plane_range(tifffile.memmap(source_path, mode="r"), 1, Normalization())
    print(
        f"input {source_path} ({source_path.stat().st_size / 2**20:.0f} MiB uint16), "
        f"tile {TILE_SIZE}, overlap {OVERLAP}, batch {BATCH_SIZE}, {THREADS} threads, tiny model, "
        f"{tile_count(HUGE, HUGE)} tiles"
    )
    print(f"{'process':<44}{'seconds':>9}{'peak RSS MiB':>14}{'RSS before predict':>20}")
    labels = {
        "baseline": "baseline: torch + one forward, no image",
        "range": "unetseg.predict.plane_range(memmap)",
        "range-whole": "Normalization().range(memmap)",
        "memmap": "predict_tiled, input tifffile.memmap",
        "reads": "predict_tiled, input by file reads",
    }
    for mode in modes:
        report = run_child(mode, str(source_path), str(output_path), *map(str, value_range))
        before = f"{report['rss_before_mb']:.0f}" if "rss_before_mb" in report else ""
        print(f"{labels[mode]:<44}{report['seconds']:>9.1f}{report['peak_rss_mb']:>14.0f}{before:>20}")
        if mode.startswith("range") and tuple(report["range"]) != value_range:
            print(f"  range differs from plane_range: {report['range']} vs {value_range}")
        if mode in ("memmap", "reads"):
            check_output(source_path, output_path, value_range)


def check_output(source_path: Path, output_path: Path, value_range: tuple[float, float]) -> None:
    """The written TIFF's top rows equal a prediction of the top of the image (same tiles there)."""
    written = tifffile.memmap(output_path, mode="r")
    top = tifffile.memmap(source_path, mode="r")[None, :700]
    expected = predict_tiled(
        tiny_model(),
        Normalization().apply(top, value_range),
        tile_size=TILE_SIZE,
        overlap=OVERLAP,
        batch_size=BATCH_SIZE,
    )
    rows = 2 * (TILE_SIZE - OVERLAP) - OVERLAP // 2  # rows covered by the first two tile rows only
    if written.shape != (HUGE, HUGE) or not np.allclose(written[:rows], expected[0, :rows], rtol=0, atol=1e-6):
        raise SystemExit(f"{output_path}: written probabilities differ from a direct prediction")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("speed", "memory", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads for --part speed")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/unetseg_bench"))
    modes = ["baseline", "range", "range-whole", "memmap", "reads"]
    parser.add_argument(
        "--memory-modes",
        nargs="+",
        default=["baseline", "range", "memmap"],
        choices=modes,
        help="subprocesses to run for --part memory (each prediction takes about a minute)",
    )
    parser.add_argument("--child", nargs=5, metavar=("MODE", "SOURCE", "OUTPUT", "LOW", "HIGH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, source, output, low, high = args.child
        child(mode, Path(source), Path(output), (float(low), float(high)))
        return
    torch.set_num_threads(args.threads)
    if args.part in ("speed", "all"):
        run_speed(args.rounds)
    if args.part in ("memory", "all"):
        run_memory(args.workdir, args.memory_modes)


if __name__ == "__main__":
    main()
