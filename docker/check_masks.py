"""Check the masks that the image's `unetseg-predict` wrote: docker/ci_build.sh's last step.

Usage: python docker/check_masks.py IMAGES OUTPUT [MASKS]

Every image in IMAGES needs at least one file in OUTPUT named after it (its stem, then `.`, `_` or `-`),
each such file of the image's height and width, and one of them a mask with some foreground (not none,
not all: a probability map beside it may be positive everywhere). With MASKS
(the ground truth), the Dice of the foreground is printed for information: it gates nothing, since
the synthetic images are not what the pretrained weights were trained on.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from unetseg.io import is_image_file, read_image


def outputs_for(stem: str, output: Path) -> list[Path]:
    """Files under `output` named after the input image `stem`."""
    return sorted(
        path
        for path in output.rglob("*")
        if is_image_file(path) and (path.stem == stem or path.name.startswith((f"{stem}.", f"{stem}_", f"{stem}-")))
    )


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks."""
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def check(images: Path, output: Path, masks: Path | None = None) -> list[str]:
    """Check every image's outputs; returns the problems found, one line each."""
    problems = []
    inputs = sorted(path for path in images.iterdir() if is_image_file(path))
    if not inputs:
        return [f"{images}: no input images"]
    for image_path in inputs:
        height, width = read_image(image_path).shape[:2]
        found = outputs_for(image_path.stem, output)
        if not found:
            problems.append(f"{image_path.name}: no output in {output} named after it")
            continue
        usable = wrong_shape = 0
        for path in found:
            mask = read_image(path)
            fraction = float((mask > 0).mean())
            line = f"{image_path.name} -> {path.relative_to(output)}: shape {mask.shape}, {mask.dtype}"
            line += f", foreground {fraction:.1%}"
            if mask.shape[:2] != (height, width):
                problems.append(f"{line}: expected height and width {(height, width)}")
                wrong_shape += 1
                continue
            truth = masks / f"{image_path.stem}.tif" if masks else None
            if truth is not None and truth.is_file() and mask.ndim == 2 and 0 < fraction < 1:
                line += f", Dice vs truth {dice(mask > 0, read_image(truth) > 0):.3f}"
            print(line)
            usable += 0 < fraction < 1
        if not usable and not wrong_shape:
            problems.append(f"{image_path.name}: no output with some foreground and some background")
    return problems


def main(argv: list[str]) -> int:
    """Print each output checked and each problem; exit 1 on any problem."""
    if len(argv) not in (2, 3):
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    problems = check(*(Path(arg) for arg in argv))
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
