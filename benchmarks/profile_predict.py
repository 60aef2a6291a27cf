"""Where prediction's time goes: `unetseg predict` under torch.profiler, per stage, for a folder of images and a volume.

    .venv/bin/python benchmarks/profile_predict.py --data ../shared/data/dsb2018     # ~3 min on 2 cores

Two runs of the merged pipeline, each the command line's `main` in this process under
`torch.profiler.profile` (CPU activities):

- folder: 20 real DSB2018 images (a fixed selection stratified by image type, as
  bench_ensemble.py picks them) predicted by the shipped nuclei model at its defaults (TTA,
  automatic precision) into instance labels (TIFF);
- volume: a 64 x 512 x 512 uint16 stack of ellipsoidal nuclei predicted by a tiny 3-D U-Net
  (configs/tiny3d.yaml, trained for a few seconds, as bench_volume_memory.py does) into 3-D labels.

The engine, labeller and writers mark their work as stages (`unetseg.runtime.profiling`):
read, normalise, tile, forward, blend, post-process, write. The table gives each stage's own
seconds (nested stages subtracted) and its share of the run's wall time; "other" is the rest
(loading the model, opening files, Python between the stages, the profiler itself). A plain
run of each job without the profiler measures the profiler's overhead.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from bench_ensemble import select_images  # benchmarks/ is the script's folder
from bench_volume_memory import write_volume
from peak import machine_line
from torch.profiler import ProfilerActivity, profile

from unetseg.cli import predict
from unetseg.runtime.profiling import STAGES, stage_seconds

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "dsb2018"


def tiny3d_checkpoint(work: Path) -> Path:
    """A tiny 3-D U-Net trained for a few seconds on the embedded synthetic volumes (cached in `work`)."""
    checkpoint = work / "tiny3d" / "checkpoints" / "last.ckpt"
    if not checkpoint.exists():
        from unetseg.cli import train

        train.main(
            ["--config", "tiny3d", "--trainer.default_root_dir", str(work / "tiny3d"), "--trainer.max_epochs", "4"]
            + ["--data.tiles_per_epoch", "16", "--trainer.enable_progress_bar", "false"]
        )
    return checkpoint


def profiled(argv: list[str]) -> tuple[float, float, dict[str, float]]:
    """(seconds without the profiler, seconds with it, each stage's own seconds) of `unetseg predict argv`."""
    start = time.perf_counter()
    predict.main(argv)
    plain = time.perf_counter() - start
    with profile(activities=[ProfilerActivity.CPU]) as run:
        start = time.perf_counter()
        predict.main(argv)
        wall = time.perf_counter() - start
    return plain, wall, stage_seconds(run.events())


def table(name: str, plain: float, wall: float, seconds: dict[str, float]) -> str:
    """A markdown table of one run's stages."""
    rows = [f"{name}: {wall:.1f} s under the profiler, {plain:.1f} s without it", ""]
    rows += ["| stage | seconds | share of wall |", "|---|---|---|"]
    for stage in STAGES:
        rows.append(f"| {stage} | {seconds[stage]:.2f} | {seconds[stage] / wall:.1%} |")
    other = wall - sum(seconds.values())
    rows.append(f"| other | {other:.2f} | {other / wall:.1%} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="DSB2018 folder with images/ and masks/")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--volume", type=int, nargs=3, default=(64, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/unetseg_profile"))
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    print(machine_line())

    names, _, quota = select_images(args.data, args.images)
    with tempfile.TemporaryDirectory(dir=work) as folder:
        images = Path(folder) / "images"
        images.mkdir()
        for name in names:
            (images / name).symlink_to((args.data / "images" / name).resolve())
        argv = [str(images), str(Path(folder) / "labels"), "--model", "nuclei", "--output", "labels"]
        plain, wall, seconds = profiled(argv + ["--overwrite", "-q"])
    print(table(f"folder of {len(names)} DSB2018 images {quota}, nuclei model, labels", plain, wall, seconds))

    shape = tuple(args.volume)
    volume = work / f"volume_{'x'.join(map(str, shape))}.tif"
    if not volume.exists():
        write_volume(volume, shape)
    checkpoint = tiny3d_checkpoint(work)
    argv = [str(volume), str(work / "volume_labels.tif"), "--checkpoint", str(checkpoint), "--output", "labels"]
    plain, wall, seconds = profiled(argv + ["--overwrite", "-q"])
    print()
    print(table(f"volume {' x '.join(map(str, shape))} uint16, tiny 3-D U-Net, labels", plain, wall, seconds))


if __name__ == "__main__":
    sys.exit(main())
