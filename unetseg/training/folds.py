"""k-fold cross-validation splits, stratified by image type, as nnU-Net's five folds.

Every image is out of fold exactly once: fold i validates on the images assigned to i and trains
on the rest. The assignment is deterministic (a seed) and stratified: within each image type
(`unetseg.io.modality`), images are shuffled and dealt to the folds in turn, so a rare type
(e.g. 14 grey brightfield images among 564) is spread over every fold instead of landing in one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["assign_folds", "fold_split"]


def assign_folds(names: Sequence[str], groups: Sequence[str], folds: int, seed: int = 0) -> dict[str, int]:
    """The fold (0..folds-1) of each name: within each group (image type), names in a seeded random order
    are dealt to the folds in turn, starting where the previous group stopped so fold sizes differ by
    at most one."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"data.folds must be an integer >= 2, got {folds!r}")
    if len(names) < folds:
        raise ValueError(f"{len(names)} images cannot make {folds} folds: every fold needs a validation image")
    if len(groups) != len(names):
        raise ValueError(f"{len(names)} names but {len(groups)} image types")
    rng = np.random.default_rng(seed)
    assigned, dealt = {}, 0
    for group in sorted(set(groups)):
        members = sorted(name for name, g in zip(names, groups) if g == group)
        for name in (members[i] for i in rng.permutation(len(members))):
            assigned[name] = dealt % folds
            dealt += 1
    return assigned


def fold_split(assigned: dict[str, int], fold: int) -> dict[str, list[str]]:
    """{"train", "val"} of fold `fold`: its own images validate, the others train."""
    folds = max(assigned.values()) + 1
    if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds:
        raise ValueError(f"data.fold must be an integer in 0..{folds - 1}, got {fold!r}")
    return {
        "train": sorted(name for name, k in assigned.items() if k != fold),
        "val": sorted(name for name, k in assigned.items() if k == fold),
    }
