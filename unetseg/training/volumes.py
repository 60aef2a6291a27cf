"""Training data from volumes: 3-D TIFF stacks and NIfTI in the `images/` + `masks/` layout, random 3-D
patches with foreground oversampling and fixed validation patches.

Patches are augmented by the pipeline of 2-D tiles (`unetseg.training.augment.build_transform`, the same
`Augmentation` settings) through albumentations' `volume`/`mask3d` targets: one draw of parameters for
every plane, so nothing moves or is resampled along Z.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from unetseg.io import ImageReadError, Normalization
from unetseg.io.volumes import read_volume, read_volume_labels, volume_range, volume_to_channels
from unetseg.training.augment import Augmentation, build_transform, draw_rng
from unetseg.training.samples import Sample, foreground_coordinates, pad_sample, random_window, window_grid
from unetseg.training.targets import make_target


def load_volume_sample(
    image_path: Path, mask_path: Path, in_channels: int, normalization: Normalization, name: str | None = None
) -> Sample:
    """Read and check one volume pair, and take its whole-volume normalisation range."""
    volume = read_volume(image_path)
    image = volume_to_channels(volume.voxels, in_channels, image_path)
    labels = read_volume_labels(mask_path)
    if labels.shape != image.shape[1:]:
        raise ImageReadError(
            f"{mask_path}: mask is {'x'.join(map(str, labels.shape))} (Z, Y, X) but its image "
            f"{image_path.name} is {'x'.join(map(str, image.shape[1:]))}"
        )
    value_range = volume_range(volume.voxels, in_channels, normalization, image_path)
    stored_channels = 1 if volume.voxels.ndim == 3 else min(volume.voxels.shape[-1], 3)
    return Sample(
        name or image_path.stem,
        image,
        labels,
        value_range,
        foreground_coordinates(labels),
        stored_channels=stored_channels,
        spacing=volume.spacing,
    )


def check_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(Z, Y, X) patch size; ValueError naming `patch_size` otherwise."""
    if len(patch_size) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in patch_size):
        raise ValueError(f"patch_size must be three positive integers (Z, Y, X), got {patch_size!r}")
    return tuple(patch_size)


class PatchDataset(Dataset):
    """Patches of `patch_size` (Z, Y, X) from volume samples: random (training) or a fixed grid (validation).

    Random patches pick a volume uniformly, then a position, centred on a random foreground
    voxel with probability `foreground_oversampling` (as nnU-Net samples a third). Grid patches
    cover each volume once; volumes smaller than a patch give one smaller patch.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        normalization: Normalization,
        patch_size: Sequence[int],
        targets: str,
        length: int | None = None,
        transform: A.Compose | None = None,
        foreground_oversampling: float = 0.33,
    ):
        self.samples, self.normalization, self.targets = samples, normalization, targets
        self.patch_size = check_patch_size(patch_size)
        self.transform, self.foreground_oversampling = transform, foreground_oversampling
        self.grid = (
            None
            if length
            else [(i, corner) for i, s in enumerate(samples) for corner in window_grid(s.labels.shape, self.patch_size)]
        )
        self.length = length or len(self.grid)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.grid is None:
            rng = draw_rng()
            sample, corner = self.random_patch(rng)
        else:
            sample_index, corner = self.grid[index]
            sample, rng = self.samples[sample_index], None
        window = tuple(slice(start, start + size) for start, size in zip(corner, self.patch_size))
        image = self.normalization.apply(sample.image[(slice(None), *window)], sample.value_range)  # (C, z, y, x)
        labels = sample.labels[window]
        if self.transform is not None and rng is not None:
            self.transform.set_random_seed(int(rng.integers(2**31)))
            out = self.transform(volume=np.moveaxis(image, 0, -1), mask3d=labels.astype(np.int32))  # (z, y, x, C)
            image, labels = np.moveaxis(out["volume"], -1, 0), out["mask3d"]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(make_target(np.ascontiguousarray(labels), self.targets)),
        }

    def random_patch(self, rng: np.random.Generator) -> tuple[Sample, tuple[int, ...]]:
        sample = self.samples[rng.integers(len(self.samples))]
        return sample, random_window(sample, self.patch_size, rng, self.foreground_oversampling)


def volume_datasets(
    samples: dict[str, Sample],
    split: dict[str, list[str]],
    patch_size: Sequence[int],
    normalization: Normalization,
    targets: str,
    length: int,
    augmentation: Augmentation | None,
    foreground_oversampling: float,
) -> tuple[PatchDataset, PatchDataset]:
    """(training, validation) patch datasets of a split of volume samples."""
    patch_size = check_patch_size(patch_size)
    if augmentation is not None and augmentation.rotate90 and patch_size[1] != patch_size[2]:
        raise ValueError(
            f"augmentation.rotate90 swaps Y and X, so it needs a patch_size with Y == X, got {list(patch_size)}: "
            "make the patch square in-plane or set augmentation.rotate90: 0"
        )
    train = [pad_sample(samples[name], patch_size) for name in split["train"]]
    val = [samples[name] for name in split["val"]]
    common = dict(normalization=normalization, patch_size=patch_size, targets=targets)
    train_set = PatchDataset(
        train,
        length=length,
        transform=build_transform(augmentation),
        foreground_oversampling=foreground_oversampling,
        **common,
    )
    return train_set, PatchDataset(val, **common)


__all__ = [
    "PatchDataset",
    "check_patch_size",
    "load_volume_sample",
    "volume_datasets",
]
