"""Choose the instance post-processing (thresholds, minimum size) on predicted probabilities:

    unetseg-predict IMAGES PROBS --model nuclei --output prob
    python scripts/tune_labels.py PROBS MASKS

prints the mean DSB score and Dice of each setting, best last. Tune on training images, not on
the images you report scores for.
"""

import argparse
import itertools
from pathlib import Path

import numpy as np
import tifffile

from unetseg.io import read_labels
from unetseg.metrics import segmentation_scores
from unetseg.postprocess import to_labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probs", type=Path)
    parser.add_argument("masks", type=Path)
    args = parser.parse_args()
    pairs = []
    for prob_path in sorted(args.probs.rglob("*.tif")):
        mask_path = next(args.masks.glob(prob_path.stem + ".*"))
        pairs.append((tifffile.imread(prob_path), read_labels(mask_path)))
    results = []
    for threshold, seed_threshold, min_size in itertools.product((0.4, 0.5, 0.6), (0.5, 0.6, 0.7, 0.8), (5, 15, 30)):
        scores = [segmentation_scores(to_labels(probs, threshold, min_size, seed_threshold=seed_threshold), labels)
                  for probs, labels in pairs]
        dsb, dice = np.mean([s["dsb_score"] for s in scores]), np.mean([s["dice"] for s in scores])
        results.append((dsb, dice, threshold, seed_threshold, min_size))
    for dsb, dice, threshold, seed_threshold, min_size in sorted(results):
        print(f"threshold {threshold} seed_threshold {seed_threshold} min_size {min_size}: DSB {dsb:.4f} Dice {dice:.4f}")


if __name__ == "__main__":
    main()
