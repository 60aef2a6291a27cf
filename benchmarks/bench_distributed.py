"""Block-wise prediction on a Dask cluster against the single-process path, on this machine.

    .venv/bin/python benchmarks/bench_distributed.py [--shape 2048 2048] [--large 4096 4096] [--workers 1 2]

A uint16 OME-Zarr of synthetic nuclei (512 x 512 chunks) is predicted by the shipped nuclei model
(no TTA) into labels and probabilities, in OME-Zarr: once by `predict_file` in one process (torch
on every core), then by `unetseg.distributed` on `local:N` for each N (torch threads: cores / N),
each run in a fresh child process. Reported: wall time and throughput against the single process,
the client's peak RSS and every worker's (each process's own ru_maxrss), the passes of the block-wise
run (ranges, blocks, merge, pyramids) and whether its labels equal the single process's up to
renumbering. `--large` repeats the 2-worker run on a 4x larger image: a worker's peak follows
the block (core, halo and tiles), not the image, so it should barely move while the image grows.

What the client and the scheduler hold for N nodes (the written model): per block, a task of a few
hundred bytes (its geometry and paths) and a result of four integers; per object, one node of the
label merge (8 bytes of offsets, component and final number: 1e6 objects ~ 30 MB); per face, the
pairs of ids across it (objects crossing faces). Pixels stay on the workers and the shared disk.
The merge costs one connected-components pass over objects + pairs on the client (linear), plus one
face task per block and one relabel task per block (each reads one block of ids): as blocks grow,
there are fewer faces and tasks, and each task is larger; the merge itself is independent of block size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def nuclei(shape, seed=0, step=40) -> np.ndarray:
    """uint16 nuclei on a jittered grid, a third touching a smaller one, blurred, with noise."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    rows, cols = shape
    for cy in range(step // 2, rows, step):
        for cx in range(step // 2, cols, step):
            y, x, r = cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8), rng.uniform(5, 9)
            discs = [(y, x, r)]
            if rng.random() < 0.3:
                angle, small = rng.uniform(0, 2 * np.pi), r - rng.uniform(1.5, 3)
                discs.append((y + (r + small - 1.5) * np.sin(angle), x + (r + small - 1.5) * np.cos(angle), small))
            for y, x, r in discs:
                y0, y1 = int(max(0, y - r - 1)), int(min(rows, y + r + 2))
                x0, x1 = int(max(0, x - r - 1)), int(min(cols, x + r + 2))
                if y1 <= y0 or x1 <= x0:
                    continue
                yy, xx = np.mgrid[y0:y1, x0:x1]
                image[y0:y1, x0:x1][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = rng.uniform(0.5, 1.0)
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0.05, 0.02, shape)
    return np.clip(image * 40000, 0, 65535).astype(np.uint16)


def write_input(path: Path, shape) -> Path:
    from unetseg.io.source import Calibration
    from unetseg.io.zarr import OmeZarrWriter

    store = OmeZarrWriter(path, shape, np.uint16, "yx", Calibration(), False)
    store.array = store.group.create_array("0", shape=shape, dtype=np.uint16, chunks=(512, 512), overwrite=True)
    store.array[...] = nuclei(shape)
    return store.commit()


def settings():
    from unetseg.inference.pipeline import PredictSettings
    from unetseg.inference.tiling import TilingConfig

    return PredictSettings(output=("labels", "prob"), tiling=TilingConfig(tta=False), format="ome-zarr")


def child(args) -> None:
    """One measured run, in this fresh process; prints one JSON line."""
    import torch

    from unetseg.weights import model_path

    source, out, checkpoint = Path(args.source), Path(args.out), model_path("nuclei")
    started = time.perf_counter()
    if args.child == "single":
        from unetseg.inference.loading import load_predictor
        from unetseg.inference.pipeline import predict_file

        torch.set_num_threads(os.cpu_count() or 1)
        model, spec = load_predictor(checkpoint, "cpu")
        predict_file(model, spec, source, out / "image.tif", settings())
        result = {"seconds": time.perf_counter() - started}
    else:
        from unetseg.distributed import connect, predict_blocks, use_model

        workers = int(args.child)
        with connect(f"local:{workers}") as client:
            on_cluster = use_model(client, checkpoint, "cpu", torch_threads=max(1, (os.cpu_count() or 1) // workers))
            ready = time.perf_counter()
            report = predict_blocks(client, on_cluster, source, out / "image.tif", settings())
            peaks = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result = {
            "seconds": time.perf_counter() - started,
            "startup": ready - started,
            "phases": report.phases,
            "blocks": report.blocks,
            "objects": report.objects,
            "worker_peak_mb": sorted(peaks.values()),
        }
    result["client_peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def run(kind: str, source: Path, out: Path) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--source", str(source), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1).astype(np.int64), axis=0)
    return len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=2, default=[2048, 2048])
    parser.add_argument("--large", type=int, nargs=2, default=[4096, 4096], help="the 2-worker memory check's image")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/bench_distributed"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    import shutil

    import zarr

    shutil.rmtree(args.folder, ignore_errors=True)
    source = write_input(args.folder / "image.ome.zarr", tuple(args.shape))
    pixels = int(np.prod(args.shape))
    print(
        f"{args.shape[0]} x {args.shape[1]} uint16 OME-Zarr (512 chunks), nuclei model (no TTA), labels + prob, "
        f"{os.cpu_count()} CPU cores"
    )
    single = run("single", source, args.folder / "single")
    print(
        f"single process : {single['seconds']:6.1f} s  {pixels / single['seconds'] / 1e6:5.2f} Mpx/s  "
        f"peak {single['client_peak_mb']:6.0f} MB"
    )
    reference = zarr.open_group(str(source / "labels" / "labels"), mode="r")["0"][...]
    shutil.rmtree(source / "labels")
    for workers in args.workers:
        result = run(str(workers), source, args.folder / f"local{workers}")
        labels = zarr.open_group(str(source / "labels" / "labels"), mode="r")["0"][...]
        shutil.rmtree(source / "labels")
        phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in result["phases"].items())
        print(
            f"local:{workers:<2}       : {result['seconds']:6.1f} s  {pixels / result['seconds'] / 1e6:5.2f} Mpx/s  "
            f"x{single['seconds'] / result['seconds']:.2f} of single; start-up {result['startup']:.1f} s, "
            f"{result['blocks']} blocks: {phases}; client peak {result['client_peak_mb']:.0f} MB, worker peaks "
            f"{', '.join(f'{mb:.0f}' for mb in result['worker_peak_mb'])} MB; labels equal the single process's "
            f"up to renumbering: {same_up_to_renumbering(labels, reference)}"
        )
    if args.large:
        large = write_input(args.folder / "large.ome.zarr", tuple(args.large))
        result = run("2", large, args.folder / "large")
        print(
            f"local:2 on {args.large[0]} x {args.large[1]} ({np.prod(args.large) / pixels:.0f}x the pixels): "
            f"{result['seconds']:.1f} s, {result['blocks']} blocks, worker peaks "
            f"{', '.join(f'{mb:.0f}' for mb in result['worker_peak_mb'])} MB, client peak "
            f"{result['client_peak_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
