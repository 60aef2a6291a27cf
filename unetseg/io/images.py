"""Reading images and masks into numpy arrays, and converting channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from skimage import io as skio

from unetseg.io.files import TIFF_SUFFIXES, image_suffix


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the reason."""


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as stored: (H, W), (H, W, C) or a (Z, H, W[, C]) stack, original dtype.

    NIfTI volumes come as (Z, Y, X) (see `unetseg.io.nifti`), a single slice as (Y, X).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    if image_suffix(path) in (".nii", ".nii.gz"):
        from unetseg.io.nifti import read_nifti  # nibabel is an optional extra

        volume = read_nifti(path)
        return volume[0] if len(volume) == 1 else volume
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            array = tifffile.imread(path)
        else:
            array = skio.imread(path)
    except Exception as error:  # every reader has its own exception types
        raise ImageReadError(f"{path}: cannot read image ({type(error).__name__}: {error})") from error
    array = np.asarray(array)
    if array.ndim < 2 or min(array.shape[:2]) == 0 or array.dtype.kind not in "uifb":
        raise ImageReadError(f"{path}: not an image (shape {array.shape}, dtype {array.dtype})")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    return array


def is_channels_last(array: np.ndarray) -> bool:
    """True for (H, W, C) with C in 1, 3, 4 (grey, RGB, RGBA), as PNG and most TIFFs store colour."""
    return array.ndim == 3 and array.shape[-1] in (1, 3, 4)


def to_channels(image: np.ndarray, in_channels: int, path: str | Path = "image") -> np.ndarray:
    """Convert one 2D image to (in_channels, H, W): drop alpha, grey <-> RGB, keep the dtype family.

    Grey becomes RGB by repetition; RGB becomes grey by the channel mean. Anything else is refused.
    """
    if image.ndim == 2:
        image = image[:, :, None]
    elif not is_channels_last(image):
        raise ImageReadError(
            f"{path}: cannot use an image of shape {image.shape}; expected (H, W) or (H, W, C) with C in 1, 3, 4"
        )
    if image.shape[-1] == 4:
        image = image[..., :3]
    channels = image.shape[-1]
    if channels == in_channels:
        out = image
    elif in_channels == 3 and channels == 1:
        out = np.repeat(image, 3, axis=-1)
    elif in_channels == 1 and channels == 3:
        out = image.mean(axis=-1, keepdims=True, dtype=np.float32)
        if image.dtype.kind in "ui":
            out = out.round().astype(image.dtype)
    else:
        raise ImageReadError(f"{path}: has {channels} channels, the model expects {in_channels}")
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def read_labels(path: str | Path) -> np.ndarray:
    """Read a mask file as a 2D integer array: binary (0/1 or 0/255), instance labels or class indices."""
    mask = read_image(path)
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        colour = mask[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise ImageReadError(f"{path}: a mask must be single-channel (grey, labels); this one is colour RGB")
        mask = colour[..., 0]
    elif mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ImageReadError(f"{path}: a mask must be 2D (H, W); this one has shape {mask.shape}")
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)) or mask.min() < 0:
            raise ImageReadError(f"{path}: a float mask must hold non-negative whole numbers")
        mask = mask.astype(np.int64)
    if mask.min() < 0:
        raise ImageReadError(f"{path}: a mask must not hold negative values")
    return mask.astype(np.int32, copy=False)
