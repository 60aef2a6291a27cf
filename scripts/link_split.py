"""Link one part of a training split into its own folder, e.g. to predict and score the held-out images:

    python scripts/link_split.py runs/nuclei/split.json ../shared/data/dsb2018 /tmp/val [--part val]

writes OUT/images/* and OUT/masks/* as symbolic links to the DATA files of that part.
"""

import argparse
import json
from pathlib import Path

from unetseg.io import find_pairs, pair_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split", type=Path, help="split.json of a run")
    parser.add_argument("data", type=Path, help="the folder with images/ and masks/ it was made from")
    parser.add_argument("out", type=Path)
    parser.add_argument("--part", choices=("train", "val"), default="val")
    args = parser.parse_args()
    names = set(json.loads(args.split.read_text())[args.part])
    count = 0
    for image, mask in find_pairs(args.data):
        if pair_name(image, args.data / "images") not in names:
            continue
        for source, folder in ((image, "images"), (mask, "masks")):
            link = args.out / folder / source.relative_to(args.data / folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(source.resolve())
        count += 1
    print(f"{count} {args.part} pairs linked under {args.out}")


if __name__ == "__main__":
    main()
