"""Reading images and masks into numpy arrays, and converting channels.

Every reader checks the size an image claims in its header against a cap (`max_pixels`)
before decoding it, so a small compressed file cannot make us allocate gigabytes.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image
from skimage import io as skio

from unetseg.io.files import TIFF_SUFFIXES, image_suffix
from unetseg.io.source import DEFAULT_MAX_PIXELS, ImageReadError, check_compression, check_pixels

JPEG_SUFFIXES = (".jpg", ".jpeg")


def _check_header(path: Path, max_pixels: int | None) -> None:
    """Refuse a file whose header claims more than `max_pixels` pixels, or a TIFF that would decompress far
    beyond its size (`check_compression`), without decoding the pixels."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            channels = math.prod(side for side, axis in zip(series.shape, series.axes) if axis in "SC")
            check_pixels(path, tuple(series.shape), channels, max_pixels)
            check_compression(path, series.shape, series.dtype, series.dataoffset is not None)
        return
    with Image.open(path) as image:  # lazy: the header only
        check_pixels(path, (image.height, image.width, getattr(image, "n_frames", 1)), 1, max_pixels)


def read_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as stored: (H, W), (H, W, C) or a (Z, H, W[, C]) stack, original dtype.

    Files whose header claims more than `max_pixels` pixels are refused before decoding (None: no cap).
    NIfTI volumes come as (Z, Y, X) (see `unetseg.io.nifti`), a single slice as (Y, X).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    if image_suffix(path) in (".nii", ".nii.gz"):
        from unetseg.io.nifti import open_nifti, read_nifti  # nibabel is an optional extra

        check_pixels(path, open_nifti(path).voxels.shape, 1, max_pixels)
        volume = read_nifti(path)
        return volume[0] if len(volume) == 1 else volume
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our own cap replaces Pillow's (179 Mpx, below a 30000 x 30000 image)
    try:
        _check_header(path, max_pixels)
        array = tifffile.imread(path) if path.suffix.lower() in TIFF_SUFFIXES else skio.imread(path)
    except ImageReadError:
        raise
    except Exception as error:  # every reader has its own exception types
        raise ImageReadError(f"{path}: cannot read image ({type(error).__name__}: {error})") from error
    finally:
        Image.MAX_IMAGE_PIXELS = limit
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


def read_labels(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS, stack: bool = False) -> np.ndarray:
    """Read a mask file as a 2D integer array: binary (0/1 or 0/255), instance labels or class indices.

    Label values are kept exactly: int32 when they fit, else int64 or uint64. JPEG files are
    refused (lossy compression changes the values). `stack` also accepts a (Z, H, W) TIFF
    stack, as unetseg-predict writes for stacks.
    """
    path = Path(path)
    if path.suffix.lower() in JPEG_SUFFIXES:
        raise ImageReadError(
            f"{path}: JPEG masks are refused: JPEG compression is lossy, so label values change and "
            "object edges blur into new values; save masks as PNG or TIFF"
        )
    mask = read_image(path, max_pixels)
    if stack and mask.ndim == 3 and not (mask.shape[-1] in (3, 4) and _is_colour(path)):
        return _exact_labels(mask, path)
    if mask.ndim == 3 and mask.shape[-1] in (3, 4):
        colour = mask[..., :3]
        if not (np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])):
            raise ImageReadError(f"{path}: a mask must be single-channel (grey, labels); this one is colour RGB")
        mask = colour[..., 0]
    elif mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 2:
        raise ImageReadError(f"{path}: a mask must be 2D (H, W); this one has shape {mask.shape}")
    return _exact_labels(mask, path)


def _is_colour(path: Path) -> bool:
    """True when a 3D file of 3 or 4 planes holds (H, W, RGB[A]): unless ImageJ or OME metadata say Z or T."""
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return True
    with tifffile.TiffFile(path) as tif:
        return not ((tif.is_imagej or tif.is_ome) and tif.series[0].axes[0] in "ZT")


def _exact_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """Integer labels with every value kept: int32 when they fit (the common case), else int64 or uint64."""
    if mask.dtype.kind == "f":
        if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)) or mask.min() < 0:
            raise ImageReadError(f"{path}: a float mask must hold non-negative whole numbers")
        mask = mask.astype(np.int64)
    if mask.size and mask.min() < 0:
        raise ImageReadError(f"{path}: a mask must not hold negative values")
    largest = int(mask.max(initial=0))
    for dtype in (np.int32, np.int64, np.uint64):
        if largest <= np.iinfo(dtype).max:
            return mask.astype(dtype, copy=False)
    raise ImageReadError(f"{path}: label {largest} does not fit 64 bits")  # unreachable for numpy integers
