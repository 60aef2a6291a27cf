"""The embedded default dataset: microscopy-like images of touching nuclei, generated locally.

It backs `make demo`, the tests and `configs/tiny.yaml`, so nothing needs downloading.
Images vary in nucleus size, texture, noise, blur, uneven illumination and bit depth
(8-bit PNG and 16-bit TIFF); masks are instance labels (uint16 TIFF).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage import io as skio

from unetseg.inference.postprocess import remove_small

DEFAULT_CACHE = Path(os.environ.get("UNETSEG_CACHE", Path.home() / ".cache" / "unetseg"))


def nuclei_image(rng: np.random.Generator, shape: tuple[int, int] = (256, 256)) -> tuple[np.ndarray, np.ndarray]:
    """One float image in [0, 1] and its instance labels (uint16), with touching, textured nuclei."""
    height, width = shape
    labels = np.zeros(shape, dtype=np.uint16)
    mean_radius = rng.uniform(6, 16)
    count = int(rng.uniform(0.25, 0.55) * height * width / (np.pi * mean_radius**2))
    rows, cols = np.mgrid[:height, :width]
    # Cluster half of the centres so that many nuclei touch.
    centres = rng.uniform((0, 0), (height, width), size=(count, 2))
    parents = rng.integers(0, max(count, 1), size=count)
    clustered = rng.random(count) < 0.5
    centres[clustered] = centres[parents[clustered]] + rng.normal(0, 1.6 * mean_radius, size=(clustered.sum(), 2))
    for label, (cy, cx) in enumerate(centres, start=1):
        ry, rx = mean_radius * rng.uniform(0.7, 1.3, size=2)
        angle = rng.uniform(0, np.pi)
        dy, dx = rows - cy, cols - cx
        u = (dy * np.cos(angle) + dx * np.sin(angle)) / ry
        v = (-dy * np.sin(angle) + dx * np.cos(angle)) / rx
        inside = (u**2 + v**2 <= 1.0) & (labels == 0)  # earlier nuclei stay on top: they touch, not overlap
        labels[inside] = label
    labels = remove_small(labels, min_size=int(0.2 * np.pi * mean_radius**2)).astype(np.uint16)

    brightness = np.zeros(shape, dtype=np.float32)
    for label in range(1, labels.max() + 1):
        brightness[labels == label] = rng.uniform(0.4, 1.0)
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), rng.uniform(1, 3))
    image = brightness * (1 + 0.35 * texture / (texture.std() + 1e-6))
    image = ndimage.gaussian_filter(image, rng.uniform(0.5, 2.0))  # optics
    gy, gx = rng.normal(0, 0.5, size=2)
    illumination = 1 + 0.4 * (gy * (rows / height - 0.5) + gx * (cols / width - 0.5))  # uneven field
    image = image * illumination + rng.uniform(0.02, 0.15)
    image = rng.poisson(np.clip(image, 0, None) * rng.uniform(50, 400)) / 400.0  # shot noise
    image = image + rng.normal(0, rng.uniform(0.005, 0.03), shape)  # read noise
    image = np.clip(image / max(np.percentile(image, 99.9), 1e-6), 0, 1)
    return image.astype(np.float32), labels


def make_nuclei_dataset(root: str | Path, count: int = 24, shape: tuple[int, int] = (256, 256), seed: int = 0) -> Path:
    """Write `count` image/mask pairs to root/images and root/masks; returns root.

    Even indices are 8-bit PNG, odd ones 16-bit TIFF (12-bit range, as many cameras).
    """
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        image, labels = nuclei_image(rng, shape)
        name = f"nuclei_{index:03d}"
        if index % 2 == 0:
            skio.imsave(root / "images" / f"{name}.png", (image * 255).round().astype(np.uint8), check_contrast=False)
        else:
            tifffile.imwrite(root / "images" / f"{name}.tif", (image * 4095).round().astype(np.uint16))
        tifffile.imwrite(root / "masks" / f"{name}.tif", labels)
    return root


def default_dataset(count: int = 24, seed: int = 0) -> Path:
    """The embedded dataset, generated once into the cache folder ($UNETSEG_CACHE or ~/.cache/unetseg)."""
    root = DEFAULT_CACHE / f"synthetic-nuclei-v1-n{count}-seed{seed}"
    if not (root / ".complete").exists():
        make_nuclei_dataset(root, count=count, seed=seed)
        (root / ".complete").touch()
    return root
