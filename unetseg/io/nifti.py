"""NIfTI volumes (`.nii`, `.nii.gz`, via nibabel): lazy reading in unetseg's (Z, Y, X) order, voxel
spacing, and writing outputs that keep the input's affine and header.

NIfTI stores voxel axes (i, j, k) with i fastest on disk, the reverse of a C-ordered (Z, Y, X)
array: reversing the axes of a NIfTI array is therefore a view, and so is going back, so
reading and writing never copy a volume to change its order. Outputs get the input's header
(affine, qform/sform codes, units, description) with only the data type changed and the
intensity scaling removed, so masks and labels overlay exactly in ITK-SNAP, 3D Slicer or FSL.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from unetseg.io.files import atomic_output
from unetseg.io.source import ImageReadError, native

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# Millimetres, the usual unit of medical volumes; NIfTI's xyzt_units names it.
NIFTI_UNITS = {"meter": "m", "mm": "mm", "micron": "micron"}


def is_nifti(path: str | Path) -> bool:
    """True for a file name ending in .nii or .nii.gz (any case)."""
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def _nibabel():
    """nibabel, imported when a NIfTI file is met: it is the optional extra `unetseg[nifti]`."""
    try:
        import nibabel
    except ImportError:
        raise ImageReadError("reading NIfTI needs nibabel: pip install 'unetseg[nifti]'") from None
    return nibabel


@dataclass
class NiftiVolume:
    """A NIfTI file opened for reading.

    voxels: a lazy (Z, Y, X) view (`NiftiVoxels`): `voxels[z0:z1]` reads only those slices.
    spacing: voxel size along (Z, Y, X) in `unit`, from the header's pixdim.
    header: the nibabel header (affine, codes, units), for writing outputs like the input.
    """

    voxels: Any
    spacing: tuple[float, float, float]
    unit: str | None
    header: Any
    affine: np.ndarray


class NiftiVoxels:
    """A (Z, Y, X) view of a NIfTI image's (X, Y, Z) data: slicing along Z reads those slices only.

    For an uncompressed .nii nibabel memory-maps the file; a .nii.gz is decompressed up to the
    slices asked for. Slices come out in the stored dtype with the header's scaling applied
    (float32) when the header has one, as nibabel's `dataobj` gives them.
    """

    def __init__(self, dataobj: Any, path: Path):
        self.dataobj, self.path = dataobj, path
        x, y, z = (tuple(dataobj.shape) + (1, 1))[:3]
        self.shape = (int(z), int(y), int(x))
        self.dtype = np.dtype(dataobj.dtype)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first = key[0]
        if isinstance(first, (int, np.integer)):
            first = slice(int(first), int(first) + 1)
            squeeze = True
        else:
            squeeze = False
        if not isinstance(first, slice) or first.step not in (None, 1):
            raise IndexError("NiftiVoxels supports voxels[z], voxels[z0:z1] and further indices after them")
        start, stop, _ = first.indices(self.shape[0])
        try:
            slab = np.asarray(self.dataobj[..., start:stop] if len(self.dataobj.shape) >= 3 else self.dataobj)
        except (ValueError, EOFError, zlib.error) as error:  # a header promising more voxels than the file holds
            raise ImageReadError(f"{self.path}: file is truncated or damaged ({error})") from None
        slab = slab.reshape(slab.shape[:2] + (-1,)).T  # (x, y, z) -> (z, y, x), a view
        slab = slab[0] if squeeze else slab
        return slab[key[1:]] if len(key) > 1 else slab

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        array = self[:]
        return array.astype(dtype) if dtype is not None else array


def open_nifti(path: str | Path) -> NiftiVolume:
    """Open a 3-D NIfTI file (a 4th or 5th axis of length 1 is allowed) without reading its voxels.

    Raises ImageReadError naming the file when it is not a readable 3-D NIfTI.
    """
    nibabel = _nibabel()
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: file is empty")
    try:
        with _nibabel_messages() as messages:  # nibabel prints header fixes without the file's name
            image = nibabel.load(path)
            shape = tuple(int(n) for n in image.shape)
            stated = _stated_pixdim(nibabel, image, path)
    except Exception as error:  # nibabel raises its own, gzip, EOF and value errors on broken files
        raise ImageReadError(f"{path}: cannot read NIfTI ({type(error).__name__}: {error})") from None
    if not 2 <= len(shape) <= 5 or any(n != 1 for n in shape[3:]) or min(shape) < 1:
        raise ImageReadError(
            f"{path}: cannot use a NIfTI of shape {shape} (x, y, z, ...); expected a 3-D volume "
            "(a time or channel axis must have length 1)"
        )
    dataobj = image.dataobj if len(shape) <= 3 else image.dataobj[(...,) + (0,) * (len(shape) - 3)]
    if np.dtype(image.get_data_dtype()).kind not in "uifb":
        raise ImageReadError(f"{path}: NIfTI data type {image.get_data_dtype()} is not a grey-value image")
    if not path.name.lower().endswith(".gz"):  # uncompressed: the header's size must fit in the file
        needed = int(getattr(image.dataobj, "offset", 0)) + math.prod(shape) * np.dtype(image.get_data_dtype()).itemsize
        if path.stat().st_size < needed:
            raise ImageReadError(
                f"{path}: file is truncated ({path.stat().st_size:,} bytes; its voxels need {needed:,})"
            )
    for message in messages:
        if "pixdim" not in message:  # voxel sizes are reported below, with what is done about them
            log.warning("%s: %s", path, message)
    usable = [step if math.isfinite(step) and step > 0 else None for step in stated[: len(shape)]]
    zooms = tuple(usable) + (1.0,) * max(0, 3 - len(shape))
    if None in usable:
        log.warning(
            "%s: voxel size (pixdim) %s is not positive numbers; the unusable ones are ignored (voxel size unknown)",
            path,
            tuple(stated[: len(shape)]),
        )
    unit = image.header.get_xyzt_units()[0]
    return NiftiVolume(
        voxels=NiftiVoxels(dataobj, path),
        spacing=(zooms[2], zooms[1], zooms[0]),
        unit=NIFTI_UNITS.get(unit) if unit else None,
        header=image.header.copy(),
        affine=np.asarray(image.affine, dtype=np.float64),
    )


@contextmanager
def _nibabel_messages() -> Iterator[list[str]]:
    """The messages nibabel logs while the block runs (header problems it fixes), kept from its own handler."""
    logger = logging.getLogger("nibabel.global")
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handlers, propagate = logger.handlers[:], logger.propagate
    collect = Collect()
    for handler in handlers:
        logger.removeHandler(handler)
    logger.addHandler(collect)
    logger.propagate = False
    try:
        yield messages
    finally:
        logger.removeHandler(collect)
        for handler in handlers:
            logger.addHandler(handler)
        logger.propagate = propagate


def _stated_pixdim(nibabel, image: Any, path: Path) -> list[float]:
    """pixdim[1:4] as the file states it: nibabel's loading sets 0 to 1 and negative values to their size."""
    with nibabel.openers.ImageOpener(path) as handle:
        raw = type(image.header).from_fileobj(handle, check=False)
    return [float(value) for value in raw["pixdim"][1:4]]


def read_nifti(path: str | Path) -> np.ndarray:
    """The voxels of a 3-D NIfTI file as a (Z, Y, X) array in its stored dtype (scaled to float if the header
    says so)."""
    volume = open_nifti(path)
    return np.ascontiguousarray(native(volume.voxels[:]))


def write_nifti(
    path: str | Path, array: np.ndarray, like: NiftiVolume | None = None, spacing=None, unit: str = "mm"
) -> Path:
    """Write a (Z, Y, X) array (or (Z, C, Y, X) probabilities, stored as a 5-D vector image) to `path` atomically.

    `like`: the input whose affine and header the output keeps (only the data type changes and
    intensity scaling is removed); None writes an image with `spacing` (Z, Y, X) on the diagonal
    of its affine (in `unit`: "mm", "micron" or "meter"), or 1 mm voxels.
    """
    nibabel = _nibabel()
    path = Path(path)
    array = np.asarray(array)
    if array.ndim == 4:  # (Z, C, Y, X) -> (X, Y, Z, 1, C): NIfTI's vector-valued voxels (intent VECTOR)
        data = np.transpose(array, (3, 2, 0, 1))[:, :, :, None, :]
    elif array.ndim == 3:
        data = array.T
    else:
        raise ValueError(f"{path}: write_nifti takes (Z, Y, X) or (Z, C, Y, X), got shape {array.shape}")
    if like is not None:
        header = like.header.copy()
        image = (
            nibabel.Nifti1Image(data, like.affine, header)
            if isinstance(header, nibabel.Nifti1Header)
            else (nibabel.Nifti2Image(data, like.affine, header))
        )
    else:
        z, y, x = spacing if spacing is not None else (1.0, 1.0, 1.0)
        image = nibabel.Nifti1Image(data, np.diag([x, y, z, 1.0]))
        image.header.set_xyzt_units(unit)
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)  # labels and probabilities are stored as they are
    if array.ndim == 4:
        image.header.set_intent("vector")
    suffix = ".tmp.nii.gz" if path.name.lower().endswith(".gz") else ".tmp.nii"
    with atomic_output(path, suffix=suffix) as temporary:
        nibabel.save(image, temporary)
    return path
