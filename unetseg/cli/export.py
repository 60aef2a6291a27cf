"""unetseg-export: a training checkpoint to an ONNX file or a bioimage.io package, checked against PyTorch."""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

from unetseg.export import (
    FORMATS,
    OPSET,
    check_format,
    check_sizes,
    export_net,
    load_checkpoint_net,
    max_abs_difference,
    min_size,
    size_multiple,
)
from unetseg.export.bioimageio import PACKAGE_SUFFIX
from unetseg.runtime.logs import add_verbosity_flags, setup_logging, verbosity_level
from unetseg.weights import MODELS, model_path

PROG = "unetseg-export"
BIOIMAGEIO = "bioimageio"
TOLERANCE = 1e-3  # float32 logits of an exact export differ by ~1e-5; more means the graph is wrong

DESCRIPTION = """\
Export the network of a training checkpoint (CKPT, e.g. runs/unet/checkpoints/best.ckpt, or
--model NAME for a shipped model) to OUT: ONNX (*.onnx, for ONNX Runtime and unetseg-predict
--checkpoint OUT), or a bioimage.io model package (*.zip, --format bioimageio).

Batch, height and width are dynamic. The graph pads H and W (reflect) to a multiple of
2**depth (UNet) or 2**encoder_depth (SMPUnet) and crops the logits back, as the PyTorch model
does: multiples (tile sizes such as 256) run unpadded, and any H and W of at least
2**(depth + 1) (UNet) or 2**encoder_depth (SMPUnet) give PyTorch's logits in any runtime;
unetseg's loaders pad smaller images as PyTorch does. The file also stores, as JSON, that
multiple (size_multiple), that minimum (min_size), the checkpoint's input_spec (channels,
normalisation, targets) and the network description, in the ONNX metadata_props.

The export is then checked on random inputs of two sizes, one not a multiple, and the largest
logit difference from PyTorch is printed.

bioimageio: a model-zoo package (format 0.5) for deepImageJ, ilastik, QuPath, napari and
bioimageio.core, holding ONNX and PyTorch state-dict weights (with the UNet source), the
normalisation as preprocessing (scale_range over all channels, clip), a sigmoid/softmax
postprocessing, test tensors, a cover and a README. When bioimageio.core is installed the
package is test-run with it (validation, test tensors, several sizes); unetseg-predict
--checkpoint OUT.zip predicts with it. Needs pip install 'unetseg[bioimageio]'.
"""

EPILOG = f"""\
exit status: 0 exported and checked; 1 the exported model differs from PyTorch by more than
{TOLERANCE:g} or gives NaN, or the bioimage.io test failed (the file is kept, for inspection);
2 usage errors (a missing,
unreadable or refused checkpoint: weights holding NaN or Inf, a network that is not unetseg's;
an unknown format, a suffix that doesn't match it, an output folder that can't be created).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of unetseg-export."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", type=Path, nargs="?", metavar="CKPT", help="a training checkpoint (.ckpt); omit with --model"
    )
    parser.add_argument(
        "out",
        type=Path,
        nargs="?",
        metavar="OUT",
        help=f"the file to write: {' or '.join('*' + suffix for suffix in FORMATS.values())} or *{PACKAGE_SUFFIX} "
        "(bioimageio); missing folders are created",
    )
    parser.add_argument("--model", metavar="NAME", help=f"export a model shipped with unetseg: {', '.join(MODELS)}")
    parser.add_argument(
        "--format",
        choices=(*FORMATS, BIOIMAGEIO),
        help=f"onnx or bioimageio (default: from OUT's suffix, {PACKAGE_SUFFIX} for bioimageio)",
    )
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, at least 17 (default {OPSET})")
    add_verbosity_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run unetseg-export; returns the exit status (0 exported, 1 check failed, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.model is not None and args.out is None:  # unetseg-export --model nuclei OUT
        args.checkpoint, args.out = None, args.checkpoint
    if args.out is None or (args.checkpoint is None) == (args.model is None):
        parser.error("give CKPT OUT, or --model NAME OUT")
    setup_logging(verbosity_level(args.verbose, args.quiet))
    started = time.perf_counter()
    if args.format == BIOIMAGEIO or (args.format is None and args.out.suffix.lower() == PACKAGE_SUFFIX):
        return export_package(args, started)
    try:
        if args.model is not None:
            args.checkpoint = model_path(args.model)
        format = check_format(args.format, args.out)  # before the slow load
        net, input_spec = load_checkpoint_net(args.checkpoint)
        out = export_net(net, args.out, format, input_spec=input_spec, opset=args.opset)
    except (OSError, ValueError, ImportError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 2
    sizes = check_sizes(net)
    difference = max_abs_difference(out, net, sizes)
    print(
        f"wrote {out} ({format}) in {time.perf_counter() - started:.1f} s; batch, H and W are dynamic: multiples "
        f"of {size_multiple(net)} run unpadded, sizes >= {min_size(net)} match PyTorch in any runtime"
    )
    print(
        f"max |exported - PyTorch| logit difference: {difference:.2g} on inputs of "
        f"{' and '.join(f'{height}x{width}' for height, width in sizes)}"
    )
    if not difference <= TOLERANCE:  # NaN and Inf fail too
        print(
            f"{PROG}: error: the exported model differs from PyTorch by {difference:.2g} > {TOLERANCE:g}",
            file=sys.stderr,
        )
        return 1
    return 0


def export_package(args: argparse.Namespace, started: float) -> int:
    """The bioimageio branch of `main`: write the package, then test-run it with bioimageio.core when installed."""
    from unetseg.export.bioimageio import export_bioimageio, test_package

    try:
        checkpoint = model_path(args.model) if args.model is not None else args.checkpoint
        out = export_bioimageio(checkpoint, args.out, opset=args.opset, nuclei=args.model == "nuclei")
    except (OSError, ValueError, ImportError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 2
    print(f"wrote {out} (bioimage.io model package, format 0.5) in {time.perf_counter() - started:.1f} s")
    try:
        passed, summary = test_package(out)
    except ImportError as error:
        print(f"{PROG}: not test-run: {error}", file=sys.stderr)
        return 0
    if not passed:
        print(f"{PROG}: error: bioimageio.core's test of {out} failed:\n{summary}", file=sys.stderr)
        return 1
    print(f"bioimageio.core test passed ({time.perf_counter() - started:.1f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
