"""Tiled training data: pairing image and mask files, random tiles with foreground
oversampling, fixed validation tiles, and the LightningDataModule that owns them."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from unetseg.io import ImageReadError, Normalization, find_pairs, pair_name, read_image, read_labels, to_channels
from unetseg.io.domain import intensity_summary
from unetseg.io.labels import as_instances
from unetseg.io.modality import cluster_weights, image_features, modality_names
from unetseg.io.normalize import count_non_finite, warn_non_finite
from unetseg.spec import InputSpec, output_classes
from unetseg.synthetic import default_dataset, default_volume_dataset
from unetseg.training.augment import Augmentation, build_transform, draw_rng
from unetseg.training.folds import assign_folds, fold_split
from unetseg.training.samples import Sample, foreground_coordinates, pad_sample, random_window, window_grid
from unetseg.training.targets import border_weight_map, compact_target, make_target
from unetseg.training.volumes import load_volume_sample, volume_datasets


def load_sample(
    image_path: Path, mask_path: Path, in_channels: int, normalization: Normalization, name: str | None = None
) -> Sample:
    """Read and check one pair, and take its whole-image normalisation range."""
    image = read_image(image_path)
    if image.ndim == 3 and image.shape[-1] not in (1, 3, 4):
        raise ImageReadError(
            f"{image_path}: a {image.shape} stack; 2-D training takes images (H, W[, C]); set data.spatial_dims: 3"
        )
    stored_channels = 1 if image.ndim == 2 else min(image.shape[-1], 3)
    image = to_channels(image, in_channels, image_path)
    labels = read_labels(mask_path)
    if labels.shape != image.shape[1:]:
        raise ImageReadError(
            f"{mask_path}: mask is {labels.shape[0]}x{labels.shape[1]} but its image "
            f"{image_path.name} is {image.shape[1]}x{image.shape[2]}"
        )
    warn_non_finite(image_path, count_non_finite(image), image.size)
    value_range = normalization.range(image)
    return Sample(name or image_path.stem, image, labels, value_range, foreground_coordinates(labels), stored_channels)


class TileDataset(Dataset):
    """Tiles of `tile_size` from samples: random (training) or a fixed grid (validation).

    Random tiles pick an image uniformly, then a position, centred on a random foreground
    pixel with probability `foreground_oversampling` (nnU-Net samples a third this way).
    Grid tiles cover each image once, the last row and column shifted to stay inside; images
    smaller than a tile give one smaller tile, so validation never scores padding.

    The target and the border weight map of each image are computed once, here, and cut and
    augmented with the image (albumentations moves them as extra masks, nearest-neighbour),
    so a tile costs a crop and its augmentation; weights near a tile's edge also see the
    instances just outside it.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        normalization: Normalization,
        tile_size: int,
        targets: str,
        length: int | None = None,
        transform=None,
        foreground_oversampling: float = 0.33,
        border_weights: bool = False,
        border_w0: float = 10.0,
        border_sigma: float = 5.0,
        sample_weights: np.ndarray | None = None,
        instance_labels: bool = False,
    ):
        self.samples, self.normalization, self.tile_size, self.targets = samples, normalization, tile_size, targets
        self.sample_weights, self.instance_labels = sample_weights, instance_labels
        self.transform, self.foreground_oversampling = transform, foreground_oversampling
        self.border_weights, self.border_w0, self.border_sigma = border_weights, border_w0, border_sigma
        self.grid = None if length else [(i, y, x) for i, s in enumerate(samples) for y, x in tile_grid(s, tile_size)]
        self.length = length or len(self.grid)
        # (target, weight or None) per image; threads, as the distance transforms release the GIL.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            self.maps = list(pool.map(self.image_targets, samples))

    def image_targets(self, sample: Sample) -> tuple[np.ndarray, np.ndarray | None]:
        """The whole image's target (compact integer type) and border weight map (float32, or None)."""
        target = compact_target(make_target(sample.labels, self.targets))
        weight = border_weight_map(sample.labels, self.border_w0, self.border_sigma) if self.border_weights else None
        return target, weight

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.grid is None:
            rng = draw_rng()
            sample_index, y, x = self.random_tile(rng)
        else:
            sample_index, y, x = self.grid[index]
            rng = None
        sample, (target, weight) = self.samples[sample_index], self.maps[sample_index]
        window = slice(y, y + self.tile_size), slice(x, x + self.tile_size)
        image = self.normalization.apply(sample.image[(slice(None), *window)], sample.value_range)  # (C, h, w) float32
        target = target[window]
        weight = weight[window] if weight is not None else None
        labels = sample.labels[window].astype(np.int32) if self.instance_labels else None
        if self.transform is not None:
            self.transform.set_random_seed(int(rng.integers(2**31)))
            masks = [mask for mask in (target, weight, labels) if mask is not None]
            out = self.transform(image=np.moveaxis(image, 0, -1), masks=masks)
            image, moved = np.moveaxis(out["image"], -1, 0), iter(out["masks"])
            target = next(moved)
            weight = next(moved) if weight is not None else None
            labels = next(moved) if labels is not None else None
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "target": torch.from_numpy(np.asarray(target, dtype=np.int64)),
            "name": sample.name,  # which image a tile came from, for messages about a batch
        }
        if labels is not None:  # for instance scores (DSB) of whole validation images
            item["labels"] = torch.from_numpy(np.asarray(labels, dtype=np.int32))
        if weight is not None:
            item["weight"] = torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))
        return item

    def random_tile(self, rng: np.random.Generator) -> tuple[int, int, int]:
        """(sample index, top, left) of a random tile."""
        if self.sample_weights is None:
            index = int(rng.integers(len(self.samples)))
        else:
            index = int(rng.choice(len(self.samples), p=self.sample_weights))
        return (index, *random_window(self.samples[index], (self.tile_size,) * 2, rng, self.foreground_oversampling))


def image_type(sample: Sample) -> str:
    """The image type (`unetseg.io.modality`) of a sample: of its middle plane for a volume."""
    image = sample.image if sample.image.ndim == 3 else sample.image[:, sample.image.shape[1] // 2]
    return modality_names(image_features(image))[0]


def tile_grid(sample: Sample, tile_size: int) -> list[tuple[int, int]]:
    """Top-left corners of tiles covering the sample, the last ones shifted inside."""
    return window_grid(sample.labels.shape, (tile_size, tile_size))


class SegmentationDataModule(pl.LightningDataModule):
    """Image/mask folders -> augmented random training tiles and fixed validation tiles.

    Args:
        root: folder holding `images/` and `masks/`, paired by file name (sub-folders too).
            None uses the embedded synthetic nuclei dataset (generated once, no download).
        images, masks: sub-folder names under root.
        in_channels: channels the network takes; grey and RGB(A) images are converted to it.
        targets: "foreground" (mask > 0, one output class), "boundary" (background / interior /
            nucleus edge, three classes, to separate touching nuclei) or "classes" (mask values
            are class indices, 0 to classes - 1).
        classes: number of classes for targets="classes" (checked against every mask).
        tile_size: side of the square training tiles.
        val_tile_size: side of the fixed validation tiles; None means tile_size.
        batch_size: training tiles per batch.
        tiles_per_epoch: random tiles drawn per epoch.
        val_fraction: share of images held out for validation, chosen by `seed`.
        split_file: a JSON {"train": [...], "val": [...]} of pair names (path under images/
            without suffix), e.g. the split.json of an earlier run, to use instead.
        folds, fold: k-fold cross-validation instead of `val_fraction`: the images are dealt to
            `folds` folds, stratified by image type (`unetseg.training.folds`), and fold `fold`
            validates; the assignment of every image is stored in the run's split.json.
        normalization: percentiles of the whole-image normalisation.
        augmentation: probabilities of each augmentation (see `Augmentation`).
        foreground_oversampling: probability that a tile is centred on a foreground pixel.
        border_weights: add the U-Net paper's weight map (w0, sigma in pixels) to each tile.
            Binary masks (0/1, 0/255) are split into connected components first, so the map
            weighs the gaps between touching objects there too.
        modality_balance: group training images by brightness and colourfulness
            (`unetseg.io.modality`: fluorescence, grey brightfield, colour) and draw group g in
            proportion to n_g ** (1 - modality_balance): 0 draws images evenly (groups by their
            size), 1 draws the groups evenly, 0.5 by the square root of their size.
        num_workers: DataLoader workers; None picks min(4, CPUs - 1).
        seed: seed of the train/validation split.
        spatial_dims: 2 for images, 3 for volumes (3-D TIFF stacks, NIfTI) trained in 3-D patches
            (`unetseg.training.volumes`); root None then uses the embedded synthetic volumes.
        patch_size: 3-D only: (Z, Y, X) size of training and validation patches; None means
            tile_size along every axis. Border weights are 2-D only.
    """

    def __init__(
        self,
        root: str | None = None,
        images: str = "images",
        masks: str = "masks",
        in_channels: int = 1,
        targets: str = "foreground",
        classes: int | None = None,
        tile_size: int = 256,
        val_tile_size: int | None = None,
        batch_size: int = 8,
        tiles_per_epoch: int = 512,
        val_fraction: float = 0.15,
        split_file: str | None = None,
        normalization: Normalization = Normalization(),
        augmentation: Augmentation = Augmentation(),
        foreground_oversampling: float = 0.33,
        border_weights: bool = False,
        border_w0: float = 10.0,
        border_sigma: float = 5.0,
        num_workers: int | None = None,
        seed: int = 0,
        spatial_dims: int = 2,
        patch_size: list[int] | None = None,
        modality_balance: float = 0.0,
        folds: int | None = None,
        fold: int = 0,
    ):
        super().__init__()
        output_classes(targets, classes)  # checks targets and classes
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims!r}")
        if spatial_dims == 3 and border_weights:
            raise ValueError("border_weights is 2-D only; set it false for spatial_dims 3")
        self.spatial_dims = spatial_dims
        self.patch_size = list(patch_size) if patch_size is not None else [tile_size] * 3
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (grey) or 3 (RGB), got {in_channels!r}")
        for option, value in (("tile_size", tile_size), ("val_tile_size", val_tile_size), ("batch_size", batch_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"data.{option} must be a positive integer, got {value!r}")
        if isinstance(tiles_per_epoch, bool) or not isinstance(tiles_per_epoch, int) or tiles_per_epoch < 1:
            raise ValueError(f"data.tiles_per_epoch must be a positive integer, got {tiles_per_epoch!r}")
        # No save_hyperparameters(): checkpoints stay plain data (weights_only loading); the
        # run folder's config.yaml and the module's input_spec record what matters.
        self.root, self.images, self.masks, self.in_channels = root, images, masks, in_channels
        self.targets, self.classes, self.tile_size, self.batch_size = targets, classes, tile_size, batch_size
        self.val_tile_size = val_tile_size or tile_size
        self.tiles_per_epoch, self.val_fraction, self.split_file = tiles_per_epoch, val_fraction, split_file
        self.normalization, self.augmentation = normalization, augmentation
        self.foreground_oversampling, self.border_weights = foreground_oversampling, border_weights
        self.border_w0, self.border_sigma, self.seed = border_w0, border_sigma, seed
        self.num_workers = max(0, min(4, (os.cpu_count() or 1) - 1)) if num_workers is None else num_workers
        self.modality_balance = modality_balance
        cluster_weights([0], modality_balance)  # checks modality_balance
        if folds is not None and split_file:
            raise ValueError("data.folds and data.split_file both choose the validation images; give one")
        if folds is not None and (isinstance(folds, bool) or not isinstance(folds, int) or folds < 2):
            raise ValueError(f"data.folds must be an integer >= 2, got {folds!r}")
        if folds is not None and (isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < folds):
            raise ValueError(f"data.fold must be an integer in 0..{folds - 1}, got {fold!r}")
        self.folds, self.fold = folds, fold
        self.split: dict[str, list[str]] | None = None
        self.modalities: dict[str, str] = {}  # training image name -> its modality group
        self.stored_channels: dict[int, int] = {}  # channels in the files -> images, known after setup()
        self.intensity: dict = {}  # the training images' intensities (unetseg.io.domain), known after setup()

    @property
    def output_classes(self) -> int:
        """Channels the network must output for these targets."""
        return output_classes(self.targets, self.classes)

    @property
    def input_spec(self) -> InputSpec:
        """How inputs were prepared, stored in checkpoints so prediction repeats it exactly."""
        return InputSpec(
            self.in_channels, self.normalization, self.targets, self.output_classes, intensity=self.intensity
        )

    def setup(self, stage: str | None = None) -> None:
        if self.split is not None:
            return
        volumes = self.spatial_dims == 3
        root = Path(self.root) if self.root else default_volume_dataset() if volumes else default_dataset()
        pairs = find_pairs(root, self.images, self.masks)
        if len(pairs) < 2:
            raise ValueError(f"{root}: found {len(pairs)} image/mask pair; need at least 2 (training and validation)")
        names = [pair_name(image_path, root / self.images) for image_path, _ in pairs]
        samples, problems = {}, []
        for name, (image_path, mask_path) in zip(names, pairs):
            try:
                load = load_volume_sample if volumes else load_sample
                samples[name] = load(image_path, mask_path, self.in_channels, self.normalization, name)
                self.check_mask_values(samples[name].labels, mask_path)
                if self.targets != "classes":  # binary masks -> one instance per connected object
                    samples[name].labels = as_instances(samples[name].labels)
            except ImageReadError as error:
                problems.append(str(error))
        for sample in samples.values():
            self.stored_channels[sample.stored_channels] = self.stored_channels.get(sample.stored_channels, 0) + 1
        if problems:
            raise ValueError(
                f"{len(problems)} of {len(pairs)} training pairs cannot be used:\n  " + "\n  ".join(problems)
            )
        self.split = self.make_split(names, samples)
        if volumes:
            self.train_set, self.val_set = volume_datasets(
                samples,
                self.split,
                self.patch_size,
                self.normalization,
                self.targets,
                self.tiles_per_epoch,
                self.augmentation,
                self.foreground_oversampling,
            )
            self.write_split()
            return
        train = [pad_sample(samples[name], self.tile_size) for name in self.split["train"]]
        weights = None
        if self.modality_balance > 0:
            groups = modality_names(np.stack([image_features(sample.image) for sample in train]))
            self.modalities = dict(zip(self.split["train"], groups))
            weights = cluster_weights(np.unique(groups, return_inverse=True)[1], self.modality_balance)
        self.intensity = intensity_summary([s.image for s in train], [s.value_range for s in train], self.normalization)
        val = [samples[name] for name in self.split["val"]]
        common = dict(
            normalization=self.normalization,
            targets=self.targets,
            border_weights=self.border_weights,
            border_w0=self.border_w0,
            border_sigma=self.border_sigma,
        )
        self.train_set = TileDataset(
            train,
            tile_size=self.tile_size,
            length=self.tiles_per_epoch,
            transform=build_transform(self.augmentation),
            foreground_oversampling=self.foreground_oversampling,
            sample_weights=weights,
            **common,
        )
        instances = self.targets != "classes"
        self.val_set = TileDataset(val, tile_size=self.val_tile_size, instance_labels=instances, **common)
        self.write_split()

    def make_split(self, names: list[str], samples: dict[str, Sample] | None = None) -> dict[str, list[str]]:
        """{"train", "val"}: from `split_file`, from the k-fold assignment (`folds`), or `val_fraction` at random."""
        if self.folds is not None:
            groups = [image_type(samples[name]) if samples else "all" for name in names]
            assigned = assign_folds(names, groups, self.folds, self.seed)
            return {**fold_split(assigned, self.fold), "folds": self.folds, "fold": self.fold, "assigned": assigned}
        if self.split_file:
            split = json.loads(Path(self.split_file).read_text())
            unknown = sorted(set(split.get("train", []) + split.get("val", [])) - set(names))
            if unknown or not split.get("train") or not split.get("val"):
                raise ValueError(
                    f"{self.split_file}: needs non-empty 'train' and 'val' lists of file stems found in "
                    f"the data; unknown: {unknown[:5]}"
                )
            return {"train": split["train"], "val": split["val"]}
        order = np.random.default_rng(self.seed).permutation(len(names))
        val_count = min(len(names) - 1, max(1, round(self.val_fraction * len(names))))
        return {
            "train": sorted(names[i] for i in order[val_count:]),
            "val": sorted(names[i] for i in order[:val_count]),
        }

    def check_mask_values(self, labels: np.ndarray, mask_path: Path) -> None:
        if self.targets == "classes" and labels.max() >= self.classes:
            raise ImageReadError(
                f"{mask_path}: holds class {labels.max()} but classes={self.classes} "
                f"(values must be 0 to {self.classes - 1})"
            )

    def write_split(self) -> None:
        trainer = self.trainer
        if trainer is None:
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask, once
        if log_dir is None or not trainer.is_global_zero:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        (Path(log_dir) / "split.json").write_text(json.dumps(self.split, indent=1))

    def train_dataloader(self) -> DataLoader:
        if self.tiles_per_epoch < self.batch_size:  # drop_last would leave an epoch without a batch
            raise ValueError(
                f"data.tiles_per_epoch ({self.tiles_per_epoch}) must be at least data.batch_size ({self.batch_size})"
            )
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        # One tile per batch: tiles of small images are smaller than tile_size.
        return DataLoader(
            self.val_set, batch_size=1, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )
