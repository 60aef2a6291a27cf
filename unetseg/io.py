"""Reading and writing images and masks, channel handling and percentile normalisation."""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tifffile
from skimage import io as skio

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")


class ImageReadError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the reason."""


def is_image_file(path: Path) -> bool:
    """True for a file whose suffix is one we can read."""
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as stored: (H, W), (H, W, C) or a (Z, H, W[, C]) stack, original dtype."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
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


@dataclass(frozen=True)
class Normalization:
    """Percentile normalisation over a whole image: (x - p_low) / (p_high - p_low), float32.

    The percentiles are taken once per image (all channels together, as CSBDeep/StarDist do),
    so a 16-bit image is never squashed tile by tile. Integer images use an exact histogram,
    which keeps memory flat for very large images.
    """

    low: float = 1.0
    high: float = 99.8
    clip: bool = True  # to [0, 1]: intensity augmentations (gamma) need non-negative values

    def __post_init__(self):
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"normalization percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")

    def range(self, image: np.ndarray) -> tuple[float, float]:
        """The (low, high) intensity values of this image's percentiles."""
        return image_percentiles(image, self.low, self.high)

    def apply(self, image: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
        """Scale with a range from `range()`; float32 out, not clipped (as CSBDeep)."""
        low, high = value_range
        scale = np.float32(1.0 / max(high - low, 1e-6))
        out = np.asarray(image, dtype=np.float32)
        if out is image:
            out = out.copy()
        out -= np.float32(low)
        out *= scale
        if self.clip:
            np.clip(out, 0.0, 1.0, out=out)
        return out

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.apply(image, self.range(image))

    def to_dict(self) -> dict:
        return asdict(self)


# Float images with more values than this are subsampled, evenly, to this many.
PERCENTILE_SAMPLE_ABOVE, PERCENTILE_SAMPLES = 16_000_000, 4_000_000


def image_percentiles(image: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Percentiles of all pixels; exact by histogram for 8/16-bit integers, subsampled for huge floats."""
    flat = np.asarray(image).reshape(-1)
    if flat.dtype in (np.uint8, np.uint16):
        # In chunks: bincount converts to int64, 8 bytes a pixel for the whole image at once otherwise.
        counts = np.zeros(2 ** (8 * flat.itemsize), dtype=np.int64)
        for start in range(0, flat.size, 1 << 22):
            counts += np.bincount(flat[start:start + (1 << 22)], minlength=counts.size)
        return histogram_percentiles(counts, low, high)
    if flat.size > PERCENTILE_SAMPLE_ABOVE:
        flat = flat[:: flat.size // PERCENTILE_SAMPLES]
    return tuple(float(v) for v in np.percentile(flat, [low, high]))


def histogram_percentiles(counts: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Percentiles from a histogram of integer values (counts[v] = pixels of value v), exactly as
    np.percentile(method="lower"): the smallest value whose rank reaches q."""
    cumulative = np.cumsum(counts, dtype=np.float64)
    total = cumulative[-1]
    values = [int(np.searchsorted(cumulative, np.floor(q / 100.0 * (total - 1)) + 1)) for q in (low, high)]
    return float(values[0]), float(values[1])


def write_tiff(path: str | Path, array: np.ndarray, **kwargs) -> Path:
    """Write a TIFF atomically (see `atomic_output`); keyword arguments go to `tifffile.imwrite`
    (resolution, metadata, compression...)."""
    with atomic_output(path) as temporary:
        tifffile.imwrite(temporary, array, **kwargs)
    return Path(path)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """A temporary file in `path`'s folder, renamed to `path` when the block succeeds, deleted if it fails.

    An interrupted write never leaves a half-written file under the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp.tif", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        umask = os.umask(0)  # reading the umask means setting it
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual mode
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def release_pages(array: np.ndarray) -> None:
    """Drop the resident pages of the memory map behind `array` (a view of a `numpy.memmap`).

    Band-by-band readers and writers call it after each band, so a huge memory-mapped image
    does not accumulate in the process's resident memory; the pages stay in the kernel's file
    cache (write-back first: the map is flushed). A no-op for ordinary arrays.
    """
    while array is not None and not isinstance(array, np.memmap):
        array = getattr(array, "base", None)
    mapping = getattr(array, "_mmap", None)
    if mapping is None or not hasattr(mapping, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    if array.mode != "r":
        mapping.flush()
    mapping.madvise(mmap.MADV_DONTNEED)
