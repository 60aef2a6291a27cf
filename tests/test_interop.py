"""Interoperability: block-wise labels, several outputs in one pass, OME-Zarr in and out, streamed TIFFs, ROIs, CSV."""

import csv

import numpy as np
import pytest
import tifffile
import torch
from conftest import same_objects as same_up_to_renumbering
from scipy import ndimage
from skimage.draw import polygon2mask

from unetseg.cli.predict import main as predict_main
from unetseg.inference.labeling import BlockLabeler
from unetseg.inference.pipeline import PredictSettings, predict_file, predict_image
from unetseg.inference.postprocess import to_labels
from unetseg.io import open_image
from unetseg.io.zarr import LazyPlanes, open_zarr
from unetseg.spec import InputSpec

zarr = pytest.importorskip("zarr")
Label = pytest.importorskip("ome_zarr.reader").Label
roifile = pytest.importorskip("roifile")


def blobs(shape, seed=1, spacing=26):
    """Labels of round objects on a jittered grid: some touch, none forms a cluster taller than ~50 rows."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    labels = np.zeros(shape, np.int32)
    for cy in range(10, shape[0] - 10, spacing):
        for cx in range(10, shape[1] - 10, spacing):
            y, x, radius = cy + rng.uniform(-7, 7), cx + rng.uniform(-7, 7), rng.uniform(5, 11)
            labels[((rows - y) ** 2 + (cols - x) ** 2 <= radius**2) & (labels == 0)] = labels.max() + 1
    return labels


def label_in_blocks(probs, block_rows, context, band=70):
    """Labels of `probs` (classes, H, W) made by a BlockLabeler fed bands of `band` rows."""
    height, width = probs.shape[1:]
    out = np.zeros((height, width), np.uint32)

    def paint(first, labels):
        region = out[first : first + labels.shape[0]]
        region[labels > 0] = labels[labels > 0]

    labeler = BlockLabeler((height, width), paint, 0.5, block_rows=block_rows, context=context)
    for start in range(0, height, band):
        labeler.add(start, min(start + band, height), probs[:, start : start + band])
    assert labeler.finish() == out.max() + 1
    return out


def test_block_labels_equal_whole_image_labels_up_to_renumbering():
    objects = blobs((1100, 500))
    probs = ndimage.gaussian_filter((objects > 0).astype(np.float32), 1.5)[None]
    whole = to_labels(probs, 0.5)
    blocks = label_in_blocks(probs, block_rows=200, context=96)  # 6 blocks, objects across every border
    assert whole.max() > 700
    assert same_up_to_renumbering(whole, blocks)


def test_block_labels_of_boundary_models_match_whole_image():
    objects = blobs((1100, 500), seed=2)
    interior = ndimage.binary_erosion(objects > 0, iterations=2)
    probs = np.stack([objects == 0, interior, (objects > 0) & ~interior]).astype(np.float32)
    probs = ndimage.gaussian_filter(probs, (0, 1, 1))
    probs /= probs.sum(axis=0)
    whole = to_labels(probs, 0.5)
    blocks = label_in_blocks(probs, block_rows=200, context=96)
    assert np.array_equal(whole > 0, blocks > 0) and whole.max() == blocks.max()
    # Watershed ties between touching objects are broken by queue order, which differs by a pixel or so.
    pairs, counts = np.unique(np.stack([whole[whole > 0], blocks[blocks > 0]]), axis=1, return_counts=True)
    best = np.zeros(whole.max() + 1, np.int64)
    np.maximum.at(best, pairs[0], counts)
    assert best.sum() / (whole > 0).sum() > 0.999


class CountingModel(torch.nn.Module):
    """Wraps a model and counts the tiles it is run on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.tiles = model, 0

    def forward(self, x):
        self.tiles += x.shape[0]
        return self.model(x)


class Bright(torch.nn.Module):
    """A 'model' whose foreground is the bright pixels: logits 20 (x - 0.5) of the normalised image."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        return self.scale * (x.mean(dim=1, keepdim=True) - 0.5)


@pytest.fixture(scope="module")
def predictor():
    return Bright(), InputSpec(in_channels=1)


def test_several_outputs_from_one_model_run(predictor, tmp_path):
    model, spec = predictor
    image = (blobs((300, 260)) > 0) * 3000 + np.random.default_rng(0).integers(0, 500, (300, 260))
    tifffile.imwrite(tmp_path / "in.tif", image.astype(np.uint16), resolution=(2.0, 2.0), resolutionunit=3)
    counting = CountingModel(model)
    settings = PredictSettings(output=("labels", "prob"), tiling=PredictSettings().tiling)
    predict_file(counting, spec, tmp_path / "in.tif", tmp_path / "out" / "in.tif", settings)
    one_run = counting.tiles
    for kind in ("labels", "prob"):
        predict_file(model, spec, tmp_path / "in.tif", tmp_path / kind / "in.tif", PredictSettings(output=kind))
        together = tifffile.imread(tmp_path / "out" / f"in_{kind}.tif")
        alone = tifffile.imread(tmp_path / kind / "in.tif")
        assert together.dtype == alone.dtype and np.array_equal(together, alone)
    predict_file(counting, spec, tmp_path / "in.tif", tmp_path / "again.tif", PredictSettings(output="prob"))
    assert counting.tiles == 2 * one_run  # two outputs cost one model run


def test_compressed_tiled_tiff_streams_and_predicts_as_uncompressed(predictor, tmp_path):
    model, spec = predictor
    image = ((blobs((300, 260)) > 0) * 200 + 20).astype(np.uint8)
    tifffile.imwrite(tmp_path / "plain.tif", image)
    tifffile.imwrite(tmp_path / "tiled.tif", image, tile=(64, 64), compression="zlib")
    opened = open_image(tmp_path / "tiled.tif")
    assert isinstance(opened.planes, LazyPlanes) and opened.planes.shape == (1, 300, 260)
    assert np.array_equal(opened.planes[0][100:140], image[100:140])
    for name in ("plain", "tiled"):
        predict_file(model, spec, tmp_path / f"{name}.tif", tmp_path / "out" / f"{name}.tif", PredictSettings("prob"))
    assert np.array_equal(tifffile.imread(tmp_path / "out/plain.tif"), tifffile.imread(tmp_path / "out/tiled.tif"))


def write_ome_zarr(path, image, pixel_size):
    """An OME-Zarr image (cyx, one channel) as other tools write it, with ome-zarr's writer."""
    from ome_zarr.writer import write_image

    group = zarr.open_group(str(path), mode="w")
    transforms = [[{"type": "scale", "scale": [1.0, pixel_size * 2**k, pixel_size * 2**k]}] for k in range(2)]
    axes = [{"name": "c", "type": "channel"}] + [{"name": a, "type": "space", "unit": "micrometer"} for a in "yx"]
    write_image(image[None], group, axes=axes, coordinate_transformations=transforms, scale_factors=[2])


def test_ome_zarr_input_gets_labels_group_napari_reads_with_scale(predictor, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    model, spec = predictor
    image = ((blobs((300, 260)) > 0) * 3000 + 100).astype(np.uint16)
    source = tmp_path / "cells.ome.zarr"
    write_ome_zarr(source, image, 0.5)
    opened = open_zarr(source)
    assert opened.planes.shape == (1, 300, 260, 1) and not opened.stack
    assert opened.calibration.unit == "micron" and opened.calibration.resolution == (2.0, 2.0)
    settings = PredictSettings(output=("labels", "prob"), format="ome-zarr", measure=True)
    predict_file(model, spec, source, tmp_path / "out" / "cells.tif", settings)

    nodes = list(Reader(parse_url(str(source)))())  # as napari-ome-zarr reads it: the image, then its labels
    assert nodes[0].metadata["coordinateTransformations"][0][0]["scale"][-2:] == [0.5, 0.5]
    (label_node,) = [node for node in nodes[1:] if node.load(Label)]
    assert label_node.metadata["coordinateTransformations"][0][0]["scale"] == [0.5, 0.5]
    assert label_node.metadata["coordinateTransformations"][1][0]["scale"] == [1.0, 1.0]
    written = np.asarray(label_node.data[0])
    assert same_up_to_renumbering(written, to_labels((image > 1000)[None].astype(np.float32), 0.5))
    assert np.array_equal(np.asarray(label_node.data[1]), written[::2, ::2])
    prob = zarr.open_group(str(tmp_path / "out" / "cells_prob.ome.zarr"), mode="r")
    assert np.asarray(prob["0"]).shape == (300, 260)
    with open(tmp_path / "out" / "cells_objects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(np.unique(written)) - 1 > 20
    assert float(rows[0]["area_um2"]) == pytest.approx(int(rows[0]["area"]) * 0.25)
    assert float(rows[0]["mean_intensity_0"]) == pytest.approx(3100)


def test_cli_writes_several_outputs_rois_and_measurements(checkpoint, tmp_path):
    image = ((blobs((120, 100)) > 0) * 200 + 20).astype(np.uint8)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "a.tif", image)
    args = [str(tmp_path / "in"), str(tmp_path / "out"), "--checkpoint", str(checkpoint), "-q"]
    assert predict_main([*args, "--output", "labels", "prob", "--rois", "--measure"]) == 0
    names = sorted(path.name for path in (tmp_path / "out").iterdir())
    assert names == ["a_labels.tif", "a_objects.csv", "a_prob.tif", "a_rois.zip"]
    assert predict_main([*args, "--output", "labels", "prob", "--rois", "--measure"]) == 0  # all exist: skipped


def test_rois_read_back_match_label_outlines_and_csv_has_one_row_per_object(predictor, tmp_path):
    model, spec = predictor
    image = ((blobs((200, 180)) > 0) * 3000 + 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", image, resolution=(4.0, 4.0), imagej=True, metadata={"unit": "micron"})
    settings = PredictSettings(output="labels", rois=True, measure=True)
    predict_file(model, spec, tmp_path / "in.tif", tmp_path / "out" / "in.tif", settings)
    labels = tifffile.imread(tmp_path / "out" / "in.tif")
    rois = roifile.roiread(tmp_path / "out" / "in_rois.zip")
    assert len(rois) == len(np.unique(labels)) - 1 > 10
    for roi in rois:
        label = int(roi.name)
        points = roi.coordinates() - 0.5  # ImageJ pixel centres are at +0.5
        drawn = polygon2mask(labels.shape, points[:, ::-1])
        mask = labels == label
        holes = ndimage.binary_fill_holes(mask) & ~mask
        assert np.array_equal(drawn & ~holes, mask), label
    with open(tmp_path / "out" / "in_objects.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(int(row["label"]) for row in rows) == sorted(int(roi.name) for roi in rois)
    for row in rows[:5]:
        mask = labels == int(row["label"])
        assert int(row["area"]) == mask.sum()
        assert float(row["area_um2"]) == pytest.approx(mask.sum() / 16)
        assert float(row["centroid_y"]) == pytest.approx(np.nonzero(mask)[0].mean())


def test_every_new_flag_is_in_the_help(capsys):
    from unetseg.cli import export

    for main, flags in (
        (predict_main, ["--output KIND [KIND ...]", "--format {tiff,ome-zarr}", "--rois", "--measure", ".ome.zarr"]),
        (export.main, ["--format {onnx,bioimageio}", "--model NAME", "bioimageio.core"]),
    ):
        with pytest.raises(SystemExit):
            main(["--help"])
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), [flag for flag in flags if flag not in text]


def test_ngff_04_zarr_v2_image_gets_a_v2_labels_group(predictor, tmp_path):
    from ome_zarr.format import FormatV04
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr.writer import write_image

    model, spec = predictor
    image = ((blobs((200, 180)) > 0) * 3000 + 100).astype(np.uint16)
    source = tmp_path / "old.ome.zarr"
    group = zarr.open_group(str(source), mode="w", zarr_format=2)
    scales = [[{"type": "scale", "scale": [1.0, 1.0, 0.3 * 2**k, 0.3 * 2**k]}] for k in range(2)]
    write_image(
        image[None, None], group, axes="tcyx", fmt=FormatV04(), scale_factors=[2], coordinate_transformations=scales
    )
    opened = open_zarr(source)
    assert opened.planes.shape == (1, 200, 180, 1) and opened.calibration.resolution == (1 / 0.3, 1 / 0.3)
    predict_file(
        model, spec, source, tmp_path / "out.tif", PredictSettings(output=("labels", "mask"), format="ome-zarr")
    )
    labels_group = zarr.open_group(str(source / "labels"), mode="r")
    assert labels_group.metadata.zarr_format == 2 and dict(labels_group.attrs)["labels"] == ["labels", "mask"]
    (label_node,) = [
        node for node in Reader(parse_url(str(source)))() if node.load(Label) and "labels/labels" in str(node.zarr)
    ]
    assert label_node.metadata["coordinateTransformations"][0][0]["scale"] == [0.3, 0.3]
    assert same_up_to_renumbering(np.asarray(label_node.data[0]), to_labels((image > 1000)[None].astype(np.float32)))


def test_block_rows_bound_block_memory_by_width():
    from unetseg.inference.labeling import BLOCK_ROWS, block_rows_for

    assert block_rows_for(2000) == BLOCK_ROWS
    assert block_rows_for(12000) == 8_000_000 // 12000 - 256
    assert block_rows_for(200_000) == 128


def test_file_labels_made_in_blocks_equal_whole_image_labels(predictor, tmp_path, monkeypatch):
    import unetseg.inference.labeling as blocks

    model, spec = predictor
    image = ((blobs((700, 300), seed=3) > 0) * 3000 + 100).astype(np.uint16)
    tifffile.imwrite(tmp_path / "in.tif", image)
    probs = predict_image(model, spec, image, PredictSettings("prob"))[None]
    monkeypatch.setattr(blocks, "BLOCK_PIXELS", 300 * (150 + 2 * blocks.CONTEXT_ROWS))  # 150-row blocks
    assert blocks.block_rows_for(300) == 150
    predict_file(model, spec, tmp_path / "in.tif", tmp_path / "labels.tif", PredictSettings("labels"))
    assert same_up_to_renumbering(tifffile.imread(tmp_path / "labels.tif"), to_labels(probs, 0.5))
