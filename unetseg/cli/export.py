"""unetseg-export: a training checkpoint to an ONNX file, checked against PyTorch."""

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
from unetseg.logs import add_verbosity_flags, setup_logging, verbosity_level

PROG = "unetseg-export"
TOLERANCE = 1e-3  # float32 logits of an exact export differ by ~1e-5; more means the graph is wrong

DESCRIPTION = """\
Export the network of a training checkpoint (CKPT, e.g. runs/unet/checkpoints/best.ckpt) to
OUT: ONNX (*.onnx, for ONNX Runtime and unetseg-predict --checkpoint OUT).

Batch, height and width are dynamic. The graph pads H and W (reflect) to a multiple of
2**depth (UNet) or 2**encoder_depth (SMPUnet) and crops the logits back, as the PyTorch model
does: multiples (tile sizes such as 256) run unpadded, and any H and W of at least
2**(depth + 1) (UNet) or 2**encoder_depth (SMPUnet) give PyTorch's logits in any runtime;
unetseg's loaders pad smaller images as PyTorch does. The file also stores, as JSON, that
multiple (size_multiple), that minimum (min_size), the checkpoint's input_spec (channels,
normalisation, targets) and the network description, in the ONNX metadata_props.

The export is then checked on random inputs of two sizes, one not a multiple, and the largest
logit difference from PyTorch is printed.
"""

EPILOG = f"""\
exit status: 0 exported and checked; 1 the exported model differs from PyTorch by more than
{TOLERANCE:g} or gives NaN (the file is kept, for inspection); 2 usage errors (a missing,
unreadable or refused checkpoint: weights holding NaN or Inf, a network that is not unetseg's;
an unknown format, a suffix that doesn't match it, an output folder that can't be created).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of unetseg-export."""
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, metavar="CKPT", help="a training checkpoint (.ckpt)")
    parser.add_argument(
        "out",
        type=Path,
        metavar="OUT",
        help=f"the file to write: {' or '.join('*' + suffix for suffix in FORMATS.values())}; "
        "missing folders are created",
    )
    parser.add_argument("--format", choices=tuple(FORMATS), help="onnx (default: from OUT's suffix)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset, at least 17 (default {OPSET})")
    add_verbosity_flags(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run unetseg-export; returns the exit status (0 exported, 1 check failed, 2 usage error)."""
    args = build_parser().parse_args(argv)
    setup_logging(verbosity_level(args.verbose, args.quiet))
    started = time.perf_counter()
    try:
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


if __name__ == "__main__":
    raise SystemExit(main())
