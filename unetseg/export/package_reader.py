"""Reading bioimage.io packages that unetseg exported, as untrusted data: the checks every package passes before
its ONNX weights run (`load_package`), so a package from a stranger never writes outside a private temporary
folder, runs code or exhausts memory.

Zip entries are looked up by name and never extracted by path; sizes are bounded from the zip's directory
before anything is decompressed (zip bombs); `rdf.yaml` is read with `yaml.safe_load`; its numbers, axes,
sha256 and the ONNX weights' shapes are checked against each other. Errors name the file.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zipfile
import zlib
from pathlib import Path

import yaml

from unetseg.export.onnx import OnnxPredictor
from unetseg.spec import InputSpec, label_settings

__all__ = ["PACKAGE_SUFFIX", "is_package", "load_package"]

log = logging.getLogger(__name__)

PACKAGE_SUFFIX = ".zip"


def is_package(path: str | Path) -> bool:
    """True for a zip holding an rdf.yaml (a bioimage.io package)."""
    path = Path(path)
    if path.suffix.lower() != PACKAGE_SUFFIX or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "rdf.yaml" in archive.namelist()


# Limits on what a package may hold before anything is decompressed (zip bombs): an rdf.yaml is a few kB;
# an ONNX file holds at most 2 GiB (protobuf's limit); deflate packs weights ~1.1x, zeros ~1000x.
MAX_RDF_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_RATIO, RATIO_FROM_BYTES = 100, 1 << 20  # entries over 1 MiB that expand more than 100 times are refused
MAX_SIZE_MULTIPLE, MAX_MIN_SIZE = 256, 8192  # 2 ** the deepest U-Net a checkpoint may hold; the largest tile
AXES = ("batch", "channel", "y", "x")  # of the input and output tensors of the 2-D models unetseg exports


def _outside(name: str) -> bool:
    """True for a zip entry name that an extractor would write outside its folder: absolute, a drive, or `..`."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts


def _entry(archive: zipfile.ZipFile, name: str, limit: int) -> zipfile.ZipInfo:
    """The directory entry `name`, refused (ValueError) when it declares more than `limit` bytes or expands
    like a zip bomb: checked before a byte of it is decompressed."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise ValueError(f"{name} declares {info.file_size:,} bytes uncompressed, more than the limit of {limit:,}")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_FROM_BYTES and ratio > MAX_RATIO:
        raise ValueError(f"{name} expands {ratio:.0f} times ({info.file_size:,} bytes): refused as a zip bomb")
    return info


def _copy_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, out, limit: int) -> str:
    """Decompress an entry into the open file `out`, chunk by chunk, never past `limit` bytes; its sha256."""
    digest, written = hashlib.sha256(), 0
    with archive.open(info) as entry:  # zipfile stops at the declared size and checks the CRC at its end
        while chunk := entry.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise ValueError(f"{info.filename} holds more than its declared {limit:,} bytes")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _axes(tensors) -> tuple[str, ...] | None:
    """The axes of the first input (output) tensor of an rdf as names: batch, channel, or a space axis's id."""
    first = tensors[0] if isinstance(tensors, list) and tensors and isinstance(tensors[0], dict) else {}
    axes = first.get("axes")
    if not isinstance(axes, list) or not all(isinstance(axis, dict) for axis in axes):
        return None
    return tuple(str(axis.get("id") if axis.get("type") in ("space", "index") else axis.get("type")) for axis in axes)


def _check_rdf(rdf: dict, spec: InputSpec) -> None:
    """ValueError when the rdf's tensors are not (batch, channel, y, x) with the spec's channels and classes."""
    for role, tensors, channels in (
        ("input", rdf.get("inputs"), spec.in_channels),
        ("output", rdf.get("outputs"), spec.classes),
    ):
        axes = _axes(tensors)
        names = None
        if axes == AXES:
            names = tensors[0]["axes"][1].get("channel_names")
        if axes != AXES or (names is not None and (not isinstance(names, list) or len(names) != channels)):
            found = "missing" if axes is None else f"({', '.join(axes)})"
            if axes == AXES:
                found += f" with {len(names) if isinstance(names, list) else names!r} channel(s)"
            raise ValueError(
                f"rdf.yaml: {role} axes {found}; expected (batch, channel, y, x) with {channels} channel(s), "
                "as unetseg-export writes them"
            )


def _unetseg_config(rdf) -> tuple[InputSpec, dict, str]:
    """(input spec, config.unetseg, ONNX weights source) of an rdf; ValueError for anything else."""
    config = (rdf.get("config") or {}) if isinstance(rdf, dict) else {}
    stored = config.get("unetseg") if isinstance(config, dict) else None
    if stored is not None and not isinstance(stored, dict):
        raise ValueError("rdf.yaml: config.unetseg is not a mapping")
    weights = rdf.get("weights") if isinstance(rdf, dict) else None
    onnx = weights.get("onnx") if isinstance(weights, dict) else None
    source = onnx.get("source") if isinstance(onnx, dict) else None
    if not stored or not stored.get("input_spec") or not source:
        raise ValueError(
            "not a package exported by unetseg (no config.unetseg.input_spec or no ONNX weights in rdf.yaml)"
        )
    if not isinstance(source, str) or _outside(source):
        raise ValueError(f"rdf.yaml: weights source {source!r} is not a file inside the package")
    try:
        spec = InputSpec.from_dict(stored["input_spec"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"rdf.yaml: config.unetseg.input_spec: {error}") from None
    try:  # the tuned post-processing, checked now rather than on the first image
        label_settings(spec.postprocess)
    except (ValueError, TypeError, OverflowError) as error:
        raise ValueError(f"rdf.yaml: post-processing {spec.postprocess!r}: {error}") from None
    for key, limit in (("size_multiple", MAX_SIZE_MULTIPLE), ("min_size", MAX_MIN_SIZE)):
        value = stored.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit):
            raise ValueError(f"rdf.yaml: config.unetseg.{key} {value!r} is outside 1..{limit}")
    return spec, stored, source


def _check_weights(predictor: OnnxPredictor, spec: InputSpec, stored: dict, source: str) -> None:
    """ValueError when the ONNX weights are not the network rdf.yaml describes (channels, classes, sizes)."""
    outputs = predictor.session.get_outputs()[0].shape
    classes = outputs[1] if len(outputs) > 1 and isinstance(outputs[1], int) else None
    for what, found, stated in (
        ("takes", predictor.in_channels, spec.in_channels),
        ("outputs", classes, spec.classes),
    ):
        if found is not None and found != stated:
            noun = "in_channels" if what == "takes" else "classes"
            raise ValueError(f"{source} {what} {found} channel(s) but rdf.yaml's input spec says {stated} ({noun})")
    for key, limit in (("size_multiple", MAX_SIZE_MULTIPLE), ("min_size", MAX_MIN_SIZE)):
        value = getattr(predictor, key)
        if not 1 <= value <= limit:
            raise ValueError(f"{source}: its {key} {value} is outside 1..{limit}")
        if stored.get(key) is not None and stored[key] != value:
            raise ValueError(f"{source}: its {key} {value} is not rdf.yaml's {stored[key]}")


def load_package(path: str | Path) -> tuple[OnnxPredictor, InputSpec]:
    """(ONNX predictor, input spec) of a bioimage.io package exported by unetseg; ValueError naming the file otherwise.

    Reads the zip with the standard library: no bioimageio package is needed to predict. A
    package is data from a stranger, so nothing in it is trusted: entries named outside the
    package (absolute, a drive, `..`) refuse it; rdf.yaml is read as plain YAML data (no tags:
    `yaml.safe_load`); each entry's declared size and compression ratio are checked before it is
    decompressed, and reading stops at the declared size (zip bombs); the weights must match the
    sha256 rdf.yaml states, and the network rdf.yaml describes (axes (batch, channel, y, x), channels,
    classes, size multiple). Nothing is extracted but the ONNX weights, under a fixed name in a
    private temporary folder that is removed before this returns.
    """
    path = Path(path)
    try:
        predictor, spec = _read_package(path)
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        # zipfile raises BadZipFile (a bad CRC too), zlib.error, EOFError (truncated), NotImplementedError
        # (an unknown compression) and RuntimeError (encrypted entries); one line whatever the library wrote
        message = " ".join(str(error).split())
        if not isinstance(error, ValueError) or isinstance(error, zipfile.BadZipFile):
            message = f"not a readable bioimage.io package ({message})"
        raise ValueError(f"{path}: {message}") from None
    predictor.path = path
    return predictor, spec


def _read_package(path: Path) -> tuple[OnnxPredictor, InputSpec]:
    """`load_package` without the file name in its errors."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        unsafe = next((name for name in names if _outside(name)), None)
        if unsafe is not None:
            raise ValueError(f"entry {unsafe!r} would be written outside the package (absolute or '..'); refused")
        if "rdf.yaml" not in names:
            raise ValueError("no rdf.yaml in the zip")
        with archive.open(_entry(archive, "rdf.yaml", MAX_RDF_BYTES)) as handle:
            text = handle.read(MAX_RDF_BYTES + 1)
        try:
            rdf = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(
                f"rdf.yaml is not plain YAML data (tags such as !!python/object are refused): {error}"
            ) from None
        spec, stored, source = _unetseg_config(rdf)
        _check_rdf(rdf, spec)
        if source not in names:
            raise ValueError(f"rdf.yaml names {source}, which is not in the package")
        info = _entry(archive, source, MAX_WEIGHTS_BYTES)
        with tempfile.TemporaryDirectory() as tmp:  # ONNX Runtime reads the file once, when the session is made
            onnx_path = Path(tmp) / "weights.onnx"
            with onnx_path.open("wb") as out:
                digest = _copy_entry(archive, info, out, info.file_size)
            stated = rdf["weights"]["onnx"].get("sha256")
            if stated is not None and str(stated).lower() != digest:
                raise ValueError(f"{source}: sha256 {digest} is not the {stated} rdf.yaml states; refused")
            try:
                predictor = OnnxPredictor(onnx_path)
            except ValueError as error:
                raise ValueError(str(error).replace(str(onnx_path), source)) from None
    _check_weights(predictor, spec, stored, source)
    return predictor, spec
