"""Volumes in and out: NIfTI affine and header round trips, voxel spacing from NIfTI and 3-D TIFF, the
embedded synthetic volumes, and nibabel's own test files."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from unetseg.io import ImageReadError, find_images, image_key
from unetseg.io.nifti import open_nifti, read_nifti, write_nifti
from unetseg.io.normalize import Normalization
from unetseg.io.source import spacing_calibration, tiff_spacing
from unetseg.io.volumes import VolumeChannels, open_volume, read_volume_labels, volume_range
from unetseg.synthetic import make_nuclei_volumes

nibabel = pytest.importorskip("nibabel")
NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def nibabel_file(name: str) -> Path:
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"nibabel's test file {name} is not installed")
    return path


def test_nifti_reads_as_zyx_with_spacing_from_pixdim(tmp_path):
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (Z, Y, X)
    affine = np.diag([0.5, 0.75, 3.0, 1.0])
    nibabel.save(nibabel.Nifti1Image(volume.T, affine), tmp_path / "a.nii.gz")
    opened = open_nifti(tmp_path / "a.nii.gz")
    assert opened.voxels.shape == (4, 5, 6)
    assert opened.spacing == (3.0, 0.75, 0.5)
    np.testing.assert_array_equal(opened.voxels[:], volume)
    np.testing.assert_array_equal(opened.voxels[1:3], volume[1:3])
    np.testing.assert_array_equal(opened.voxels[2], volume[2])


@pytest.mark.parametrize("name", ["anatomical.nii", "standard.nii.gz", "reoriented_anat_moved.nii"])
def test_nibabel_files_keep_affine_and_header_through_write(tmp_path, name):
    source = nibabel_file(name)
    original = nibabel.load(source)
    opened = open_nifti(source)
    np.testing.assert_array_equal(read_nifti(source), np.asarray(original.dataobj).T)
    mask = (read_nifti(source) > np.median(read_nifti(source))).astype(np.uint8)
    out = write_nifti(tmp_path / "mask.nii.gz", mask, like=opened)
    written = nibabel.load(out)
    np.testing.assert_allclose(written.affine, original.affine)
    assert written.header.get_zooms() == original.header.get_zooms()
    for key in ("qform_code", "sform_code", "xyzt_units", "descrip"):
        assert written.header[key] == original.header[key], key
    np.testing.assert_allclose(written.get_qform(), original.get_qform())
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj).T, mask)


def test_four_dimensional_nifti_is_refused_naming_the_file():
    path = nibabel_file("example4d.nii.gz")
    with pytest.raises(ImageReadError, match=r"example4d.nii.gz: cannot use a NIfTI of shape \(128, 96, 24, 2\)"):
        open_nifti(path)


def test_broken_nifti_is_named(tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti at all")
    with pytest.raises(ImageReadError, match="bad.nii.gz: cannot read NIfTI"):
        open_nifti(tmp_path / "bad.nii.gz")


def test_probabilities_are_written_as_vector_voxels(tmp_path):
    probs = np.random.default_rng(0).random((4, 3, 5, 6)).astype(np.float32)  # (Z, C, Y, X)
    out = write_nifti(tmp_path / "p.nii", probs, spacing=(2.0, 1.0, 1.0))
    written = nibabel.load(out)
    assert written.shape == (6, 5, 4, 1, 3)
    assert written.header.get_intent()[0] == "vector"
    np.testing.assert_array_equal(np.asarray(written.dataobj)[:, :, :, 0, 1].T, probs[:, 1])


def test_tiff_spacing_from_imagej_and_ome(tmp_path):
    volume = np.zeros((3, 8, 10), np.uint16)
    tifffile.imwrite(
        tmp_path / "ij.tif",
        volume,
        imagej=True,
        resolution=(1 / 0.25, 1 / 0.5),
        metadata={"axes": "ZYX", "spacing": 1.5, "unit": "micron"},
    )
    tifffile.imwrite(
        tmp_path / "ome.tif",
        volume,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.5, "PhysicalSizeZ": 2.0},
    )
    assert open_volume(tmp_path / "ij.tif").spacing == pytest.approx((1.5, 0.5, 0.25))
    assert open_volume(tmp_path / "ij.tif").unit == "micron"
    assert open_volume(tmp_path / "ome.tif").spacing == pytest.approx((2.0, 0.5, 0.25))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint32])
def test_spacing_calibration_round_trips_through_tiff(tmp_path, dtype):
    calibration = spacing_calibration((2.5, 0.4, 0.4), "micron")
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((2, 4, 4), dtype), **calibration.tiff_kwargs("ZYX", dtype))
    opened = open_volume(tmp_path / "a.tif")
    assert opened.spacing == pytest.approx((2.5, 0.4, 0.4))
    assert tiff_spacing(opened.calibration) == pytest.approx((2.5, 0.4, 0.4))


def test_zcyx_tiff_opens_channels_last_and_converts_lazily(tmp_path):
    volume = np.random.default_rng(0).integers(0, 255, (4, 3, 6, 7)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", volume, imagej=True, metadata={"axes": "ZCYX"})
    opened = open_volume(tmp_path / "rgb.tif")
    assert opened.voxels.shape == (4, 6, 7, 3)
    view = VolumeChannels(opened.voxels, 3)
    assert view.shape == (3, 4, 6, 7)
    np.testing.assert_array_equal(view[:, 1:3], np.moveaxis(volume, 1, 0)[:, 1:3])
    grey = VolumeChannels(opened.voxels, 1)[:, 0:4]
    np.testing.assert_array_equal(grey[0], volume.mean(axis=1, dtype=np.float32).round().astype(np.uint8))


def test_volume_range_is_the_whole_volume_percentile():
    volume = np.random.default_rng(0).integers(0, 4000, (5, 20, 30)).astype(np.uint16)
    low, high = volume_range(volume, 1, Normalization(1.0, 99.0))
    assert (low, high) == tuple(float(v) for v in np.percentile(volume, [1.0, 99.0], method="lower"))
    floats = volume.astype(np.float32)
    assert volume_range(floats, 1, Normalization(1.0, 99.0)) == (low, high)


def test_nifti_names_pair_without_their_double_suffix(tmp_path):
    for name in ("images/ct/brain.nii.gz", "images/cells.tif"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert sorted(find_images(tmp_path / "images")) == ["cells", "ct/brain"]
    assert image_key(tmp_path / "images/ct/brain.nii.gz", tmp_path / "images") == "ct/brain"


def test_synthetic_volumes_are_anisotropic_touching_and_in_both_formats(tmp_path):
    root = make_nuclei_volumes(tmp_path / "v", count=2, shape=(16, 48, 48), seed=1)
    assert sorted(p.name for p in (root / "images").iterdir()) == ["volume_000.tif", "volume_001.nii.gz"]
    for name in ("volume_000.tif", "volume_001.nii.gz"):
        volume = open_volume(root / "images" / name)
        labels = read_volume_labels(root / "masks" / name)
        assert volume.shape == labels.shape == (16, 48, 48)
        assert volume.spacing == pytest.approx((2.0, 0.5, 0.5))
        assert np.asarray(volume.voxels[:]).dtype == np.uint16
        assert labels.max() >= 5
        # Touching: some voxel of one nucleus has a face neighbour in another.
        a, b = labels[:, :, :-1], labels[:, :, 1:]
        assert np.any((a > 0) & (b > 0) & (a != b))
        # Nuclei are foreground-brighter than the background.
        voxels = np.asarray(volume.voxels[:], dtype=np.float32)
        assert voxels[labels > 0].mean() > 2 * voxels[labels == 0].mean()
