"""Tiled inference: speed and accuracy against MONAI's sliding_window_inference, FLOP rate, memory on a huge image.

    .venv/bin/pip install monai   # for this benchmark only
    .venv/bin/python benchmarks/bench_inference.py --part speed    # about 10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_inference.py --part flops
    .venv/bin/python benchmarks/bench_inference.py --part memory

speed: UNet(depth 4, width 32) on a 1024 x 1024 image, tile 256, overlap 64, gaussian blend,
batch 8: predict_tiled (automatic precision, float32, bfloat16, and the network exported to ONNX
run by ONNX Runtime as `--backend onnxruntime` runs it) and MONAI (float32 as a user calls it,
and bfloat16 autocast with a channels-last model) on the same model object, alternated in one
process; best times, mean interior error against a whole-image forward pass, and the ratios.
flops: the forward FLOP rate (torch's FLOP counter) of UNet(depth 4, width 32) and of the
shipped nuclei network as a fraction of this machine's matmul peak (benchmarks/peak.py), in
float32 and bfloat16.
memory: a 12000 x 12000 uint16 TIFF predicted band by band into a float32 TIFF by a tiny
model, in a fresh subprocess that reports its own peak RSS (VmHWM).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from peak import machine_line, matmul_peak, measured_dtypes  # benchmarks/ is the script's folder
from torch import nn

from unetseg.inference import autocast_dtype, predict_tiled
from unetseg.inference.pipeline import plane_range
from unetseg.inference.tiling import padding, tile_starts
from unetseg.io import Normalization
from unetseg.models.unet import UNet

THREADS = 2  # the machine this was written on has 2 cores
TILE_SIZE = 256
OVERLAP = 64
BATCH_SIZE = 8
HUGE = 12000


def tiny_model() -> nn.Module:
    """Two 3x3 convolutions, width 4: the forward pass is cheap, so stitching costs show."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1)).eval()


def unet_model(depth: int = 4, width: int = 32) -> nn.Module:
    """The package's U-Net with BatchNorm statistics as after training (random, seeded), so outputs vary."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, classes=1, depth=depth, width=width)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(0.1 * torch.randn(size, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(size, generator=generator))
                module.weight.copy_(1 + 0.5 * torch.randn(size, generator=generator))
    return net.eval()


def tile_count(height: int, width: int) -> int:
    """Tiles predict_tiled cuts from an image, from the tiling geometry."""
    counts = []
    for length in (height, width):
        before, after = padding(length, TILE_SIZE)
        counts.append(len(tile_starts(before + length + after, TILE_SIZE, OVERLAP)))
    return counts[0] * counts[1]


def synthetic_image(size: int) -> np.ndarray:
    """A normalised (1, size, size) float32 image with blobs and noise."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / 37.0
    return (np.sin(y) * np.cos(x) + 0.3 * rng.normal(size=(size, size))).astype(np.float32)[None]


def whole_image_probs(model: nn.Module, image: np.ndarray, bf16: bool) -> np.ndarray:
    """The reference: one forward pass over the whole image, in float32 or under bfloat16 autocast."""
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return torch.sigmoid(model(torch.from_numpy(image)[None]).float())[0].numpy()


def onnxruntime_copy(model: nn.Module) -> nn.Module:
    """The network exported to ONNX and run by ONNX Runtime, as `unetseg predict --backend onnxruntime` runs it."""
    import tempfile

    from unetseg.export.onnx import OnnxPredictor, export_net

    folder = tempfile.mkdtemp(prefix="unetseg_bench_onnx_")
    return OnnxPredictor(export_net(model, Path(folder) / "unet.onnx"))


def run_speed(rounds: int, size: int) -> None:
    """predict_tiled against MONAI's sliding_window_inference on one image, alternated; best times, errors, ratios."""
    from monai.inferers import sliding_window_inference

    model = unet_model()
    image = synthetic_image(size)
    monai_tiles = []

    def monai(net: nn.Module, bf16: bool, memory_format=torch.contiguous_format) -> np.ndarray:
        def predictor(tiles: torch.Tensor) -> torch.Tensor:
            monai_tiles.append(len(tiles))
            return torch.sigmoid(net(tiles.contiguous(memory_format=memory_format)).float())

        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return sliding_window_inference(
                torch.from_numpy(image)[None],
                (TILE_SIZE, TILE_SIZE),
                BATCH_SIZE,
                predictor,
                overlap=OVERLAP / TILE_SIZE,
                mode="gaussian",
                sigma_scale=0.125,
                padding_mode="reflect",
            )[0].numpy()

    def ours(amp: bool | None, network: nn.Module = model) -> np.ndarray:
        return predict_tiled(network, image, tile_size=TILE_SIZE, overlap=OVERLAP, batch_size=BATCH_SIZE, amp=amp)

    runtime = onnxruntime_copy(model)

    channels_last = copy.deepcopy(model).to(memory_format=torch.channels_last)  # what a MONAI user can do
    runs = {  # name: (function, precision of its whole-image reference)
        "unetseg auto": (lambda: ours(None), autocast_dtype(torch.device("cpu")) is not None),
        "unetseg fp32": (lambda: ours(False), False),
        "unetseg bf16": (lambda: ours(True), True),
        "unetseg ORT": (lambda: ours(False, runtime), False),  # --backend onnxruntime
        "MONAI fp32": (lambda: monai(model, False), False),
        "MONAI bf16+CL": (lambda: monai(channels_last, True, torch.channels_last), True),
    }
    if torch.bfloat16 not in measured_dtypes():  # emulated bfloat16 takes minutes a run and no default uses it
        del runs["unetseg bf16"], runs["MONAI bf16+CL"]
    references = {bf16: whole_image_probs(model, image, bf16) for bf16 in {bf16 for _, bf16 in runs.values()}}
    margin = OVERLAP // 2
    inside = (slice(None), slice(margin, -margin), slice(margin, -margin))
    times, errors, errors_fp32 = {name: [] for name in runs}, {}, {}
    for round_index in range(rounds + 1):  # round 0 warms up and measures errors
        for name, (function, bf16) in runs.items():
            monai_tiles.clear()
            start = time.perf_counter()
            probs = function()
            seconds = time.perf_counter() - start
            if round_index == 0:
                errors[name] = float(np.abs(probs - references[bf16])[inside].mean())
                errors_fp32[name] = float(np.abs(probs - references[False])[inside].mean())
                if name.startswith("MONAI"):
                    tiles_monai = sum(monai_tiles)
            else:
                times[name].append(seconds)
    best = {name: min(values) for name, values in times.items()}  # others on a shared machine only add time
    tiles = tile_count(size, size)
    print(machine_line())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, UNet(depth 4, width 32), {size}x{size}, "
        f"tile {TILE_SIZE}, overlap {OVERLAP}, batch {BATCH_SIZE}, gaussian; tiles: unetseg {tiles}, MONAI "
        f"{tiles_monai}; best of {rounds} alternated rounds; load average {os.getloadavg()[0]:.1f}"
    )
    print(f"{'run':<16}{'seconds':>9}{'Mpx/s':>8}{'interior error':>16}{'vs fp32 forward':>17}")
    for name in runs:
        print(
            f"{name:<16}{best[name]:>9.2f}{size * size / 1e6 / best[name]:>8.3f}{errors[name]:>16.2e}"
            f"{errors_fp32[name]:>17.2e}"
        )
    print("interior error: mean |probs - whole-image forward| beyond overlap // 2 of the border, the forward in the")
    print("run's own precision (tiling error); 'vs fp32 forward' adds the bfloat16 rounding.")
    for ours_name, monai_name in (
        ("unetseg auto", "MONAI fp32"),
        ("unetseg fp32", "MONAI fp32"),
        ("unetseg ORT", "MONAI fp32"),
        ("unetseg ORT", "unetseg auto"),
        ("unetseg bf16", "MONAI bf16+CL"),
    ):
        if ours_name not in runs or monai_name not in runs:
            continue
        print(
            f"{ours_name} vs {monai_name}: {best[monai_name] / best[ours_name]:.2f}x faster, "
            f"error ratio {errors[ours_name] / errors[monai_name]:.2f}"
        )


NUCLEI = Path(__file__).resolve().parents[1] / "unetseg" / "weights" / "nuclei.ckpt"


def flop_networks() -> dict[str, tuple[nn.Module, int]]:
    """The networks whose FLOP rate is measured: (network, input channels) by name."""
    from unetseg.inference.loading import load_predictor

    nuclei, spec = load_predictor(NUCLEI, "cpu")
    return {"UNet(depth 4, width 32)": (unet_model(), 1), "nuclei (shipped, width 16)": (nuclei, spec.in_channels)}


def run_flops(rounds: int) -> None:
    """Each network's forward FLOP rate against this CPU's matmul peak (benchmarks/peak.py), in float32 and
    bfloat16, taking turns in one run; and the default precision's rate against the float32 peak."""
    from torch.utils.flop_counter import FlopCounterMode

    from unetseg.inference.fold import inference_copy

    print(machine_line())
    default = autocast_dtype(torch.device("cpu"))
    print(f"{'network':<28}{'precision':<11}{'GFLOP':>7}{'matmul GFLOP/s':>16}{'forward GFLOP/s':>17}{'fraction':>10}")
    for name, (network, channels) in flop_networks().items():
        model = inference_copy(network, channels_last=True)
        tiles = torch.randn(BATCH_SIZE, channels, TILE_SIZE, TILE_SIZE).contiguous(memory_format=torch.channels_last)
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(tiles)
        flops = counter.get_total_flops()
        rates = {}
        for dtype in measured_dtypes():
            bf16 = dtype == torch.bfloat16
            peak, forward = [], []
            for _ in range(rounds + 1):  # the first round warms up
                peak.append(matmul_peak(dtype, rounds=1))
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    start = time.perf_counter()
                    model(tiles)
                    forward.append(flops / (time.perf_counter() - start))
            rates[dtype] = max(peak[1:]), max(forward[1:])
            top, rate = rates[dtype]
            print(
                f"{name:<28}{'bf16' if bf16 else 'fp32':<11}{flops / 1e9:>7.1f}{top / 1e9:>16.1f}{rate / 1e9:>17.1f}"
                f"{rate / top:>10.1%}"
            )
        rate, fp32_peak = rates[default or torch.float32][1], rates[torch.float32][0]
        print(
            f"{name}: default precision ({'bf16' if default else 'fp32'}) forward at {rate / fp32_peak:.1%} of the "
            "fp32 matmul peak"
        )


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
    if mode == "range":  # how unetseg.inference.pipeline takes it: a histogram summed band by band
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
        "range": "unetseg.inference.pipeline.plane_range(memmap)",
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
    parser.add_argument("--part", choices=("speed", "flops", "memory", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024, help="image side for --part speed")
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
        run_speed(args.rounds, args.size)
    if args.part in ("flops", "all"):
        run_flops(args.rounds)
    if args.part in ("memory", "all"):
        run_memory(args.workdir, args.memory_modes)


if __name__ == "__main__":
    main()
