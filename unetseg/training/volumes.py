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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from unetseg.io import ImageReadError, Normalization
from unetseg.io.volumes import read_volume, read_volume_labels, volume_range, volume_to_channels
from unetseg.training.augment import Augmentation, build_transform, draw_rng
from unetseg.training.targets import make_target


@dataclass
class VolumeSample:
    """One volume (C, Z, Y, X) in its stored dtype, its labels (Z, Y, X), percentile range and spacing."""

    name: str
    image: np.ndarray
    labels: np.ndarray
    value_range: tuple[float, float]
    foreground: np.ndarray  # (K, 3) coordinates of foreground voxels, subsampled
    spacing: tuple = (None, None, None)
    stored_channels: int = 1  # channels of the file (alpha dropped), before conversion to in_channels


def load_volume_sample(
    image_path: Path, mask_path: Path, in_channels: int, normalization: Normalization, name: str | None = None
) -> VolumeSample:
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
    return VolumeSample(
        name or image_path.stem,
        image,
        labels,
        value_range,
        foreground_voxels(labels),
        volume.spacing,
        stored_channels,
    )


def foreground_voxels(labels: np.ndarray, limit: int = 4096) -> np.ndarray:
    """(K, ndim) coordinates of foreground voxels, evenly subsampled to at most `limit`."""
    coordinates = np.argwhere(labels > 0)
    return coordinates[:: max(1, -(-len(coordinates) // limit))]


def check_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    """(Z, Y, X) patch size; ValueError naming `patch_size` otherwise."""
    if len(patch_size) != 3 or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in patch_size):
        raise ValueError(f"patch_size must be three positive integers (Z, Y, X), got {patch_size!r}")
    return tuple(patch_size)


def pad_volume_sample(sample: VolumeSample, patch_size: Sequence[int]) -> VolumeSample:
    """Reflect-pad a volume smaller than a patch along any axis, so random patches always fit."""
    pads = [max(0, size - length) for size, length in zip(patch_size, sample.labels.shape)]
    if not any(pads):
        return sample
    spec = tuple((pad // 2, pad - pad // 2) for pad in pads)
    labels = np.pad(sample.labels, spec, mode="reflect")
    image = np.pad(sample.image, ((0, 0), *spec), mode="reflect")
    return VolumeSample(
        sample.name,
        image,
        labels,
        sample.value_range,
        foreground_voxels(labels),
        sample.spacing,
        sample.stored_channels,
    )


def patch_grid(shape: Sequence[int], patch_size: Sequence[int]) -> list[tuple[int, ...]]:
    """Corners of patches covering a volume, the last ones along each axis shifted inside."""
    axes = [
        sorted({min(start, max(length - size, 0)) for start in range(0, length, size)})
        for length, size in zip(shape, patch_size)
    ]
    return [tuple(corner) for corner in np.array(np.meshgrid(*axes, indexing="ij")).reshape(len(axes), -1).T]


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
        samples: Sequence[VolumeSample],
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
            else [(i, corner) for i, s in enumerate(samples) for corner in patch_grid(s.labels.shape, self.patch_size)]
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

    def random_patch(self, rng: np.random.Generator) -> tuple[VolumeSample, tuple[int, ...]]:
        sample = self.samples[rng.integers(len(self.samples))]
        shape = sample.labels.shape
        if len(sample.foreground) and rng.random() < self.foreground_oversampling:
            centre = sample.foreground[rng.integers(len(sample.foreground))]
            corner = tuple(
                int(np.clip(c - size // 2, 0, length - size)) for c, size, length in zip(centre, self.patch_size, shape)
            )
        else:
            corner = tuple(int(rng.integers(length - size + 1)) for size, length in zip(self.patch_size, shape))
        return sample, corner


def volume_datasets(
    samples: dict[str, VolumeSample],
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
    train = [pad_volume_sample(samples[name], patch_size) for name in split["train"]]
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
    "VolumeSample",
    "build_volume_transform",
    "load_volume_sample",
    "patch_grid",
    "volume_datasets",
]
