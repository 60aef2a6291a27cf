"""Albumentations pipelines built from a typed, YAML-friendly augmentation config, one for 2-D tiles and
3-D patches alike, and the colour transforms (HED stain jitter, intensity inversion) that albumentations lacks.

A tile goes in as `image` (Y, X, C) with `masks`, a patch as albumentations' `volume` (Z, Y, X, C) with
`mask3d`: its 2-D transforms then run on every plane with one draw of parameters, which is what
thick-slice data allow. Flips, quarter turns, zoom, elastic and grid distortion move every plane alike
and never resample the coarse Z axis (a 3-D rotation or elastic field, or `CubicSymmetry`, would
interpolate along it or swap it with X); brightness, contrast, gamma, blur and colour act on the whole
patch with one setting. Two bridges over albumentations 2.0.8: `RandomBrightnessContrast` and
`GaussNoise` read only the `image`/`images` targets, and the latter would repeat one plane's noise
in every plane, so `BrightnessContrast` and `Noise` below take the volume and draw noise per voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
import torch
from skimage.color import hed_from_rgb, rgb_from_hed


@dataclass
class Augmentation:
    """Probabilities (0 disables) of each augmentation applied to training tiles and patches.

    Spatial transforms move image and mask together (masks with nearest-neighbour
    interpolation, so instance labels stay labels); intensity transforms touch the image only.
    Images arrive normalised to float32 in [0, 1].
    """

    flip: float = 0.5  # horizontal and vertical, each
    rotate90: float = 0.5  # a random multiple of 90 degrees
    scale: float = 0.0  # zoom by a factor drawn from scale_limit: objects of other sizes than the data's
    # (in-plane on volumes: another lateral pixel size at the same Z step, as objectives and binning vary)
    elastic: float = 0.0  # elastic deformation (U-Net paper)
    grid_distortion: float = 0.0
    brightness_contrast: float = 0.5
    gamma: float = 0.3
    noise: float = 0.2  # additive Gaussian noise
    blur: float = 0.1  # Gaussian blur (in-plane on volumes, as a wider lateral point spread)
    noise_std: tuple[float, float] = (0.01, 0.05)  # as a fraction of the [0, 1] range
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    gamma_limit: tuple[int, int] = (70, 150)  # percent, as albumentations' RandomGamma
    # Colour: what lets one model read fluorescence, grey brightfield and H&E alike.
    hue_saturation: float = 0.0  # hue and saturation shifts (RGB tiles only)
    stain: float = 0.0  # HED stain jitter (Tellez et al. 2018; RGB tiles only)
    grey: float = 0.0  # convert to grey, kept in every channel
    invert: float = 0.0  # 1 - image: dark nuclei on a bright field become bright on dark, and back
    hue_limit: int = 20  # degrees
    saturation_limit: float = 0.3  # as a fraction
    stain_sigma: float = 0.05  # HED channels scaled by U(1 - s, 1 + s) and shifted by U(-s, s)
    scale_limit: tuple[float, float] = (0.8, 1.25)  # zoom range, drawn evenly in and out of 1

    def __post_init__(self):
        spatial = ("flip", "rotate90", "scale", "elastic", "grid_distortion")
        intensity = ("brightness_contrast", "gamma", "noise", "blur")
        for name in spatial + intensity + ("hue_saturation", "stain", "grey", "invert"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation.{name} is a probability in [0, 1], got {value!r}")
        low, high = self.scale_limit
        if not 0 < low <= 1 <= high:
            raise ValueError(
                f"augmentation.scale_limit must be (low, high) with 0 < low <= 1 <= high, got {self.scale_limit!r}"
            )


def build_transform(config: Augmentation | None) -> A.Compose | None:
    """The training pipeline for `config`, for tiles and patches alike; None when nothing is enabled.

    Call it as `transform(image=..., masks=[...])` on a tile (Y, X, C) or `transform(volume=...,
    mask3d=...)` on a patch (Z, Y, X, C); a patch's planes all get the same parameters (module docstring).
    """
    if config is None:
        return None
    steps = []
    if config.flip:
        steps += [A.HorizontalFlip(p=config.flip), A.VerticalFlip(p=config.flip)]
    if config.rotate90:
        steps.append(A.RandomRotate90(p=config.rotate90))
    if config.scale:  # even odds of zooming in and out; masks nearest-neighbour, borders mirrored
        zoom = dict(scale=tuple(config.scale_limit), keep_ratio=True, balanced_scale=True)
        steps.append(A.Affine(**zoom, border_mode=cv2.BORDER_REFLECT_101, p=config.scale))
    if config.elastic:
        steps.append(A.ElasticTransform(alpha=30, sigma=6, border_mode=cv2.BORDER_REFLECT_101, p=config.elastic))
    if config.grid_distortion:
        steps.append(A.GridDistortion(border_mode=cv2.BORDER_REFLECT_101, p=config.grid_distortion))
    if config.brightness_contrast:
        steps.append(BrightnessContrast(config.brightness_limit, config.contrast_limit, p=config.brightness_contrast))
    if config.gamma:
        steps.append(A.RandomGamma(gamma_limit=config.gamma_limit, p=config.gamma))
    if config.noise:
        steps.append(Noise(std_range=config.noise_std, p=config.noise))
    if config.blur:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=config.blur))
    # Colour last, on tiles already clipped to [0, 1] by the intensity transforms.
    if config.stain:
        steps.append(StainJitter(config.stain_sigma, p=config.stain))
    if config.hue_saturation:
        saturation = round(100 * config.saturation_limit)
        steps.append(RGBOnly(A.HueSaturationValue(config.hue_limit, saturation, 0, p=1.0), p=config.hue_saturation))
    if config.grey:
        steps.append(Grey(p=config.grey))
    if config.invert:
        steps.append(Invert(p=config.invert))
    return A.Compose(steps) if steps else None


class BrightnessContrast(A.RandomBrightnessContrast):
    """albumentations' RandomBrightnessContrast, one setting for a whole tile or patch (its own draw reads the
    `image` or `images` target only, a KeyError on `volume`)."""

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        if "volume" in data:
            data = {**data, "image": data["volume"]}  # for its dtype (and mean): the whole patch's
        return super().get_params_dependent_on_data(params, data)


class Noise(A.GaussNoise):
    """albumentations' GaussNoise, drawn per voxel on a patch (its own draw fails on the `volume` target, and
    would add one plane's field to every plane)."""

    def get_params_dependent_on_data(self, params: dict, data: dict) -> dict:
        if "volume" not in data:
            return super().get_params_dependent_on_data(params, data)
        volume = data["volume"]
        max_value = 1.0 if volume.dtype.kind == "f" else np.iinfo(volume.dtype).max  # as albumentations scales
        sigma, mean = self.py_random.uniform(*self.std_range), self.py_random.uniform(*self.mean_range)
        noise = self.random_generator.normal(mean * max_value, sigma * max_value, volume.shape)
        return {"noise_map": noise.astype(np.float32)}

    def apply_to_volume(self, volume: np.ndarray, noise_map: np.ndarray, **params) -> np.ndarray:
        return self.apply(volume, noise_map=noise_map)


class Invert(A.ImageOnlyTransform):
    """1 - image, for float images in [0, 1]."""

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return (1.0 - img).astype(np.float32)


class Grey(A.ImageOnlyTransform):
    """The mean of the channels, in every channel (a no-op on one-channel tiles)."""

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        return np.repeat(img.mean(axis=-1, keepdims=True), img.shape[-1], axis=-1).astype(np.float32)


class RGBOnly(A.ImageOnlyTransform):
    """Apply `transform` to three-channel tiles only (grey models have no hue)."""

    def __init__(self, transform: A.ImageOnlyTransform, p: float = 0.5):
        super().__init__(p=p)
        self.transform = transform

    def get_params(self) -> dict:
        # Drawn once per call, not per apply: a patch's planes must all get the same shift.
        return {"seed": int(self.random_generator.integers(2**31))}

    def apply(self, img: np.ndarray, seed: int = 0, **params) -> np.ndarray:
        if img.shape[-1] != 3:
            return img
        self.transform.set_random_seed(seed)
        return np.clip(self.transform(image=img)["image"], 0.0, 1.0).astype(np.float32)


class StainJitter(A.ImageOnlyTransform):
    """HED stain augmentation: haematoxylin, eosin and DAB optical densities each scaled by
    U(1 - sigma, 1 + sigma) and shifted by U(-sigma, sigma) (Tellez et al. 2018). RGB tiles only."""

    def __init__(self, sigma: float = 0.05, p: float = 0.5):
        super().__init__(p=p)
        self.sigma = sigma

    def get_params(self) -> dict:
        return {
            "scale": self.random_generator.uniform(1 - self.sigma, 1 + self.sigma, 3),
            "shift": self.random_generator.uniform(-self.sigma, self.sigma, 3),
        }

    def apply(self, img: np.ndarray, scale: np.ndarray = None, shift: np.ndarray = None, **params) -> np.ndarray:
        if img.shape[-1] != 3:
            return img
        # skimage's stain matrices without rgb2hed's clipping of negative stains, which is lossy.
        density = -np.log(np.clip(img, 1.0 / 255, 1.0))  # optical density per RGB channel
        hed = density @ hed_from_rgb * scale + shift  # shift in optical density units
        return np.clip(np.exp(-(hed @ rgb_from_hed)), 0.0, 1.0).astype(np.float32)


def process_rank() -> int:
    """This process's rank under torch.distributed, 0 otherwise."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


def draw_rng() -> np.random.Generator:
    """The generator of one random tile or patch: drawn from torch's generator, which DataLoader seeds per
    worker and per epoch, with the rank mixed in because Lightning seeds every DDP process alike."""
    return np.random.default_rng([int(torch.randint(2**62, ())), process_rank()])
