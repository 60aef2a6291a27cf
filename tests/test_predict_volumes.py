"""Predicting volumes: NIfTI affine and header, and TIFF Z spacing, through predict -> write -> read; 2-D
models on NIfTI plane by plane; `python -m unetseg train --config tiny3d` then predict on a NIfTI volume."""

import csv

import numpy as np
import pytest
import tifffile
import torch
from conftest import QUIET
from skimage import io as skio
from torch import nn

from unetseg.cli import main as unetseg_main
from unetseg.inference import TilingConfig
from unetseg.inference.batch import plan_outputs
from unetseg.inference.pipeline import PredictSettings, predict_file, predict_image
from unetseg.inference.volume import VolumeTiling, predict_volume_tiled
from unetseg.io import ImageReadError
from unetseg.io.nifti import open_nifti, write_nifti
from unetseg.io.normalize import Normalization
from unetseg.io.volumes import open_volume, spacing_calibration
from unetseg.spec import InputSpec
from unetseg.synthetic import make_nuclei_volumes

nibabel = pytest.importorskip("nibabel")
SPEC = InputSpec(1, Normalization(0.0, 100.0), "foreground", 1)
SMALL = VolumeTiling((8, 16, 16), (2, 4, 4))


class Bright3D(nn.Module):
    """A 3-D 'model': logits 20 (x - 0.5) of the normalised input, so the mask is the bright voxels."""

    spatial_dims = 3

    def __init__(self, dims: int = 3):
        super().__init__()
        self.spatial_dims = dims
        self.scale = nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return self.scale * (x - 0.5)


def blobs(shape=(10, 24, 20), seed=0) -> np.ndarray:
    """A uint16 volume: dark background, two bright boxes."""
    volume = np.random.default_rng(seed).integers(0, 100, shape).astype(np.uint16)
    volume[2:6, 3:10, 4:12] = 1000
    volume[6:9, 14:20, 8:16] = 1000
    return volume


def write_blobs(path, spacing=(2.0, 0.5, 0.5)):
    """`blobs()` written as NIfTI (mm) or a TIFF stack (micron) with this voxel size; returns the path."""
    if path.name.endswith(".nii.gz"):
        write_nifti(path, blobs(), spacing=spacing)
    else:
        tifffile.imwrite(path, blobs(), **spacing_calibration(spacing, "micron").tiff_kwargs("ZYX", np.uint16))
    return path


def expected_mask(volume):
    return np.where(volume > volume.min() + (volume.max() - volume.min()) / 2, 255, 0).astype(np.uint8)


def test_nifti_affine_and_header_survive_predict_write_read(tmp_path):
    volume = blobs()
    affine = np.array([[0, 0, -2.5, 90.0], [0.8, 0, 0, -120.0], [0, 0.8, 0, 40.0], [0, 0, 0, 1]])  # oblique axes
    image = nibabel.Nifti1Image(volume.T, affine)
    image.header["descrip"] = b"scanner 7"
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nibabel.save(image, tmp_path / "ct.nii.gz")
    for output in ("mask", "labels", "prob"):
        target = tmp_path / output / "ct.nii.gz"
        predict_file(Bright3D(), SPEC, tmp_path / "ct.nii.gz", target, PredictSettings(output=output, volume=SMALL))
        written = nibabel.load(target)
        np.testing.assert_allclose(written.affine, affine)
        np.testing.assert_allclose(written.get_qform(), affine)
        assert (int(written.header["qform_code"]), int(written.header["sform_code"])) == (1, 2)
        assert written.header["descrip"] == b"scanner 7"
        assert written.header.get_xyzt_units() == ("mm", "sec")
        assert written.header.get_zooms()[:3] == image.header.get_zooms()[:3]
        data = open_nifti(target).voxels[:]
        assert data.shape == volume.shape
        if output == "mask":
            np.testing.assert_array_equal(data, expected_mask(volume))
        elif output == "labels":
            assert written.get_data_dtype() == np.uint16 and data.max() == 2
        else:
            assert written.get_data_dtype() == np.float32 and 0.0 <= data.min() and data.max() <= 1.0


@pytest.mark.parametrize("output, dtype", [("mask", np.uint8), ("prob", np.float32), ("labels", np.uint16)])
def test_tiff_z_spacing_survives_predict_write_read(tmp_path, output, dtype):
    volume = blobs()
    calibration = spacing_calibration((2.5, 0.4, 0.4), "micron")
    tifffile.imwrite(tmp_path / "stack.tif", volume, **calibration.tiff_kwargs("ZYX", np.uint16))
    target = tmp_path / "out.tif"
    predict_file(Bright3D(), SPEC, tmp_path / "stack.tif", target, PredictSettings(output=output, volume=SMALL))
    opened = open_volume(target)
    assert opened.shape == volume.shape and np.asarray(opened.voxels[:]).dtype == dtype
    assert opened.spacing == pytest.approx((2.5, 0.4, 0.4)) and opened.unit == "micron"
    if output == "mask":
        np.testing.assert_array_equal(opened.voxels[:], expected_mask(volume))


def test_nifti_spacing_goes_to_tiff_outputs(tmp_path):
    write_nifti(tmp_path / "v.nii", blobs(), spacing=(3.0, 0.5, 0.25), unit="micron")
    predict_file(Bright3D(), SPEC, tmp_path / "v.nii", tmp_path / "v.tif", PredictSettings(volume=SMALL))
    assert open_volume(tmp_path / "v.tif").spacing == pytest.approx((3.0, 0.5, 0.25))


def test_a_2d_model_predicts_a_nifti_volume_plane_by_plane(tmp_path):
    volume = blobs()
    write_nifti(tmp_path / "v.nii.gz", volume, spacing=(2.0, 1.0, 1.0))
    settings = PredictSettings(output="prob")
    predict_file(Bright3D(dims=2), SPEC, tmp_path / "v.nii.gz", tmp_path / "v_out.nii.gz", settings)
    probs = open_nifti(tmp_path / "v_out.nii.gz").voxels[:]
    planes = [predict_image(Bright3D(dims=2), SPEC, plane, settings) for plane in volume]
    np.testing.assert_allclose(probs, np.stack(planes), atol=1e-6)
    predict_file(Bright3D(dims=2), SPEC, tmp_path / "v.nii.gz", tmp_path / "m.nii.gz", PredictSettings())
    masks = [predict_image(Bright3D(dims=2), SPEC, plane, PredictSettings()) for plane in volume]
    np.testing.assert_array_equal(open_nifti(tmp_path / "m.nii.gz").voxels[:], np.stack(masks))


def test_predict_image_of_a_3d_model_is_the_tiled_volume(tmp_path):
    volume = blobs().astype(np.float32)
    probs = predict_image(Bright3D(), SPEC, volume, PredictSettings(output="prob", volume=SMALL))
    low, high = volume.min(), volume.max()
    reference = predict_volume_tiled(
        Bright3D(), ((volume - low) / (high - low))[None], tile_size=(8, 16, 16), overlap=(2, 4, 4)
    )
    np.testing.assert_allclose(probs, reference[0], atol=1e-6)
    with pytest.raises(ValueError, match="a 3-D model predicts volumes"):
        predict_image(Bright3D(), SPEC, volume[0], PredictSettings())


def test_plan_outputs_keep_nifti_as_nifti(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("sub/a.nii.gz", "b.nii", "c.tif"):
        (tmp_path / "in" / name).write_bytes(b"x")
    pairs = plan_outputs(tmp_path / "in", tmp_path / "out")
    assert [target.relative_to(tmp_path / "out").as_posix() for _, target in pairs] == [
        "b.nii",
        "c.tif",
        "sub/a.nii.gz",
    ]
    assert plan_outputs(tmp_path / "in" / "b.nii", tmp_path / "o")[0][1] == tmp_path / "o" / "b.nii"
    assert plan_outputs(tmp_path / "in" / "b.nii", tmp_path / "x.nii.gz")[0][1] == tmp_path / "x.nii.gz"


def test_volumes_over_the_pixel_cap_are_refused_unread(tmp_path):
    write_nifti(tmp_path / "v.nii.gz", blobs())
    with pytest.raises(ImageReadError, match=r"v.nii.gz: claims 10x24x20 = 4,800 pixels, more than the limit of 1,000"):
        predict_file(Bright3D(), SPEC, tmp_path / "v.nii.gz", tmp_path / "o.nii.gz", PredictSettings(max_pixels=1000))


def test_volume_rois_outline_each_object_in_each_plane_and_the_overlay_shows_the_middle_plane(tmp_path):
    """--rois on a volume: one ImageJ polygon per object per plane, at that plane's (1-based) stack
    position, named <label>-<plane>; --overlay: the middle plane with the outlines, beside the outputs."""
    roifile = pytest.importorskip("roifile")
    write_nifti(tmp_path / "v.nii.gz", blobs(), spacing=(2.0, 0.5, 0.5))
    settings = PredictSettings("mask", volume=SMALL, rois=True, overlay=True)
    predict_file(Bright3D(), SPEC, tmp_path / "v.nii.gz", tmp_path / "out" / "v.nii.gz", settings)
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [
        "v_labels.nii.gz",
        "v_mask.nii.gz",
        "v_overlay.png",
        "v_rois.zip",
    ]
    labels = np.asarray(open_volume(tmp_path / "out" / "v_labels.nii.gz").voxels[:])
    rois = roifile.roiread(tmp_path / "out" / "v_rois.zip")
    expected = sorted((int(label), z + 1) for z in range(labels.shape[0]) for label in np.unique(labels[z]) if label)
    assert sorted((int(roi.name[:6]), roi.position) for roi in rois) == expected  # boxes: planes 3-6 and 7-9
    assert len({roi.name for roi in rois}) == len(rois) == 4 + 3
    big = next(roi for roi in rois if roi.position == 3)
    assert big.name.endswith("-0003")
    np.testing.assert_allclose(big.coordinates().min(axis=0), [4, 3])  # x, y of the box [3:10, 4:12]
    np.testing.assert_allclose(big.coordinates().max(axis=0), [12, 10])
    picture = skio.imread(tmp_path / "out" / "v_overlay.png")
    assert picture.shape == (24, 20, 3)
    middle = labels[labels.shape[0] // 2] > 0  # plane 5: the first box
    assert (picture[middle] == [255, 255, 0]).all(axis=-1).any() and not (picture[~middle] == [255, 255, 0]).all(
        -1
    ).any()


@pytest.mark.parametrize("name, unit", [("ct.nii.gz", "mm"), ("stack.tif", "um")])
def test_volume_measurements_are_3d_objects_in_voxels_and_the_files_unit(tmp_path, name, unit):
    """--measure on a volume: one CSV row per 3-D object (volume, centroid, box, mean intensity),
    calibrated by the voxel size (2 x 0.5 x 0.5), and the labels it measured written beside it."""
    source = write_blobs(tmp_path / name)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".tif"
    predict_file(
        Bright3D(), SPEC, source, tmp_path / f"out{suffix}", PredictSettings("mask", volume=SMALL, measure=True)
    )
    assert sorted(path.name for path in tmp_path.glob("out*")) == sorted(
        [f"out_mask{suffix}", f"out_labels{suffix}", "out_objects.csv"]
    )
    with open(tmp_path / "out_objects.csv", newline="") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda row: -int(row["volume"]))
    assert [int(row["volume"]) for row in rows] == [
        4 * 7 * 8,
        3 * 6 * 8,
    ]  # the boxes [2:6, 3:10, 4:12], [6:9, 14:20, 8:16]
    big = rows[0]
    assert [float(big[f"centroid_{axis}"]) for axis in "zyx"] == [3.5, 6.0, 7.5]
    assert [int(big[f"bbox_{end}_{axis}"]) for end in ("min", "max") for axis in "zyx"] == [2, 3, 4, 6, 10, 12]
    assert float(big["mean_intensity_0"]) == 1000.0
    assert float(big[f"volume_{unit}3"]) == pytest.approx(224 * 2.0 * 0.5 * 0.5)
    assert float(big[f"centroid_z_{unit}"]) == pytest.approx(7.0)
    labels = np.asarray(open_volume(tmp_path / f"out_labels{suffix}").voxels[:])
    assert {int(row["label"]) for row in rows} == set(np.unique(labels[labels > 0]).tolist())


def test_volume_outputs_as_ome_zarr_keep_voxel_size_and_mark_labels(tmp_path):
    """--format ome-zarr for a volume: <name>_<kind>.ome.zarr with z, y, x axes scaled by the voxel
    size in its unit, labels marked as labels (napari opens them as a labels layer), the same
    values as the NIfTI outputs."""
    Reader = pytest.importorskip("ome_zarr.reader").Reader
    parse_url = pytest.importorskip("ome_zarr.io").parse_url
    source = tmp_path / "ct.nii.gz"
    write_nifti(source, blobs(), spacing=(2.0, 0.5, 0.5))
    kinds = ("labels", "prob")
    predict_file(
        Bright3D(),
        SPEC,
        source,
        tmp_path / "zarr" / "ct.nii.gz",
        PredictSettings(kinds, format="ome-zarr", volume=SMALL),
    )
    predict_file(Bright3D(), SPEC, source, tmp_path / "nifti" / "ct.nii.gz", PredictSettings(kinds, volume=SMALL))
    assert sorted(path.name for path in (tmp_path / "zarr").iterdir()) == ["ct_labels.ome.zarr", "ct_prob.ome.zarr"]
    for kind in kinds:
        (node,) = list(Reader(parse_url(str(tmp_path / "zarr" / f"ct_{kind}.ome.zarr")))())
        assert [axis["name"] for axis in node.metadata["axes"]] == ["z", "y", "x"]
        assert [axis.get("unit") for axis in node.metadata["axes"]] == ["millimeter"] * 3
        assert node.metadata["coordinateTransformations"][0][0]["scale"] == [2.0, 0.5, 0.5]
        nifti = np.asarray(open_volume(tmp_path / "nifti" / f"ct_{kind}.nii.gz").voxels[:])
        np.testing.assert_allclose(np.asarray(node.data[0]), nifti, atol=1e-6)
        attributes = zarr_attributes(tmp_path / "zarr" / f"ct_{kind}.ome.zarr")
        assert ("image-label" in attributes) == (kind == "labels")
    assert not list((tmp_path / "zarr").glob(".*"))  # no partial output left


def test_an_ome_zarr_volume_gets_its_labels_in_its_own_labels_group(tmp_path):
    """A 3-D model on an OME-Zarr volume (z, y, x with a scale, as ome-zarr writes it): read lazily
    with its voxel size; --format ome-zarr puts the labels into IMAGE.zarr/labels/labels, where
    napari finds them with the image; the labels equal those of the same volume as a TIFF stack."""
    zarr = pytest.importorskip("zarr")
    write_image = pytest.importorskip("ome_zarr.writer").write_image
    reader = pytest.importorskip("ome_zarr.reader")
    Reader, Label = reader.Reader, reader.Label
    parse_url = pytest.importorskip("ome_zarr.io").parse_url
    volume, source = blobs(), tmp_path / "cells.ome.zarr"
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    transforms = [[{"type": "scale", "scale": [2.0, 0.5 * 2**k, 0.5 * 2**k]}] for k in range(2)]
    write_image(
        volume,
        zarr.open_group(str(source), mode="w"),
        axes=axes,
        coordinate_transformations=transforms,
        scale_factors=[2],
    )
    opened = open_volume(source)
    assert opened.shape == volume.shape and opened.spacing == pytest.approx((2.0, 0.5, 0.5))
    settings = PredictSettings("labels", format="ome-zarr", volume=SMALL)
    predict_file(Bright3D(), SPEC, source, tmp_path / "out" / "cells.tif", settings)
    write_blobs(tmp_path / "stack.tif")
    predict_file(
        Bright3D(), SPEC, tmp_path / "stack.tif", tmp_path / "stack_labels.tif", PredictSettings("labels", volume=SMALL)
    )
    nodes = list(Reader(parse_url(str(source)))())  # the image, then its labels, as napari-ome-zarr reads them
    (labels_node,) = [node for node in nodes[1:] if node.load(Label)]
    assert labels_node.metadata["coordinateTransformations"][0][0]["scale"] == [2.0, 0.5, 0.5]
    np.testing.assert_array_equal(np.asarray(labels_node.data[0]), tifffile.imread(tmp_path / "stack_labels.tif"))
    assert "image-label" in zarr_attributes(source / "labels" / "labels")
    with pytest.raises(ImageReadError, match=r"cells.ome.zarr: claims 10x24x20 = 4,800 pixels"):
        open_volume(source, max_pixels=1000)


def test_a_compressed_tiled_tiff_volume_is_read_lazily_and_predicted_as_the_plain_one(tmp_path):
    volume = blobs()
    tifffile.imwrite(tmp_path / "plain.tif", volume)
    tifffile.imwrite(tmp_path / "tiled.tif", volume, tile=(16, 16), compression="zlib")
    for name in ("plain", "tiled"):
        settings = PredictSettings("labels", volume=SMALL)
        predict_file(Bright3D(), SPEC, tmp_path / f"{name}.tif", tmp_path / "out" / f"{name}.tif", settings)
    plain, tiled = (tifffile.imread(tmp_path / "out" / f"{name}.tif") for name in ("plain", "tiled"))
    assert plain.max() >= 2  # the two boxes (split further without a voxel size)
    np.testing.assert_array_equal(tiled, plain)


def zarr_attributes(path) -> dict:
    """The OME attributes of a zarr group, NGFF 0.4 (top level) or 0.5 (under "ome")."""
    zarr = pytest.importorskip("zarr")
    attributes = dict(zarr.open_group(str(path), mode="r").attrs)
    return attributes.get("ome", attributes)


@pytest.mark.parametrize("name", ["ct.nii.gz", "stack.tif"])
def test_several_outputs_of_a_volume_from_one_run_match_the_single_runs(tmp_path, name):
    source = write_blobs(tmp_path / name)
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".tif"
    kinds = ("mask", "prob", "labels")
    predict_file(Bright3D(), SPEC, source, tmp_path / "all" / f"out{suffix}", PredictSettings(kinds, volume=SMALL))
    written = sorted(path.name for path in (tmp_path / "all").iterdir())
    assert written == sorted(f"out_{kind}{suffix}" for kind in kinds)  # .nii.gz kept whole
    for kind in kinds:
        alone = tmp_path / kind / f"out{suffix}"
        predict_file(Bright3D(), SPEC, source, alone, PredictSettings(kind, volume=SMALL))
        together = open_volume(tmp_path / "all" / f"out_{kind}{suffix}")
        single = open_volume(alone)
        assert together.spacing == pytest.approx((2.0, 0.5, 0.5))
        np.testing.assert_allclose(np.asarray(together.voxels[:]), np.asarray(single.voxels[:]), atol=1e-6)
        assert np.asarray(together.voxels[:]).dtype == np.asarray(single.voxels[:]).dtype
    assert open_volume(tmp_path / "all" / f"out_labels{suffix}").voxels[:].max() == 2


def test_predict_image_of_a_3d_model_gives_every_kind_asked_for():
    volume = blobs().astype(np.float32)
    kinds = ("labels", "mask", "prob")
    made = predict_image(Bright3D(), SPEC, volume, PredictSettings(kinds, volume=SMALL))
    assert list(made) == list(kinds)
    for kind in kinds:
        np.testing.assert_allclose(
            made[kind], predict_image(Bright3D(), SPEC, volume, PredictSettings(kind, volume=SMALL))
        )
    np.testing.assert_array_equal(made["mask"], expected_mask(blobs()))
    assert made["labels"].dtype == np.uint16 and made["labels"].max() >= 2


def test_volume_tiling_is_checked():
    with pytest.raises(ValueError, match="volume overlap"):
        VolumeTiling((8, 16, 16), (8, 4, 4))
    with pytest.raises(ValueError, match="volume tile_size must be an integer or 3 integers"):
        VolumeTiling((8, 16), (2, 4, 4))


def test_train_tiny3d_then_predict_a_nifti_volume_end_to_end(tmp_path, synthetic_cache, capsys):
    data = make_nuclei_volumes(tmp_path / "data", count=3, shape=(8, 32, 32))
    run = tmp_path / "run"
    unetseg_main(
        [
            "train",
            "--config",
            "tiny3d",
            "--data.root",
            str(data),
            "--data.patch_size",
            "[8, 32, 32]",
            "--data.tiles_per_epoch",
            "4",
            "--trainer.max_epochs",
            "1",
            "--trainer.default_root_dir",
            str(run),
            "--trainer.logger",
            "false",
            *QUIET,
        ]
    )
    checkpoint = run / "checkpoints" / "best.ckpt"
    assert checkpoint.is_file()
    source = data / "images" / "volume_001.nii.gz"
    status = unetseg_main(
        [
            "predict",
            str(source),
            str(tmp_path / "pred"),
            "--checkpoint",
            str(checkpoint),
            "--output",
            "labels",
            "--volume-tile",
            "8,32,32",
            "--volume-overlap",
            "2,8,8",
            "--measure",
            "-q",
        ]
    )
    assert status == 0, capsys.readouterr().err
    with open(tmp_path / "pred" / "volume_001_objects.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    labels = np.asarray(nibabel.load(tmp_path / "pred" / "volume_001.nii.gz").dataobj)
    assert sorted(int(row["label"]) for row in rows) == np.unique(labels[labels > 0]).tolist()
    assert all(float(row["volume_um3"]) == pytest.approx(int(row["volume"]) * 0.5 * 0.5 * 2.0) for row in rows)
    written = nibabel.load(tmp_path / "pred" / "volume_001.nii.gz")
    original = nibabel.load(source)
    assert written.shape == original.shape == (32, 32, 8)
    np.testing.assert_allclose(written.affine, original.affine)
    assert written.header.get_zooms() == pytest.approx((0.5, 0.5, 2.0))


@pytest.mark.parametrize("outputs", [("mask",), ("prob",), ("labels",), ("mask", "prob", "labels")])
def test_a_2d_model_predicts_a_float_nifti_stack_as_its_tiff_stack(tmp_path, outputs):
    # Each container of a Z stack goes through one path: a 2-D model predicts (and labels) plane by plane.
    stack = np.stack([blobs((1, 160, 176), seed=seed)[0] for seed in range(3)]).astype(np.float32)
    write_nifti(tmp_path / "s.nii.gz", stack, spacing=(2.0, 1.0, 1.0))
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    settings = PredictSettings(output=outputs if len(outputs) > 1 else outputs[0], tiling=TilingConfig(64, 16))
    predict_file(Bright3D(dims=2), SPEC, tmp_path / "s.nii.gz", tmp_path / "out.nii.gz", settings)
    predict_file(Bright3D(dims=2), SPEC, tmp_path / "s.tif", tmp_path / "out.tif", settings)
    for kind in outputs:
        suffix = f"_{kind}" if len(outputs) > 1 else ""
        from_nifti = np.asarray(open_nifti(tmp_path / f"out{suffix}.nii.gz").voxels[:])
        from_tiff = tifffile.imread(tmp_path / f"out{suffix}.tif")
        assert from_nifti.shape == from_tiff.shape == stack.shape
        np.testing.assert_allclose(from_nifti, from_tiff, atol=1e-6)
