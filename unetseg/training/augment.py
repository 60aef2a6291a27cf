"""Albumentations pipelines built from a typed, YAML-friendly augmentation config."""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import cv2


@dataclass
class Augmentation:
    """Probabilities (0 disables) of each augmentation applied to training tiles.

    Spatial transforms move image and mask together (masks with nearest-neighbour
    interpolation, so instance labels stay labels); intensity transforms touch the image only.
    Images arrive normalised to float32 in [0, 1].
    """

    flip: float = 0.5  # horizontal and vertical, each
    rotate90: float = 0.5  # a random multiple of 90 degrees
    elastic: float = 0.0  # elastic deformation (U-Net paper)
    grid_distortion: float = 0.0
    brightness_contrast: float = 0.5
    gamma: float = 0.3
    noise: float = 0.2  # additive Gaussian noise
    blur: float = 0.1  # Gaussian blur
    noise_std: tuple[float, float] = (0.01, 0.05)  # as a fraction of the [0, 1] range
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    gamma_limit: tuple[int, int] = (70, 150)  # percent, as albumentations' RandomGamma

    def __post_init__(self):
        for name in ("flip", "rotate90", "elastic", "grid_distortion", "brightness_contrast", "gamma", "noise", "blur"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augmentation.{name} is a probability in [0, 1], got {value!r}")


def build_transform(config: Augmentation | None) -> A.Compose | None:
    """The training pipeline for `config`; None when nothing is enabled."""
    if config is None:
        return None
    steps = []
    if config.flip:
        steps += [A.HorizontalFlip(p=config.flip), A.VerticalFlip(p=config.flip)]
    if config.rotate90:
        steps.append(A.RandomRotate90(p=config.rotate90))
    if config.elastic:
        steps.append(A.ElasticTransform(alpha=30, sigma=6, border_mode=cv2.BORDER_REFLECT_101, p=config.elastic))
    if config.grid_distortion:
        steps.append(A.GridDistortion(border_mode=cv2.BORDER_REFLECT_101, p=config.grid_distortion))
    if config.brightness_contrast:
        steps.append(
            A.RandomBrightnessContrast(config.brightness_limit, config.contrast_limit, p=config.brightness_contrast)
        )
    if config.gamma:
        steps.append(A.RandomGamma(gamma_limit=config.gamma_limit, p=config.gamma))
    if config.noise:
        steps.append(A.GaussNoise(std_range=config.noise_std, p=config.noise))
    if config.blur:
        steps.append(A.GaussianBlur(blur_limit=(3, 5), p=config.blur))
    return A.Compose(steps) if steps else None
