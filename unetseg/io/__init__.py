"""Files in and out: finding and pairing files, reading images and masks, TIFF axes and pixel size,
normalisation, and atomic writing."""

from unetseg.io.files import (
    IMAGE_SUFFIXES,
    TIFF_SUFFIXES,
    DuplicateNameError,
    atomic_output,
    find_images,
    find_pairs,
    image_key,
    is_image_file,
    pair_name,
)
from unetseg.io.images import read_image, read_labels, to_channels
from unetseg.io.normalize import Normalization, plane_range, value_range
from unetseg.io.source import Calibration, ImageReadError, InputImage
from unetseg.io.tiff import open_image, read_calibration, write_tiff

__all__ = [
    "IMAGE_SUFFIXES",
    "TIFF_SUFFIXES",
    "Calibration",
    "DuplicateNameError",
    "ImageReadError",
    "InputImage",
    "Normalization",
    "atomic_output",
    "find_images",
    "find_pairs",
    "image_key",
    "is_image_file",
    "open_image",
    "pair_name",
    "plane_range",
    "read_calibration",
    "read_image",
    "read_labels",
    "to_channels",
    "value_range",
    "write_tiff",
]
