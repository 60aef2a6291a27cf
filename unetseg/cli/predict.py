"""unetseg-predict: segment an image file or a folder of images with a trained checkpoint."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from unetseg.inference.batch import plan_outputs, predict_files, shard
from unetseg.inference.loading import BACKENDS, load_predictor
from unetseg.inference.overlay import overlay_path
from unetseg.inference.pipeline import FORMATS, OUTPUTS, PredictSettings
from unetseg.inference.tiling import BLENDS, TilingConfig
from unetseg.inference.volume import VolumeTiling
from unetseg.io.files import check_writable
from unetseg.io.source import DEFAULT_MAX_PIXELS
from unetseg.models.checkpoint import CheckpointError
from unetseg.runtime.logs import add_verbosity_flags, setup_logging, verbosity_level
from unetseg.weights import MODELS, model_path

log = logging.getLogger("unetseg.cli.predict")
DEFAULTS = TilingConfig()
VOLUME_DEFAULTS = VolumeTiling()
MIN_TILE, MAX_TILE = 16, 8192  # smaller tiles are all padding; a batch of 8 larger ones is > 2 GB per channel

PROG = "unetseg-predict"
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = {"auto": None, "fp32": False, "bf16": True}  # --precision -> TilingConfig.amp

DESCRIPTION = """\
Segment INPUT, an image file or a folder searched recursively, into OUTPUT: one TIFF per
input named <stem>.tif, of the same height and width, in OUTPUT's copy of INPUT's sub-folders.
Reads PNG, JPEG, BMP and TIFF (8/16-bit, float; grey, RGB, RGBA), ZYX TIFF stacks, which
are predicted plane by plane, and OME-Zarr images (*.zarr, *.ome.zarr folders; with
'unetseg[zarr]'), read chunk by chunk with their axes and scale, as are compressed and
tiled TIFFs. Images are converted and normalised exactly as the checkpoint's
training data were (channels, percentiles of the whole image or plane). The pixel size of
TIFF inputs (resolution, ImageJ unit and spacing, OME physical size) is copied to the outputs.
A file INPUT may name its OUTPUT .png (masks and labels, 8/16-bit). Inputs unlike the model's
training images (another channel count; intensities or brightness outside the training range,
for checkpoints that recorded them) get a warning saying what was converted or differs.
Volumes: a 3-D model (UNet spatial_dims 3) predicts ZYX TIFF stacks, NIfTI (.nii, .nii.gz)
and OME-Zarr volumes in 3-D tiles (--volume-tile, --volume-overlap); NIfTI outputs are NIfTI with the input's
affine and header, labels come from a 3-D watershed; several outputs (--output labels prob)
come from one run, as <name>_labels.nii.gz and <name>_prob.nii.gz; --format ome-zarr writes
<name>.ome.zarr scaled by the voxel size, --measure a CSV of the 3-D objects, --rois their
outlines plane by plane, --overlay the middle plane.

outputs (--output):
  mask    uint8: 0/255 foreground for one-class and boundary models, the class index for
          multi-class models
  prob    float32 probabilities (classes, H, W); (H, W) for one-class models
  labels  uint16/uint32 instance labels (nuclei) for foreground and boundary models, made in
          overlapping blocks of rows (about 8 M pixels with +-128 rows of context, at most 1024
          rows) and merged across block borders, so huge images need bounded memory
Masks and probabilities are predicted and written band by band. --rois and --measure add
labels to the outputs if they are not asked for.
"""

EPILOG = """\
Existing outputs are skipped unless --overwrite, so an interrupted run resumes; outputs are
written under a temporary name and renamed, so none is ever half written.
exit status: 0 when every file was predicted or skipped; 1 when some file failed (each is
named on stderr with the reason; the others are still predicted); 2 for usage errors (a
missing INPUT, no image files, a checkpoint that can't be used or is refused).
"""


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def zyx(text: str) -> tuple[int, int, int]:
    """argparse type: Z,Y,X non-negative integers, or one integer for every axis."""
    parts = text.split(",")
    if len(parts) not in (1, 3) or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f"expected Z,Y,X (e.g. 16,128,128) or one integer, got {text}")
    values = tuple(int(part) for part in parts)
    return values * 3 if len(values) == 1 else values


def tile_size(text: str) -> int:
    """argparse type: a tile side from MIN_TILE to MAX_TILE (larger tiles allocate gigabytes per batch)."""
    value = positive_int(text)
    if not MIN_TILE <= value <= MAX_TILE:
        raise argparse.ArgumentTypeError(f"must be from {MIN_TILE} to {MAX_TILE}, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of unetseg-predict."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", type=Path, metavar="INPUT", help="an image file, or a folder (searched recursively)")
    parser.add_argument(
        "output_path",
        type=Path,
        metavar="OUTPUT",
        help="output folder (for a file INPUT also a .tif file, or .png for --output mask/labels)",
    )
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--checkpoint",
        type=Path,
        metavar="PATH",
        help="a checkpoint from unetseg-train (.ckpt), or its export by unetseg-export (.onnx, bioimage.io .zip)",
    )
    model.add_argument("--model", metavar="NAME", help=f"a model shipped with unetseg: {', '.join(MODELS)}")
    parser.add_argument(
        "--tile-size",
        type=tile_size,
        default=DEFAULTS.tile_size,
        metavar="PIXELS",
        help=f"side of the square tiles, {MIN_TILE} to {MAX_TILE} (default {DEFAULTS.tile_size})",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        default=DEFAULTS.overlap,
        metavar="PIXELS",
        help=f"pixels shared by neighbouring tiles (default {DEFAULTS.overlap})",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULTS.batch_size,
        metavar="N",
        help=f"tiles per forward pass (default {DEFAULTS.batch_size})",
    )
    parser.add_argument(
        "--blend",
        choices=BLENDS,
        default=DEFAULTS.blend,
        help=f"how overlapping tiles are merged (default {DEFAULTS.blend})",
    )
    parser.add_argument(
        "--volume-tile",
        type=zyx,
        default=VOLUME_DEFAULTS.tile_size,
        metavar="Z,Y,X",
        help=f"3-D tiles of a 3-D model, in voxels (default {','.join(map(str, VOLUME_DEFAULTS.tile_size))})",
    )
    parser.add_argument(
        "--volume-overlap",
        type=zyx,
        default=VOLUME_DEFAULTS.overlap,
        metavar="Z,Y,X",
        help=f"voxels shared by neighbouring 3-D tiles (default {','.join(map(str, VOLUME_DEFAULTS.overlap))})",
    )
    parser.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        help="average the 8 flips and quarter turns of each tile (8x the compute); default: as the "
        "model was tuned (unetseg-tune --tta, e.g. the shipped nuclei model), else off",
    )
    parser.add_argument(
        "--output",
        choices=OUTPUTS,
        nargs="+",
        default=["mask"],
        metavar="KIND",
        help=f"what to write, one or more of {', '.join(OUTPUTS)} from one model run, e.g. --output labels prob "
        "(put INPUT and OUTPUT before it); several are named <stem>_<kind> (default mask)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="tiff",
        help="tiff, or ome-zarr: <stem>.ome.zarr with a pyramid and the input's scale; for an OME-Zarr input, "
        "labels and masks go into INPUT.zarr/labels/<kind> (default tiff)",
    )
    parser.add_argument(
        "--rois", action="store_true", help="also write <stem>_rois.zip, an ImageJ/Fiji ROI set of the labels"
    )
    parser.add_argument(
        "--measure",
        action="store_true",
        help="also write <stem>_objects.csv: per object label, area, centroid, bbox, mean intensity per channel "
        "(and calibrated area and centroid when the pixel size is known); for volumes, 3-D objects: volume, "
        "centroid and box in z, y, x",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        metavar="P",
        help="foreground probability threshold (default: the model's tuned value, see unetseg-tune, else 0.5)",
    )
    parser.add_argument(
        "--seed-threshold",
        type=float,
        metavar="P",
        help="--output labels: seed (interior) probability that starts an object (default: tuned, else --threshold)",
    )
    parser.add_argument(
        "--min-size",
        type=int,
        metavar="PIXELS",
        help="--output labels: smallest object kept (default: tuned, else 15)",
    )
    parser.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda or cuda:N (the N-th GPU)",
    )
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        default="auto",
        help="auto: bfloat16 autocast on CUDA and on CPUs with native bfloat16 (AVX512-BF16, AMX), float32 "
        "elsewhere; bf16 forces it (float16 on GPUs without bfloat16), fp32 turns it off (default auto)",
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="torch",
        help="what runs the network: torch, or onnxruntime (2-D models, float32; the checkpoint is exported "
        "once into the cache). Which is faster depends on the CPU: benchmarks/bench_inference.py --part "
        "speed measures both (default torch)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="run the network through torch.compile (inductor; compiled graphs are cached on disk between runs): "
        "it can pay on a GPU over a folder; off by default, as on the CPUs measured the compile time (minutes) "
        "was never won back (BENCHMARKS.md)",
    )
    parser.add_argument("--glob", metavar="PATTERN", help='only inputs whose path matches, e.g. "*.tif"')
    parser.add_argument("--overwrite", action="store_true", help="predict again files whose output exists")
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        metavar="N",
        help="refuse, unread, inputs whose header claims more pixels (height x width x planes) than this: "
        f"decompression bombs (default {DEFAULT_MAX_PIXELS:_}, a 30000 x 30000 image passes)",
    )
    parser.add_argument(
        "--overlay",
        action="store_true",
        help="also write <stem>_overlay.png next to each output: the input with the predicted outlines",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="predict only share K of N (0-based) of the files, e.g. one "
        "process of many; default: RANK/WORLD_SIZE under torchrun, SLURM_PROCID/SLURM_NTASKS "
        "under srun, else all files",
    )
    parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="predict on a Dask cluster: local:N (N worker processes here), tcp://HOST:8786 (a running scheduler), "
        "or slurm:N, pbs:N, lsf:N... (N dask-jobqueue jobs, configured by dask's jobqueue.yaml); a file INPUT is "
        "predicted block by block into OME-Zarr (--format ome-zarr), a folder file by file; the dashboard link is "
        "printed. Needs pip install 'unetseg[distributed]'",
    )
    add_verbosity_flags(parser)
    return parser


def device_name(text: str) -> str:
    """argparse type: auto, cpu, cuda or cuda:N."""
    kind, _, index = text.partition(":")
    if text in DEVICES or kind == "cuda" and index.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"expected one of {', '.join(DEVICES)} or cuda:N, got {text!r}")


def resolve_device(name: str) -> torch.device:
    """The torch device for --device; ValueError when CUDA (or GPU N of cuda:N) is asked for and absent.

    Under torchrun or srun, CUDA means this process's own GPU (LOCAL_RANK / SLURM_LOCALID).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    if name.startswith("cuda:"):
        index, count = int(name.partition(":")[2]), torch.cuda.device_count()
        if index >= count:
            raise ValueError(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return torch.device("cuda", index)
    if name == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(name)


def resolve_shard(text: str | None) -> tuple[int, int]:
    """(index, count) from --shard K/N, else from the torchrun or SLURM environment, else (0, 1)."""
    if text is None:
        for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
            if rank in os.environ and world in os.environ:
                return int(os.environ[rank]), int(os.environ[world])
        return 0, 1
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit()) or not int(index) < int(count):
        raise ValueError(f"--shard {text}: expected K/N with 0 <= K < N, e.g. 0/4")
    return int(index), int(count)


def predict_with_dask(args: argparse.Namespace, checkpoint: Path, pairs: list, settings: PredictSettings) -> int:
    """--dask: the prediction on a Dask cluster (`unetseg.distributed.predict_on_cluster`); returns the exit status."""
    try:
        from unetseg.distributed import predict_on_cluster  # dask only here: the default path never imports it

        summary = predict_on_cluster(
            args.dask,
            checkpoint,
            args.input,
            settings=settings,
            pairs=pairs,
            device=args.device,
            overwrite=args.overwrite,
            progress=not args.quiet,
            announce=lambda link: print(f"{PROG}: Dask dashboard: {link}", flush=True),
        )
    except (ImportError, ValueError, OSError) as error:
        log.error("%s", error)
        log.debug("traceback", exc_info=True)
        return 2
    print(f"{PROG}: {summary}")
    return 1 if summary.failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run unetseg-predict; returns the exit status (0 all done, 1 some file failed, 2 usage error)."""
    args = build_parser().parse_args(argv)
    setup_logging(verbosity_level(args.verbose, args.quiet))
    try:
        tiling = TilingConfig(
            tile_size=args.tile_size,
            overlap=args.overlap,
            batch_size=args.batch_size,
            blend=args.blend,
            tta=args.tta,
            amp=PRECISIONS[args.precision],
            compile=args.compile,
        )
        volume = VolumeTiling(args.volume_tile, args.volume_overlap)
        settings = PredictSettings(
            output=args.output[0] if len(args.output) == 1 else tuple(args.output),
            format=args.format,
            rois=args.rois,
            measure=args.measure,
            threshold=args.threshold,
            tiling=tiling,
            max_pixels=args.max_pixels,
            seed_threshold=args.seed_threshold,
            min_size=args.min_size,
            volume=volume,
            overlay=args.overlay,
        )
        index, count = resolve_shard(args.shard)
        pairs = shard(plan_outputs(args.input, args.output_path, args.glob), index, count)
        for _, target in pairs[:1]:
            settings.check_target(target)
            check_writable(target.parent)  # a read-only OUTPUT fails once, here, not once per file
        device = resolve_device("cpu" if args.dask else args.device)  # with --dask, each worker picks its own
        checkpoint = args.checkpoint if args.checkpoint is not None else model_path(args.model)
        if args.backend == "onnxruntime" and (args.dask or args.precision == "bf16"):
            clash = "--dask (its workers load the checkpoint in torch)" if args.dask else "--precision bf16"
            raise ValueError(f"--backend onnxruntime runs in float32 on this process; it does not combine with {clash}")
        model, spec = load_predictor(checkpoint, device, args.backend)
        settings.check(spec)
    except (ValueError, OSError, CheckpointError) as error:
        log.error("%s", error)
        log.debug("traceback", exc_info=True)
        return 2
    share = f" (share {index}/{count})" if count > 1 else ""
    if not args.quiet:
        print(f"{PROG}: {len(pairs)} file(s){share}, {checkpoint} on {device}")
        if args.tta is None and spec.tta:
            print(f"{PROG}: averaging 8 flips and turns of each tile, as this model was tuned (--no-tta: 8x faster)")
    if args.dask:
        return predict_with_dask(args, checkpoint, pairs, settings)
    summary = predict_files(model, spec, pairs, settings, overwrite=args.overwrite, progress=not args.quiet)
    print(f"{PROG}: {summary}")
    if args.overlay and summary.done:
        print(f"{PROG}: overlays (input with predicted outlines): {overlay_path(pairs[0][1])} and the like")
    return 1 if summary.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
