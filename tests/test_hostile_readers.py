"""Hostile OME-Zarr, NIfTI and TIFF inputs (issue 25): crafted metadata is one line naming the file, a
non-zero exit and no output for it, while the other files of the folder are still predicted; nothing in
the input folder changes. Metadata that cannot be used but does not make the pixels wrong (a pixel size
of 0) is ignored with a warning naming the file, as for TIFFs; missing OME-Zarr chunks are read as the
fill value with a warning, never silently."""

import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from unetseg.cli import predict as predict_cli
from unetseg.inference.pipeline import PredictSettings, predict_file
from unetseg.io import ImageReadError, read_image
from unetseg.io.registry import open_source
from unetseg.spec import InputSpec
from unetseg.synthetic import nuclei_image

zarr = pytest.importorskip("zarr")
nibabel = pytest.importorskip("nibabel")
TILING = ["--tile-size", "64", "--overlap", "16", "--batch-size", "4", "--device", "cpu", "-q"]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under root, with its content."""
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in root.rglob("*")}


def grey(shape=(40, 40), seed=0) -> np.ndarray:
    image, _ = nuclei_image(np.random.default_rng(seed), shape)
    return (image * 255).astype(np.uint8)


def run_batch(checkpoint, tmp_path, capsys, name: str, make, *extra) -> tuple[int, list[str], list[str], Path]:
    """Predict a folder of good.png and `name` (made by make(path)); (status, error lines, output files, out)."""
    folder = tmp_path / "in"
    folder.mkdir()
    skio.imsave(folder / "good.png", grey(), check_contrast=False)
    make(folder / name)
    before = tree(folder)
    out = tmp_path / "out"
    status = predict_cli.main([str(folder), str(out), "--checkpoint", str(checkpoint), *TILING, *extra])
    assert tree(folder) == before  # inputs untouched
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    files = sorted(str(path.relative_to(out)) for path in out.rglob("*")) if out.exists() else []
    return status, err, files, folder / name


def assert_refused(checkpoint, tmp_path, capsys, name, make, message):
    status, err, files, path = run_batch(checkpoint, tmp_path, capsys, name, make)
    errors = [line for line in err if line.startswith("error:")]
    assert status == 1 and len(errors) == 1, err
    assert errors[0].startswith(f"error: {path}: ") and message in errors[0][len(f"error: {path}: ") :], errors[0]
    assert files == ["good.tif"]  # the good file predicted, nothing (hidden or not) for the bad one
    return errors[0]


# --- OME-Zarr -------------------------------------------------------------------------------------------


def ome_zarr(path: Path, array=None, axes=("y", "x"), scale=None, chunks=(16, 16)) -> Path:
    """An OME-NGFF 0.5 image (zarr v3) of one level, "0"."""
    array = grey((32, 32)) if array is None else array
    group = zarr.open_group(str(path), mode="w")
    level = group.create_array("0", shape=array.shape, dtype=array.dtype, chunks=chunks, fill_value=0)
    level[...] = array
    transform = {"type": "scale", "scale": list(scale or [1.0] * len(axes))}
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": n, "type": "space" if n in "zyx" else "channel"} for n in axes],
                "datasets": [{"path": "0", "coordinateTransformations": [transform]}],
            }
        ],
    }
    return path


def edited(path: Path, **changes) -> Path:
    """Rewrite fields of level 0's zarr.json (chunk_shape: the regular grid's)."""
    meta_path = path / "0" / "zarr.json"
    meta = json.loads(meta_path.read_text())
    for key, value in changes.items():
        if key == "chunk_shape":
            meta["chunk_grid"]["configuration"]["chunk_shape"] = value
        else:
            meta[key] = value
    meta_path.write_text(json.dumps(meta))
    return path


ZARR_CASES = {
    "huge shape": (lambda p: edited(ome_zarr(p), shape=[100000, 100000]), "more than the limit"),
    "negative shape": (lambda p: edited(ome_zarr(p), shape=[-5, 32]), "non-negative"),
    "empty axis": (lambda p: edited(ome_zarr(p), shape=[0, 32]), "has no pixels (shape 0x32)"),
    "chunk size 0": (lambda p: edited(ome_zarr(p), chunk_shape=[0, 16]), "chunk shape (0, 16) has a side < 1"),
    "complex dtype": (
        lambda p: ome_zarr(p, np.ones((32, 32), np.complex64)),
        "data type complex64 is not an image (integers, floats or booleans)",
    ),
    "no multiscales": (
        lambda p: zarr.open_group(str(p), mode="w").create_array("0", shape=(8, 8), dtype="u1"),
        "no OME-NGFF multiscales metadata",
    ),
    "more axes than the array": (lambda p: ome_zarr(p, axes=("z", "y", "x")), "expected Y and X axes"),
    "an axis twice": (
        lambda p: ome_zarr(p, np.ones((2, 32, 32), np.uint8), axes=("x", "y", "x"), chunks=(1, 16, 16)),
        "axes x, y, x name an axis twice",
    ),
}


@pytest.mark.parametrize("case", list(ZARR_CASES))
def test_crafted_ome_zarr_metadata_fails_that_file_only(checkpoint, tmp_path, capsys, case):
    make, message = ZARR_CASES[case]
    assert_refused(checkpoint, tmp_path, capsys, "bad.ome.zarr", make, message)


@pytest.mark.parametrize("scale", [[0.0, 0.0], [-1.0, -2.0], [float("nan"), 1.0]])
def test_unusable_ome_zarr_scale_is_ignored_with_a_warning(tmp_path, caplog, scale):
    path = ome_zarr(tmp_path / "s.ome.zarr", scale=scale)
    with caplog.at_level(logging.WARNING, logger="unetseg"):
        image = open_source(path)
    assert image.calibration.resolution is None and image.planes.shape == (1, 32, 32)
    assert f"{path}: pixel size metadata ignored" in caplog.text


def test_missing_ome_zarr_chunks_are_named_never_silently_zeros(checkpoint, tmp_path, capsys):
    def make(path):
        ome_zarr(path)
        (path / "0" / "c" / "0" / "0").unlink()  # one of 4 chunks lost (an interrupted copy)

    status, err, files, path = run_batch(checkpoint, tmp_path, capsys, "holes.ome.zarr", make)
    warnings = [line for line in err if line.startswith(f"warning: {path}:") and "chunks of level" in line]
    assert status == 0 and files == ["good.tif", "holes.tif"]
    assert len(warnings) == 1, err
    assert "1 of 4 chunks of level 0 are not stored; they read as the fill value 0" in warnings[0]
    complete = ome_zarr(tmp_path / "complete.ome.zarr")
    with pytest.MonkeyPatch.context() as patch:
        warned = []
        patch.setattr(logging.Logger, "warning", lambda self, *a, **k: warned.append(a))
        open_source(complete)
    assert warned == []


# --- NIfTI ----------------------------------------------------------------------------------------------


def nifti_header_only(path: Path, dims: tuple, voxels: bytes = b"\x01" * 1000) -> Path:
    """A NIfTI file whose header declares `dims` (uint8) followed by only a few voxels."""
    header = nibabel.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(dims)
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * 4 + voxels
    (gzip.open if path.name.endswith(".gz") else open)(path, "wb").write(raw)
    return path


def nifti(path: Path, data: np.ndarray, pixdim=None) -> Path:
    image = nibabel.Nifti1Image(data, np.eye(4))
    if pixdim is not None:
        image.header["pixdim"][1:4] = pixdim
    nibabel.save(image, path)
    return path


NIFTI_CASES = {
    "huge dims, tiny file": (
        lambda p: nifti_header_only(p, (30000, 30000, 30000)),
        "file is truncated (1,352 bytes; its voxels need 27,000,000,000,352)",
    ),
    "dims over a truncated file": (
        lambda p: nifti_header_only(p, (1000, 1000, 500)),
        "file is truncated (1,352 bytes; its voxels need 500,000,352)",
    ),
    "5-D data": (lambda p: nifti(p, np.ones((8, 8, 4, 1, 3), np.uint16)), "expected a 3-D volume"),
    "4-D data": (lambda p: nifti(p, np.ones((8, 8, 4, 2), np.uint16)), "expected a 3-D volume"),
    "wrong magic": (lambda p: p.write_bytes(b"\x5c\x01\0\0" + b"x" * 400), "cannot read NIfTI"),
    "complex voxels": (lambda p: nifti(p, np.ones((8, 8, 4), np.complex64)), "is not a grey-value image"),
}


@pytest.mark.parametrize("case", list(NIFTI_CASES))
def test_crafted_nifti_fails_that_file_only(checkpoint, tmp_path, capsys, case):
    make, message = NIFTI_CASES[case]
    assert_refused(checkpoint, tmp_path, capsys, "bad.nii", make, message)


@pytest.mark.parametrize(
    "dims, message",
    [((30000, 30000, 30000), "more than the limit"), ((64, 64, 4), "file is truncated or damaged")],
)
def test_a_truncated_gzipped_nifti_fails_that_file_only(checkpoint, tmp_path, capsys, dims, message):
    assert_refused(checkpoint, tmp_path, capsys, "bad.nii.gz", lambda p: nifti_header_only(p, dims), message)


@pytest.mark.parametrize("pixdim", [(0.0, 1.0, 1.0), (1.0, -2.0, 1.0), (float("nan"), 1.0, 1.0), (1.0, 1.0, np.inf)])
def test_zero_negative_or_nan_pixdim_is_ignored_with_one_warning_naming_the_file(tmp_path, capsys, caplog, pixdim):
    path = nifti(tmp_path / "v.nii", np.ones((8, 8, 4), np.uint16), pixdim)
    with caplog.at_level(logging.WARNING):
        image = open_source(path)
    x, y, z = pixdim
    bad = [not (np.isfinite(v) and v > 0) for v in (z, y, x)]
    assert [step is None for step in image.spacing] == bad
    assert all(step is None or step > 0 for step in image.spacing)
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].startswith(f"{path}: voxel size (pixdim)") and "ignored" in lines[0]
    assert "pixdim[1,2,3]" not in capsys.readouterr().err  # nibabel's own unnamed line is not printed


class Bright(__import__("torch").nn.Module):
    """A 'model' whose logits are 20 (x - 0.5) of the normalised input; spatial_dims 2 or 3."""

    def __init__(self, dims: int):
        super().__init__()
        self.spatial_dims = dims

    def forward(self, x):
        return 20 * (x - 0.5)


@pytest.mark.parametrize("dims", [2, 3])
def test_nan_and_inf_voxels_give_the_2d_warning_once(tmp_path, caplog, dims):
    volume = np.random.default_rng(0).random((4, 24, 24)).astype(np.float32) * 100
    volume[1, 3, 3] = np.nan
    volume[1, 5:7, 5:7] = np.inf
    path = nifti(tmp_path / "nan.nii.gz", volume.T.copy())  # NIfTI stores (x, y, z)
    settings = PredictSettings(output="prob", tiling=predict_cli.TilingConfig(tile_size=16, overlap=4))
    settings = PredictSettings(
        output="prob", tiling=settings.tiling, volume=predict_cli.VolumeTiling((4, 16, 16), (0, 4, 4))
    )
    with caplog.at_level(logging.WARNING, logger="unetseg"):
        predict_file(Bright(dims), InputSpec(1), path, tmp_path / "out.nii.gz", settings)
    lines = [r.getMessage() for r in caplog.records if "NaN or infinite" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{path}: 5 of ")
    assert np.isfinite(np.asarray(nibabel.load(tmp_path / "out.nii.gz").dataobj)).all()


# --- TIFF -----------------------------------------------------------------------------------------------


def tiff_claiming(path: Path, height: int, width: int, compression=None) -> Path:
    """A 64 x 64 TIFF whose header then claims height x width pixels in one strip."""
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), compression=compression, rowsperstrip=64, metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(width)
        tags["ImageLength"].overwrite(height)
        tags["RowsPerStrip"].overwrite(height)
        if compression is None:
            tags["StripByteCounts"].overwrite(height * width)
    return path


TIFF_CASES = {
    "uncompressed": (lambda p: tiff_claiming(p, 20000, 20000), "file is truncated"),
    "deflate": (
        lambda p: tiff_claiming(p, 20000, 20000, "zlib"),
        "declares 400,000,000 bytes of pixels in a file of",
    ),
}


@pytest.mark.parametrize("case", list(TIFF_CASES))
def test_tiff_declaring_huge_dimensions_in_a_tiny_file_fails_that_file_only(checkpoint, tmp_path, capsys, case):
    make, message = TIFF_CASES[case]
    line = assert_refused(checkpoint, tmp_path, capsys, "bomb.tif", make, message)
    assert (tmp_path / "in" / "bomb.tif").stat().st_size < 10_000, line


def test_a_tiny_deflate_tiff_is_refused_before_any_strip_is_decoded(tmp_path, monkeypatch):
    path = tiff_claiming(tmp_path / "bomb.tif", 20000, 20000, "zlib")
    decoded = []
    monkeypatch.setattr(tifffile.TiffPage, "decode", property(lambda self: decoded.append(1)))
    with pytest.raises(ImageReadError, match="refused as a decompression bomb"):
        open_source(path)
    with pytest.raises(ImageReadError, match="refused as a decompression bomb"):
        read_image(path)  # training and evaluation read whole images
    assert decoded == []
    ordinary = tmp_path / "zeros.tif"
    tifffile.imwrite(ordinary, np.zeros((512, 512), np.uint8), compression="zlib", metadata=None)
    assert open_source(ordinary).planes.shape == (1, 512, 512)  # all zeros deflates 1000x: still read
