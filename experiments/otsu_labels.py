"""Write the classical reference's instance labels (Otsu threshold + distance-transform watershed, as in
experiments/compare.py) for one part of a split, so `unetseg-evaluate` scores them like a model's:

    python -m experiments.otsu_labels unetseg/weights/nuclei_split.json ../shared/data/dsb2018 /tmp/val/otsu
    unetseg-evaluate /tmp/val/otsu /tmp/val/masks --by-modality /tmp/val/images
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tifffile

from experiments.compare import load_pairs, otsu_watershed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split", type=Path, help="a split.json")
    parser.add_argument("data", type=Path, help="folder with images/ and masks/")
    parser.add_argument("out", type=Path, help="folder for <name>.tif label images")
    parser.add_argument("--part", choices=("train", "val"), default="val")
    args = parser.parse_args()
    names = json.loads(args.split.read_text())[args.part]
    pairs = load_pairs(args.data, names)
    summary, predictions = otsu_watershed(pairs)
    args.out.mkdir(parents=True, exist_ok=True)
    for (name, _, _), labels in zip(pairs, predictions):
        tifffile.imwrite(args.out / f"{name}.tif", labels)
    print(f"{len(pairs)} label images in {args.out}; Dice {summary['dice']:.3f}, DSB {summary['dsb_score']:.3f}")


if __name__ == "__main__":
    main()
