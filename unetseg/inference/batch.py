"""Prediction of folders: which outputs the inputs get (`plan_outputs`), this process's share of them
(`shard`), and the loop that predicts each file with one `unetseg.inference.pipeline.Prediction`, naming the
files that fail without stopping the others (`predict_files`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from tqdm import tqdm

from unetseg.inference.pipeline import Prediction, PredictSettings, output_suffix, output_targets
from unetseg.io import (
    IMAGE_SUFFIXES,
    TIFF_SUFFIXES,
    DuplicateNameError,
    ImageReadError,
    find_images,
    image_key,
    is_image_file,
)
from unetseg.io.domain import DomainReport
from unetseg.io.registry import container, output_container
from unetseg.spec import InputSpec

__all__ = ["PredictSummary", "plan_outputs", "predict_files", "shard", "split_done"]

log = logging.getLogger(__name__)


def plan_outputs(input: str | Path, output: str | Path, glob: str | None = None) -> list[tuple[Path, Path]]:
    """(input file, output file) pairs: INPUT's image files, searched recursively, mirrored under OUTPUT.

    A file INPUT gives one pair: OUTPUT itself when it ends in .tif/.tiff or .png, else OUTPUT/<stem>.tif
    (NIfTI inputs: OUTPUT .nii/.nii.gz, else OUTPUT/<stem>.nii.gz or .nii, as the input);
    another image suffix (.jpg...) is refused, as is a file name as OUTPUT of a folder INPUT.
    Hidden files and folders, and anything inside OUTPUT, are not searched. `glob` filters the
    image files by their path relative to INPUT (`PurePath.match`, so "*.tif" matches at any
    depth). Raises ValueError for a missing INPUT, OUTPUT equal to INPUT, no image files, or two
    inputs with one output name.
    """
    root, output = Path(input), Path(output)
    if root.is_file() or container(root) == "ome-zarr" and root.is_dir():
        if not is_image_file(root):
            raise ValueError(f"INPUT {root}: not an image file (expected one of {', '.join(IMAGE_SUFFIXES)})")
        named = output_container(output) in ("nifti", "png") or output.suffix.lower() in TIFF_SUFFIXES
        target = output if named else output / f"{image_key(root, root.parent)}{output_suffix(root)}"
        if not named and output.suffix.lower() in IMAGE_SUFFIXES:
            raise ValueError(f"OUTPUT {output}: outputs are .tif/.tiff, or .png for masks and labels")
        if target.resolve() == root.resolve():
            raise ValueError(f"OUTPUT {target} is the input file; choose another name")
        if target != output and target.exists() and target.parent.resolve() == root.parent.resolve():
            raise ValueError(
                f"OUTPUT {target} exists beside the input and may be one of your images; it is never "
                "written over: choose another folder, or name the output file"
            )
        return [(root, target)]
    if not root.is_dir():
        raise ValueError(f"INPUT {root}: no such file or folder")
    if output.suffix.lower() in IMAGE_SUFFIXES:
        raise ValueError(f"OUTPUT {output}: a folder INPUT needs an OUTPUT folder, not a file name")
    if output.resolve() == root.resolve():
        raise ValueError(f"OUTPUT {output} is the INPUT folder; outputs would replace inputs, choose another folder")
    inside = output.resolve().is_relative_to(root.resolve())
    try:
        files = find_images(root, glob, exclude=output if inside else None)
    except DuplicateNameError as error:
        raise ValueError(
            f"{error.first} and {error.second} would both be written to {output / error.key}.tif; rename one"
        ) from None
    if not files:
        what = f"matching {glob!r}" if glob else f"({', '.join(IMAGE_SUFFIXES)})"
        raise ValueError(f"INPUT {root}: no image files {what} in this folder or below")
    pairs = [(path, output / f"{key}{output_suffix(path)}") for key, path in files.items()]
    inputs = {path.resolve() for path in (files if glob is None else find_images(root)).values()}
    clashes = [target for _, target in pairs if target.resolve() in inputs]
    if clashes:
        raise ValueError(
            f"OUTPUT {clashes[0]} is an input file: outputs must not replace inputs, choose another folder"
        )
    return pairs


@dataclass
class PredictSummary:
    """What a batch run did: files predicted, skipped (output exists) and failed (with the reason)."""

    done: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)
    pixels: int = 0
    seconds: float = 0.0  # time spent predicting the files done

    def __str__(self) -> str:
        rate = ""
        if self.seconds > 0 and self.pixels:
            per_second = self.pixels / self.seconds
            rate = f" ({per_second / 1e6:.2f} Mpx/s)" if per_second >= 1e6 else f" ({per_second / 1e3:.1f} kpx/s)"
        return (
            f"{len(self.done)} done, {len(self.skipped)} skipped (output exists), {len(self.failed)} failed; "
            f"{self.pixels / 1e6:.2f} Mpx in {self.seconds:.1f} s{rate}"
        )


def _reason(error: Exception, path: Path) -> str:
    """The message of a file's error without its leading file name; the type too when it is unexpected."""
    message = str(error)
    message = message[len(f"{path}: ") :] if message.startswith(f"{path}: ") else message
    if not isinstance(error, (ImageReadError, ValueError, OSError)):
        message = f"{type(error).__name__}: {message}"
    return " ".join(message.split())  # one line per file, whatever the reader wrote


def shard(pairs: Sequence[tuple[Path, Path]], index: int, count: int) -> list[tuple[Path, Path]]:
    """This process's share of the files: every count-th pair from `index` (0 <= index < count).

    Shares of one sorted plan are disjoint and together cover it, so processes on one or many
    machines predict a folder together and each output is written exactly once.
    """
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= index < count")
    return list(pairs[index::count])


def split_done(
    pairs: Sequence[tuple[Path, Path]], settings: PredictSettings, overwrite: bool
) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """The pairs still to predict, and the inputs whose outputs all exist (none unless `overwrite` is False)."""
    todo, skipped = [], []
    for source, target in pairs:
        if not overwrite and all(path.exists() for path in output_targets(source, target, settings).values()):
            skipped.append(source)
        else:
            todo.append((source, target))
    return todo, skipped


def predict_files(
    model: nn.Module,
    input_spec: InputSpec,
    pairs: Sequence[tuple[Path, Path]],
    settings: PredictSettings = PredictSettings(),
    overwrite: bool = False,
    progress: bool = True,
) -> PredictSummary:
    """Predict each (input, output) pair with one `Prediction`; a file that fails does not stop the others.

    Outputs that exist are skipped unless `overwrite`, so an interrupted run resumes where it
    stopped. Each failure is named on stderr as it happens ("error: FILE: reason").
    `progress` shows bars over files and over the rows of each image (on a terminal).
    """
    prediction = Prediction(model, input_spec, settings)  # resolved once for the folder
    todo, skipped = split_done(pairs, settings, overwrite)
    summary, domain = PredictSummary(skipped=skipped), DomainReport()
    for source, target in tqdm(todo, desc="files", unit="file", disable=None if progress else True):
        started = time.perf_counter()
        try:
            pixels = prediction.file(source, target, progress, domain)
        except Exception as error:  # one broken file must not stop the folder; MemoryError and friends included
            summary.failed[source] = _reason(error, source)
            log.error("%s: %s", source, summary.failed[source])
            log.debug("%s: traceback", source, exc_info=True)
            continue
        summary.seconds += time.perf_counter() - started
        summary.pixels += pixels
        summary.done.append(source)
    for line in domain.summary():
        log.warning("%s", line)
    return summary
