"""A 3-D U-Net against plane-by-plane prediction of a 2-D U-Net, on synthetic anisotropic nuclei volumes.

    .venv/bin/python experiments/volumes_vs_planes.py [--steps 600] [--work runs/volumes_vs_planes]

Both networks have three downsamplings, instance norm, about 0.2 M parameters, the same
boundary targets (background / interior / edge), the same number of optimiser steps on the
same voxels per batch (2 patches of 16 x 48 x 48 in 3-D, 32 tiles of 48 x 48 in 2-D), the same
training volumes (the 2-D net sees their planes) and the same held-out validation volumes. Both
are scored on held-out volumes the same way: probabilities (of each plane, for the 2-D net)
stacked into a volume, then one 3-D watershed with the voxel spacing, then 3-D instance
matching (F1 at IoU > 0.5, `unetseg.evaluation.metrics`). Writes reports/volumes.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from unetseg.evaluation.metrics import segmentation_scores, summarize  # noqa: E402
from unetseg.inference.loading import load_predictor  # noqa: E402
from unetseg.inference.pipeline import PredictSettings, predict_image  # noqa: E402
from unetseg.inference.postprocess import to_labels  # noqa: E402
from unetseg.inference.volume import VolumeTiling  # noqa: E402
from unetseg.io.volumes import open_volume, read_volume_labels  # noqa: E402
from unetseg.synthetic import make_nuclei_volumes  # noqa: E402

POOL_3D = "[[1, 2, 2], [2, 2, 2], [2, 2, 2]]"  # 4x thicker slices: the first level pools in-plane only


def write_planes(volumes: Path, planes: Path) -> None:
    """Every plane of every training volume as a 2-D image/mask pair (`<volume>_z<k>.tif`)."""
    for image_path in sorted((volumes / "images").iterdir()):
        stem = image_path.name.split(".")[0]
        image = np.asarray(open_volume(image_path).voxels[:])
        labels = read_volume_labels(next((volumes / "masks").glob(f"{stem}.*")))
        for z, (plane, mask) in enumerate(zip(image, labels)):
            for folder, array in (("images", plane), ("masks", mask.astype(np.uint16))):
                (planes / folder).mkdir(parents=True, exist_ok=True)
                tifffile.imwrite(planes / folder / f"{stem}_z{z:02d}.tif", array)


def train(config: list[str], run: Path, log: Path) -> subprocess.Popen:
    """Start `python -m unetseg train` on one thread, in the background."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "unetseg", "train", *config, "--trainer.default_root_dir", str(run)]
    command += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def score(checkpoint: Path, test: Path, settings: PredictSettings) -> tuple[dict, dict]:
    """3-D scores of a model's labels on every held-out volume, and their summary: the probabilities of the
    volume (of each plane, for a 2-D model) labelled by one 3-D watershed with the voxel spacing."""
    model, spec = load_predictor(checkpoint, "cpu")
    options = settings.label_options(spec)
    probabilities = dataclasses.replace(settings, output="prob")
    per_volume = {}
    for image_path in sorted((test / "images").iterdir()):
        volume = open_volume(image_path)
        stem = image_path.name.split(".")[0]
        truth = read_volume_labels(next((test / "masks").glob(f"{stem}.*")))
        probs = predict_image(model, spec, np.asarray(volume.planes[:]), probabilities)  # (Z, [C,] Y, X)
        probs = np.moveaxis(probs, 1, 0) if probs.ndim == 4 else probs[None]
        spacing = volume.spacing if all(volume.spacing) else None
        labels = to_labels(probs, spacing=spacing, **options)
        per_volume[stem] = segmentation_scores(labels, truth)
    return per_volume, summarize(list(per_volume.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps of each network")
    parser.add_argument("--steps-per-epoch", type=int, default=50, help="steps between validations")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "volumes_vs_planes")
    parser.add_argument("--train-volumes", type=int, default=10)
    parser.add_argument("--test-volumes", type=int, default=4)
    parser.add_argument("--width-3d", type=int, default=6)
    parser.add_argument("--width-2d", type=int, default=10)
    args = parser.parse_args()
    work = args.work
    volumes = make_nuclei_volumes(work / "train", count=args.train_volumes, seed=0)
    test = make_nuclei_volumes(work / "test", count=args.test_volumes, seed=1000)
    planes = work / "train_planes"
    if not (planes / "images").is_dir():
        write_planes(volumes, planes)
    names = [f"volume_{index:03d}" for index in range(args.train_volumes)]
    val = names[-2:]
    (work / "split3d.json").write_text(json.dumps({"train": names[:-2], "val": val}))
    plane_names = sorted(path.stem for path in (planes / "images").iterdir())
    split2d = {
        "train": [n for n in plane_names if n.split("_z")[0] not in val],
        "val": [n for n in plane_names if n.split("_z")[0] in val],
    }
    (work / "split2d.json").write_text(json.dumps(split2d))
    steps = str(args.steps)
    common = ["--trainer.max_steps", steps, "--trainer.max_epochs", "1000"]
    common += ["--data.targets", "boundary", "--data.num_workers", "0", "--model.net.init_args.classes", "3"]
    common += ["--model.net.init_args.depth", "3", "--model.net.init_args.norm", "instance"]
    common += ["--model.net.init_args.block", "plain", "--trainer.precision", "32-true", "--model.lr", "0.003"]
    three_d = ["--config", "unet3d", "--data.root", str(volumes), "--data.split_file", str(work / "split3d.json")]
    three_d += ["--model.net.init_args.width", str(args.width_3d), "--model.net.init_args.pool", POOL_3D]
    three_d += ["--data.patch_size", "[16, 48, 48]", "--data.batch_size", "2"]
    three_d += ["--data.tiles_per_epoch", str(2 * args.steps_per_epoch)]
    two_d = ["--config", "unet", "--data.root", str(planes), "--data.split_file", str(work / "split2d.json")]
    two_d += ["--model.net.init_args.width", str(args.width_2d), "--model.net.init_args.in_channels", "1"]
    two_d += ["--data.in_channels", "1", "--data.tile_size", "48", "--data.batch_size", "32"]
    two_d += ["--data.tiles_per_epoch", str(32 * args.steps_per_epoch), "--data.border_weights", "false"]
    runs = {"3-D U-Net": work / "run3d", "2-D U-Net, plane by plane": work / "run2d"}
    configs = {"3-D U-Net": three_d + common, "2-D U-Net, plane by plane": two_d + common}
    started, processes, seconds = time.perf_counter(), {}, {}
    for name, run in runs.items():
        if not (run / "checkpoints" / "best.ckpt").is_file():
            processes[name] = train(configs[name], run, work / f"{run.name}.log")
    while processes:  # both train at once, one thread each
        for name, process in list(processes.items()):
            if process.poll() is not None:
                if process.returncode:
                    raise SystemExit(f"{name}: training failed, see {work / runs[name].name}.log")
                seconds[name] = time.perf_counter() - started
                del processes[name]
        time.sleep(1)
    settings = PredictSettings(output="labels", volume=VolumeTiling((16, 96, 96), (4, 32, 32)))
    results = {}
    for name, run in runs.items():
        checkpoint = run / "checkpoints" / "best.ckpt"
        model, _ = load_predictor(checkpoint)
        per_volume, summary = score(checkpoint, test, settings)
        pooled_f1 = 2 * summary["tp"] / max(1, 2 * summary["tp"] + summary["fp"] + summary["fn"])
        results[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "train_seconds": seconds.get(name),
            "summary": summary,
            "pooled_f1": pooled_f1,
            "volumes": per_volume,
        }
    write_report(results, args, work)


def write_report(results: dict, args, work: Path) -> None:
    """reports/volumes.md (a table) and reports/volumes.json (everything)."""
    reports = REPO / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "volumes.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    lines = [
        "# 3-D U-Net vs plane-by-plane 2-D U-Net on anisotropic volumes",
        "",
        f"`.venv/bin/python experiments/volumes_vs_planes.py --steps {args.steps}` (CPU, one thread per network).",
        f"Synthetic nuclei volumes (`unetseg.synthetic.make_nuclei_volumes`, 24 x 96 x 96 voxels of 2.0 x 0.5 x 0.5"
        f" micron): {args.train_volumes} for training (2 of them for validation), {args.test_volumes} held out"
        " (another seed). Both networks: boundary targets, depth 3, instance norm, the same steps and voxels per"
        " batch; labels from one 3-D watershed of the stacked probabilities, with the voxel spacing.",
        "",
        "| network | parameters | steps | training time | 3-D instance F1 @ IoU 0.5 (pooled) | mean F1 | "
        "TP / FP / FN | mean Dice | mean DSB score |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        summary = result["summary"]
        took = f"{result['train_seconds'] / 60:.0f} min" if result["train_seconds"] else "(reused)"
        lines.append(
            f"| {name} | {result['parameters'] / 1e3:.0f} k | {args.steps} | {took} | {result['pooled_f1']:.3f} | "
            f"{summary['f1']:.3f} | {summary['tp']} / {summary['fp']} / {summary['fn']} | {summary['dice']:.3f} | "
            f"{summary['dsb_score']:.3f} |"
        )
    (reports / "volumes.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
