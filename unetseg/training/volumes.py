"""Training data from volumes: 3-D TIFF stacks and NIfTI in the `images/` + `masks/` layout, random 3-D
patches with foreground oversampling, fixed validation patches, and 3-D augmentation.

Augmentation is albumentations' (the library the 2-D pipeline uses), built from the same
`Augmentation` settings: its 2-D transforms applied with one draw of parameters to every plane
of a patch, which is what thick-slice data allow: in-plane flips, quarter turns and elastic
deformation move every plane alike and never resample the coarse Z axis; brightness, contrast,
gamma and blur act on the whole patch. Noise is drawn per voxel here, since albumentations would
repeat one noise field in every plane.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

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


class VolumeAugmentation:
    """Augments a normalised patch (C, Z, Y, X) and its labels (Z, Y, X) with one draw for all planes."""

    def __init__(self, config: Augmentation):
        self.noise, self.noise_std = config.noise, config.noise_std
        # Everything but noise from the 2-D pipeline; albumentations applies it plane by plane, alike.
        self.transform = build_transform(Augmentation(**{**vars(config), "noise": 0.0}))

    def __call__(
        self, image: np.ndarray, labels: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.transform is not None:
            self.transform.set_random_seed(int(rng.integers(2**31)))
            # The `images`/`masks` keys: one set of parameters for every plane (`volume` misses
            # some intensity transforms in albumentations 2.0).
            out = self.transform(images=np.moveaxis(image, 0, -1), masks=labels.astype(np.int32))
            image, labels = np.moveaxis(np.asarray(out["images"]), -1, 0), np.asarray(out["masks"])
        if self.noise and rng.random() < self.noise:
            image = image + rng.normal(0.0, rng.uniform(*self.noise_std), image.shape).astype(np.float32)
        return image, labels


def build_volume_transform(config: Augmentation | None) -> VolumeAugmentation | None:
    """The 3-D training augmentation for `config`; None when nothing is enabled."""
    if config is None:
        return None
    augmentation = VolumeAugmentation(config)
    return augmentation if augmentation.transform is not None or augmentation.noise else None


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
        transform: VolumeAugmentation | None = None,
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
            image, labels = self.transform(image, labels, rng)
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
    train = [pad_sample(samples[name], patch_size) for name in split["train"]]
    val = [samples[name] for name in split["val"]]
    common = dict(normalization=normalization, patch_size=patch_size, targets=targets)
    train_set = PatchDataset(
        train,
        length=length,
        transform=build_volume_transform(augmentation),
        foreground_oversampling=foreground_oversampling,
        **common,
    )
    return train_set, PatchDataset(val, **common)


__all__ = [
    "PatchDataset",
    "VolumeAugmentation",
    "build_volume_transform",
    "check_patch_size",
    "load_volume_sample",
    "volume_datasets",
]
