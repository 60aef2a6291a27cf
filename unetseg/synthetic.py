"""The embedded default dataset: microscopy-like images of touching nuclei, generated locally.

It backs `make demo`, the tests and `configs/tiny.yaml`, so nothing needs downloading.
Images vary in nucleus size, texture, noise, blur, uneven illumination and bit depth
(8-bit PNG and 16-bit TIFF); masks are instance labels (uint16 TIFF).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage
from skimage import io as skio

from unetseg.inference.postprocess import remove_small
from unetseg.io.files import cache_folder

DEFAULT_CACHE = cache_folder()


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


# --- Volumes -----------------------------------------------------------------------------------------

VOLUME_SHAPE, VOLUME_SPACING = (24, 96, 96), (2.0, 0.5, 0.5)  # (Z, Y, X) voxels and microns: thick slices


def nuclei_volume(
    rng: np.random.Generator, shape: tuple[int, int, int] = VOLUME_SHAPE, spacing=VOLUME_SPACING
) -> tuple[np.ndarray, np.ndarray]:
    """One float volume (Z, Y, X) in [0, 1] and its instance labels (uint16): touching ellipsoidal nuclei
    imaged with anisotropic voxels (`spacing`, microns), a PSF elongated along Z, dimming with depth and noise.

    Nuclei are placed in physical space (radius 3.5-6 microns), so with thick slices a nucleus
    spans a few planes only, and neighbours touch along Z as well as in the plane.
    """
    spacing = np.asarray(spacing, dtype=np.float64)
    extent = np.asarray(shape) * spacing  # microns
    labels = np.zeros(shape, dtype=np.uint16)
    mean_radius = rng.uniform(3.5, 6.0)
    count = int(rng.uniform(0.3, 0.5) * np.prod(extent) / (4 / 3 * np.pi * mean_radius**3))
    centres = rng.uniform(0, extent, size=(count, 3))
    parents = rng.integers(0, max(count, 1), size=count)
    clustered = rng.random(count) < 0.5
    centres[clustered] = centres[parents[clustered]] + rng.normal(0, 1.4 * mean_radius, size=(clustered.sum(), 3))
    for label, centre in enumerate(centres, start=1):
        radii = mean_radius * rng.uniform(0.75, 1.25, size=3)
        rotation = np.linalg.qr(rng.normal(size=(3, 3)))[0]  # a random orientation
        low = np.maximum(np.floor((centre - radii.max()) / spacing).astype(int), 0)
        high = np.minimum(np.ceil((centre + radii.max()) / spacing).astype(int) + 1, shape)
        if np.any(high <= low):
            continue
        grid = np.stack(np.meshgrid(*(np.arange(a, b) for a, b in zip(low, high)), indexing="ij"), -1)
        local = (grid * spacing - centre) @ rotation  # physical offsets in the nucleus's own axes
        inside = ((local / radii) ** 2).sum(-1) <= 1.0
        box = labels[tuple(slice(a, b) for a, b in zip(low, high))]
        box[inside & (box == 0)] = label  # earlier nuclei stay on top: they touch, not overlap
    min_voxels = int(0.15 * 4 / 3 * np.pi * mean_radius**3 / np.prod(spacing))
    labels = remove_small(labels, min_size=max(min_voxels, 1)).astype(np.uint16)

    brightness = rng.uniform(0.4, 1.0, size=int(labels.max()) + 1)
    brightness[0] = 0.0
    texture = ndimage.gaussian_filter(rng.normal(0, 1, shape), rng.uniform(0.8, 1.5) / spacing)
    image = brightness[labels] * (1 + 0.3 * texture / (texture.std() + 1e-6))
    psf = np.asarray([rng.uniform(1.2, 2.0), rng.uniform(0.3, 0.6), rng.uniform(0.3, 0.6)])  # microns, long in Z
    image = ndimage.gaussian_filter(image, psf / spacing)
    depth = np.exp(-rng.uniform(0.0, 0.6) * np.arange(shape[0]) / shape[0])[:, None, None]  # light lost with depth
    image = image * depth + rng.uniform(0.03, 0.15)
    image = rng.poisson(np.clip(image, 0, None) * rng.uniform(30, 200)) / 200.0  # shot noise
    image = image + rng.normal(0, rng.uniform(0.01, 0.04), shape)  # read noise
    image = np.clip(image / max(np.percentile(image, 99.9), 1e-6), 0, 1)
    return image.astype(np.float32), labels


def make_nuclei_volumes(
    root: str | Path,
    count: int = 8,
    shape: tuple[int, int, int] = VOLUME_SHAPE,
    spacing: tuple[float, float, float] = VOLUME_SPACING,
    seed: int = 0,
) -> Path:
    """Write `count` volume/mask pairs to root/images and root/masks; returns root.

    Even indices are 16-bit ZYX TIFF stacks with their voxel size (ImageJ spacing and
    resolution, microns), odd ones gzipped NIfTI with it in the header; masks are uint16
    instance labels in the image's format.
    """
    from unetseg.io.nifti import write_nifti
    from unetseg.io.volumes import spacing_calibration

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    tiff = spacing_calibration(spacing, "micron").tiff_kwargs("ZYX", np.uint16)
    for index in range(count):
        image, labels = nuclei_volume(rng, shape, spacing)
        image = (image * 4095).round().astype(np.uint16)
        name = f"volume_{index:03d}"
        if index % 2 == 0:
            tifffile.imwrite(root / "images" / f"{name}.tif", image, **tiff)
            tifffile.imwrite(root / "masks" / f"{name}.tif", labels, **tiff)
        else:
            write_nifti(root / "images" / f"{name}.nii.gz", image, spacing=spacing, unit="micron")
            write_nifti(root / "masks" / f"{name}.nii.gz", labels, spacing=spacing, unit="micron")
    return root


def default_volume_dataset(count: int = 8, seed: int = 0) -> Path:
    """The embedded volume dataset, generated once into the cache folder ($UNETSEG_CACHE or ~/.cache/unetseg)."""
    root = DEFAULT_CACHE / f"synthetic-volumes-v1-n{count}-seed{seed}"
    if not (root / ".complete").exists():
        make_nuclei_volumes(root, count=count, seed=seed)
        (root / ".complete").touch()
    return root
