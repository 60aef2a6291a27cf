"""One path for every model and container: 2-D and 3-D models x TIFF, TIFF stack, NIfTI, OME-Zarr and PNG
inputs x mask, prob and labels (alone and together) x ROIs and measurements, each against a whole-array
reference computed here without the pipeline (the network run on the whole normalised array, then
`to_mask` / `to_labels`).

The models are 1x1 convolutions, so tiling cannot change a value and the reference is exact. The
cells a capability does not cover are refusals, asserted with their messages (see `REFUSED`).
"""

import csv
import zipfile

import numpy as np
import pytest
import tifffile
import torch
from conftest import same_objects
from scipy import ndimage
from skimage import io as skio
from torch import nn

from unetseg.inference import TilingConfig
from unetseg.inference.fold import fold_batchnorm
from unetseg.inference.labeling import BlockLabeler
from unetseg.inference.pipeline import PredictSettings, predict_file, predict_image
from unetseg.inference.postprocess import to_labels, to_mask
from unetseg.inference.volume import VolumeTiling
from unetseg.io.normalize import Normalization
from unetseg.io.source import spacing_calibration
from unetseg.spec import InputSpec, label_settings

nibabel = pytest.importorskip("nibabel")
zarr = pytest.importorskip("zarr")

SPACING = (2.0, 0.5, 0.5)  # (Z, Y, X) of every stack and volume here
SETTINGS = dict(tiling=TilingConfig(32, 8, amp=False), volume=VolumeTiling((4, 16, 16), (2, 4, 4)))
KINDS = [("mask",), ("prob",), ("labels",), ("mask", "prob", "labels")]
CONTAINERS = ["image.tif", "stack.tif", "volume.nii.gz", "volume.ome.zarr", "image.png"]
TARGETS = {"foreground": 1, "distance": 4}  # classes of each kind of model


class Pointwise(nn.Module):
    """A 1x1 convolution of 2 or 3 spatial dims: foreground logits 20 (x - 0.5) of the normalised input
    (targets "foreground"), or background / interior / edge / centre logits of it (targets "distance")."""

    def __init__(self, dims: int, targets: str = "foreground"):
        super().__init__()
        self.spatial_dims = dims
        classes = TARGETS[targets]
        self.conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(1, classes, 1)
        weights, biases = ([20.0], [-10.0]) if classes == 1 else ([-20.0, 10.0, 0.0, 20.0], [10.0, -5.0, 0.0, -12.0])
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(weights).reshape(self.conv.weight.shape))
            self.conv.bias.copy_(torch.tensor(biases))

    def forward(self, x):
        return self.conv(x)


def spheres(shape=(10, 40, 36), seed=0) -> np.ndarray:
    """A uint16 volume: dim noise, bright spheres (2 voxels thick per 0.5 in-plane, as SPACING) and a bright
    column through every plane, so every plane holds foreground."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(100, 120, shape).astype(np.uint16)
    zz, yy, xx = np.indices(shape)
    for z, y, x in [(2, 10, 9), (5, 28, 24), (7, 12, 26), (3, 30, 8)]:
        inside = ((zz - z) * SPACING[0]) ** 2 + ((yy - y) * SPACING[1]) ** 2 + ((xx - x) * SPACING[2]) ** 2 < 16
        volume[inside] = rng.integers(1000, 1020, int(inside.sum()))
    volume[:, 18:22, 2:5] = 1010
    return volume


def write_input(path, volume: np.ndarray):
    """`volume` (or its middle plane, for 2-D containers) written as `path`'s container with SPACING."""
    name = path.name
    if name == "image.tif":
        tifffile.imwrite(path, volume[len(volume) // 2])
    elif name == "image.png":
        skio.imsave(path, (volume[len(volume) // 2] // 8).astype(np.uint8), check_contrast=False)
    elif name == "stack.tif":
        tifffile.imwrite(path, volume, **spacing_calibration(SPACING, "micron").tiff_kwargs("ZYX", np.uint16))
    elif name.endswith(".nii.gz"):
        from unetseg.io.nifti import write_nifti

        write_nifti(path, volume.astype(np.float32), spacing=SPACING)  # float32: a read-only view when read
    else:
        from unetseg.io.zarr import OmeZarrWriter

        store = OmeZarrWriter(path, volume.shape, volume.dtype, "zyx", spacing_calibration(SPACING, "micron"), False)
        store.array[...] = volume
        store.commit()
    return path


def stored(path) -> np.ndarray:
    """The voxels as the input holds them, (Z, Y, X): 2-D containers as one plane."""
    if path.name.endswith(".nii.gz"):
        return np.asarray(nibabel.load(path).dataobj).T
    if path.name.endswith(".zarr"):
        return zarr.open_group(str(path), mode="r")["0"][...]
    image = skio.imread(path) if path.suffix == ".png" else tifffile.imread(path)
    return image[None] if image.ndim == 2 else image


def reference(model, spec, voxels: np.ndarray, spacing) -> dict[str, np.ndarray]:
    """mask, prob and labels of (Z, Y, X) `voxels` computed on whole arrays: every plane by itself for a 2-D
    model (normalised with its own range), the whole volume for a 3-D model (normalised with its range)."""
    options = label_settings(spec.postprocess)
    threshold = options["threshold"]

    def probabilities(array):  # (C, ...) normalised -> (classes, ...)
        logits = model(torch.from_numpy(array)[None])[0]
        return (logits.sigmoid() if logits.shape[0] == 1 else logits.softmax(0)).detach().numpy()

    normalization = spec.normalization
    if model.spatial_dims == 3:
        array = voxels[None].astype(np.float32)
        probs = probabilities(normalization.apply(array, normalization.range(array.reshape(1, -1, array.shape[-1]))))
        planes = [probs[:, z] for z in range(len(voxels))]
        labels = to_labels(probs, spacing=spacing, **options) if spec.instances else None
    else:
        planes, labels, count = [], [], 0
        for plane in voxels:
            array = plane[None].astype(np.float32)
            planes.append(probabilities(normalization.apply(array, normalization.range(array))))
            if spec.instances:  # numbers run on across planes, as the pipeline numbers them
                plane_labels = to_labels(planes[-1], **options).astype(np.uint32)
                labels.append(np.where(plane_labels > 0, plane_labels + count, 0))
                count += int(plane_labels.max())
        labels = np.stack(labels) if spec.instances else None
    made = {
        "mask": np.stack([to_mask(p, threshold, spec.targets) for p in planes]),
        "prob": np.stack([p[0] if p.shape[0] == 1 else p for p in planes]),
    }
    if labels is not None:
        made["labels"] = labels
    return made


def read_output(path, kind: str) -> np.ndarray:
    """An output read back as (Z, [C,] Y, X)."""
    if path.name.endswith(".nii.gz"):
        data = np.asarray(nibabel.load(path).dataobj)
        return np.moveaxis(data[:, :, :, 0, :], (0, 1, 2, 3), (3, 2, 0, 1)) if data.ndim == 5 else data.T
    data = skio.imread(path) if path.suffix == ".png" else tifffile.imread(path)
    return (
        data[None] if data.ndim == 2 or (kind == "prob" and data.ndim == 3 and path.name.startswith("image")) else data
    )


def refusal(dims: int, name: str, kinds: tuple[str, ...]) -> str | None:
    """The message a cell that the pipeline refuses must give; None where it predicts."""
    if name == "image.png" and dims == 3:
        return "PNG holds one plane"
    if name == "image.png" and "prob" in kinds:
        return "PNG holds one plane of 8/16-bit masks or labels"
    return None


@pytest.mark.parametrize("kinds", KINDS, ids="+".join)
@pytest.mark.parametrize("name", CONTAINERS)
@pytest.mark.parametrize("dims", [2, 3])
def test_every_model_and_container_gives_the_whole_array_outputs(tmp_path, dims, name, kinds):
    model, spec = Pointwise(dims), InputSpec(1, Normalization(0.0, 100.0), "foreground", 1)
    source = write_input(tmp_path / name, spheres())
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".png" if name.endswith(".png") else ".tif"
    target = tmp_path / "out" / f"{name.split('.')[0]}{suffix}"
    settings = PredictSettings(kinds, **SETTINGS)
    expected_refusal = refusal(dims, name, kinds)
    if expected_refusal:
        with pytest.raises(ValueError, match=expected_refusal):
            predict_file(model, spec, source, target, settings)
        assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
        return
    predict_file(model, spec, source, target, settings)
    voxels = stored(source)
    spacing = SPACING if voxels.shape[0] > 1 else None
    expected = reference(model, spec, voxels, spacing if dims == 3 else None)
    for kind in kinds:
        path = target if len(kinds) == 1 else target.with_name(f"{target.name.split('.')[0]}_{kind}{suffix}")
        written = read_output(path, kind)
        if kind == "labels":
            assert written.shape == expected["labels"].shape
            assert written.max() > 0 and same_objects(written, expected["labels"]), f"{path.name}: labels differ"
        elif kind == "prob":
            np.testing.assert_allclose(written.reshape(expected["prob"].shape), expected["prob"], atol=1e-5)
        else:
            np.testing.assert_array_equal(written.reshape(expected["mask"].shape), expected["mask"])
    assert not [path.name for path in target.parent.iterdir() if path.name.startswith(".")]  # nothing partial


@pytest.mark.parametrize("name", ["stack.tif", "volume.nii.gz", "volume.ome.zarr"])
@pytest.mark.parametrize("dims", [2, 3])
def test_rois_and_measurements_describe_the_labels_of_every_model_and_container(tmp_path, dims, name):
    model, spec = Pointwise(dims), InputSpec(1, Normalization(0.0, 100.0), "foreground", 1)
    source = write_input(tmp_path / name, spheres())
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".tif"
    target = tmp_path / "out" / f"v{suffix}"
    predict_file(model, spec, source, target, PredictSettings("labels", rois=True, measure=True, **SETTINGS))
    labels = read_output(target, "labels")
    with open(tmp_path / "out" / "v_objects.csv") as file:
        rows = list(csv.DictReader(file))
    size = "volume" if dims == 3 else "area"
    if dims == 3:  # one row per 3-D object; one outline per object and plane it lies in
        objects = np.unique(labels[labels > 0])
        assert sorted(int(row["label"]) for row in rows) == objects.tolist()
        outlines = sum(len(np.unique(np.nonzero(labels == n)[0])) for n in objects)
        assert {"centroid_z", "bbox_min_z", "volume_um3"} <= set(rows[0]) or {"volume_mm3"} <= set(rows[0])
    else:  # one row per object of each plane; one outline per object
        objects = [(z, n) for z, plane in enumerate(labels) for n in np.unique(plane[plane > 0])]
        assert sorted((int(row["z"]), int(row["label"])) for row in rows) == sorted(
            (int(z), int(n)) for z, n in objects
        )
        outlines = len(objects)
    assert sum(int(row[size]) for row in rows) == int((labels > 0).sum())
    with zipfile.ZipFile(tmp_path / "out" / "v_rois.zip") as rois:
        assert len(rois.namelist()) == outlines


@pytest.mark.parametrize("together", [False, True])
def test_a_distance_model_mask_is_the_same_alone_or_with_other_outputs(tmp_path, together):
    """Defect 2 of issue 24: the device mask of a `targets: distance` model was class indices 0..3."""
    model, spec = Pointwise(2, "distance"), InputSpec(1, Normalization(0.0, 100.0), "distance", 4)
    source = write_input(tmp_path / "stack.tif", spheres())
    kinds = ("mask", "prob") if together else "mask"
    made = predict_image(model, spec, stored(source), PredictSettings(kinds, **SETTINGS))
    mask = made["mask"] if together else made
    expected = reference(model, spec, stored(source), None)["mask"]
    assert set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask, expected)


def test_a_2d_model_labels_a_stack_plane_by_plane_in_every_container(tmp_path):
    """Defect 3 of issue 24: a 2-D model's NIfTI stack was labelled by one 3-D watershed, its TIFF stack
    plane by plane. Every container now gives the TIFF stack's labels."""
    model, spec = Pointwise(2), InputSpec(1, Normalization(0.0, 100.0), "foreground", 1)
    volume, made = spheres(), {}
    for name in ["stack.tif", "volume.nii.gz", "volume.ome.zarr"]:
        source = write_input(tmp_path / name, volume if name != "volume.nii.gz" else volume)
        suffix = ".nii.gz" if name.endswith(".nii.gz") else ".tif"
        target = tmp_path / name.split(".")[0] / f"v{suffix}"
        predict_file(model, spec, source, target, PredictSettings("labels", **SETTINGS))
        made[name] = read_output(target, "labels")
    for name, labels in made.items():
        for z in range(len(volume)):  # objects never span planes
            assert set(np.unique(labels[z][labels[z] > 0])).isdisjoint(np.unique(labels[z + 1 :]))
        assert same_objects(labels, made["stack.tif"]), name


def test_3d_labels_made_in_blocks_of_planes_equal_whole_volume_labels():
    """The N-D block labeller: blocks of 6 planes with 12 planes of context on a 40-plane volume, objects
    crossing every block border, give the whole volume's labels up to their numbers."""
    rng = np.random.default_rng(3)
    shape, objects = (40, 48, 48), np.zeros((40, 48, 48), bool)
    zz, yy, xx = np.indices(shape)
    for k, z in enumerate(range(2, 40, 4)):  # ellipsoids 5 planes high, at every offset, neighbours apart in Y
        for y in range(5 + 10 * (k % 2), 48, 20):
            x = int(rng.integers(5, 43))
            objects |= ((zz - z) / 2.5) ** 2 + ((yy - y) / 4) ** 2 + ((xx - x) / 4) ** 2 < 1
    probs = ndimage.gaussian_filter(objects.astype(np.float32), 1.0)[None]
    whole = to_labels(probs, 0.5, spacing=(2.0, 1.0, 1.0))
    out = np.zeros(shape, np.uint32)

    def paint(first, labels):
        region = out[first : first + len(labels)]
        region[labels > 0] = labels[labels > 0]

    labeler = BlockLabeler(shape, paint, 0.5, block_rows=6, context=12, spacing=(2.0, 1.0, 1.0))
    for start in range(0, 40, 5):
        labeler.add(start, start + 5, probs[:, start : start + 5])
    assert labeler.finish() == out.max() + 1
    assert whole.max() > 20
    assert same_objects(whole, out)


def ellipsoid_volume(shape, seed):
    """Ellipsoids 5 planes high and 8 pixels across at every offset in Z, Y and X, none touching."""
    rng = np.random.default_rng(seed)
    objects = np.zeros(shape, bool)
    zz, yy, xx = np.indices(shape)
    for k, z in enumerate(range(2, shape[0], 4)):
        for y in range(5 + 10 * (k % 2), shape[1] - 4, 20):
            for x in range(5 + int(rng.integers(0, 10)), shape[2] - 4, 20):
                objects |= ((zz - z) / 2.5) ** 2 + ((yy - y) / 4) ** 2 + ((xx - x) / 4) ** 2 < 1
    return ndimage.gaussian_filter(objects.astype(np.float32), 1.0)[None]


@pytest.mark.parametrize("classes", [1, 3])
def test_3d_labels_made_in_cells_along_y_and_x_equal_whole_volume_labels(monkeypatch, classes):
    """A block too large for one to_labels call is labelled in cells along Y and X (StarDist's BlockND):
    36 cells a block here, objects across every cell border, the whole volume's labels up to numbers."""
    import unetseg.inference.labeling as labeling

    foreground = ellipsoid_volume((24, 96, 96), seed=4)
    probs = foreground if classes == 1 else boundary_probabilities(foreground[0])
    shape = probs.shape[1:]
    monkeypatch.setattr(labeling, "BLOCK_PIXELS", 1000)
    monkeypatch.setattr(labeling, "CELL_PIXELS", 18 * 40 * 40)  # (6 + 2 x 6 planes) x 40 x 40: cores of 16
    assert len(labeling.block_cells((18, 96, 96), 12)) == 36
    whole = to_labels(probs, 0.5, spacing=(2.0, 1.0, 1.0))
    out = np.zeros(shape, np.uint32)

    def paint(first, labels):
        region = out[first : first + len(labels)]
        region[labels > 0] = labels[labels > 0]

    labeler = BlockLabeler(shape, paint, 0.5, block_rows=6, context=6, spacing=(2.0, 1.0, 1.0), side_context=12)
    for start in range(0, 24, 5):
        labeler.add(start, min(start + 5, 24), probs[:, start : start + 5])
    assert labeler.finish() == out.max() + 1
    assert labeler.cut == 0
    assert whole.max() > 60
    assert same_objects(whole, out)


def boundary_probabilities(foreground: np.ndarray) -> np.ndarray:
    """(3, ...) background / interior / edge probabilities of a blurred foreground."""
    inside = foreground > 0.5
    interior = ndimage.binary_erosion(inside, iterations=1)
    probs = np.stack([~inside, interior, inside & ~interior]).astype(np.float32)
    probs = ndimage.gaussian_filter(probs, (0, 0.5, 0.5, 0.5))
    return probs / probs.sum(axis=0)


def test_wide_image_labels_made_in_cells_along_x_equal_whole_image_labels(monkeypatch):
    import unetseg.inference.labeling as labeling

    rng = np.random.default_rng(5)
    image = np.zeros((60, 400), np.float32)
    for y in range(4, 52, 12):  # squares of 6 at every offset, 3 or more apart
        for x in range(4, 390, 12):
            y0, x0 = y + rng.integers(0, 3), x + rng.integers(0, 3)
            image[y0 : y0 + 6, x0 : x0 + 6] = 1
    probs = ndimage.gaussian_filter(image, 1.0)[None]
    monkeypatch.setattr(labeling, "BLOCK_PIXELS", 1000)
    monkeypatch.setattr(labeling, "CELL_PIXELS", 30 * 50)  # cells 50 wide: cores of 26, 16 of them
    out = np.zeros(image.shape, np.uint32)

    def paint(first, labels):
        region = out[first : first + len(labels)]
        region[labels > 0] = labels[labels > 0]

    labeler = BlockLabeler(image.shape, paint, 0.5, block_rows=10, context=10, side_context=12)
    for start in range(0, 60, 7):
        labeler.add(start, min(start + 7, 60), probs[:, start : start + 7])
    labeler.finish()
    whole = to_labels(probs, 0.5)
    assert whole.max() > 30 and labeler.cut == 0
    assert same_objects(whole, out)


def test_batchnorm_is_folded_into_conv3d_with_the_same_output():
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Conv3d(4, 1, 1))
    network[1].running_mean.uniform_(-1, 1)
    network[1].running_var.uniform_(0.5, 2)
    network.eval()
    x = torch.randn(1, 2, 6, 10, 10)
    before = network(x)
    assert fold_batchnorm(network) == 1
    assert isinstance(network[1], nn.Identity)
    torch.testing.assert_close(network(x), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dims", [2, 3])
def test_a_prediction_is_resolved_once_for_the_models_dims(dims):
    """`Prediction` works out the model's dims, its engine options (a 3-D model's tiles are 3-D) and the
    post-processing (stored values under the user's) once, and refuses what the model cannot make."""
    from unetseg.inference.pipeline import Prediction

    spec = InputSpec(1, Normalization(0.0, 100.0), "foreground", 1, postprocess={"threshold": 0.3, "min_size": 9})
    prediction = Prediction(Pointwise(dims), spec, PredictSettings("labels", min_size=4, **SETTINGS))
    assert prediction.dims == dims
    tiles = {2: (32, 8), 3: ((4, 16, 16), (2, 4, 4))}[dims]
    assert (prediction.engine_options["tile_size"], prediction.engine_options["overlap"]) == tiles
    assert prediction.label_options["threshold"] == 0.3 and prediction.label_options["min_size"] == 4
    classes = InputSpec(1, Normalization(0.0, 100.0), "classes", 3)
    with pytest.raises(ValueError, match="output 'labels' needs a model trained with targets"):
        Prediction(Pointwise(dims), classes, PredictSettings("labels"))


def test_a_folder_is_predicted_with_one_prediction(tmp_path, monkeypatch):
    """`predict_files` resolves the model's dims and options once for the folder, not once per file."""
    import unetseg.inference.pipeline as pipeline
    from unetseg.inference.batch import predict_files

    calls = []
    monkeypatch.setattr(pipeline, "spatial_dims", lambda model: calls.append(model) or model.spatial_dims)
    pairs = []
    for k in range(3):
        (tmp_path / str(k)).mkdir()
        pairs.append((write_input(tmp_path / str(k) / "stack.tif", spheres(seed=k)), tmp_path / f"out{k}.tif"))
    model, spec = Pointwise(2), InputSpec(1, Normalization(0.0, 100.0), "foreground", 1)
    summary = predict_files(model, spec, pairs, PredictSettings("mask", **SETTINGS), progress=False)
    assert len(summary.done) == 3 and not summary.failed
    assert len(calls) == 1
    assert all(tifffile.imread(target).shape == (10, 40, 36) for _, target in pairs)


@pytest.mark.parametrize("name", CONTAINERS)
def test_the_onnxruntime_backend_gives_the_torch_outputs_in_every_container(tmp_path, name):
    """The backend axis of the matrix: a 2-D model run by ONNX Runtime (`--backend onnxruntime`) writes what
    the same model run by torch writes, in every container; 3-D models are refused (tests/test_backends.py)."""
    pytest.importorskip("onnxruntime")
    from unetseg.export.onnx import OnnxPredictor, export_net

    model, spec = Pointwise(2), InputSpec(1, Normalization(0.0, 100.0), "foreground", 1)
    runtime = OnnxPredictor(export_net(model, tmp_path / "pointwise.onnx", input_spec=spec))
    source = write_input(tmp_path / name, spheres())
    suffix = ".nii.gz" if name.endswith(".nii.gz") else ".png" if name.endswith(".png") else ".tif"
    kinds = ("mask", "labels") if name == "image.png" else ("mask", "prob", "labels")
    settings = PredictSettings(kinds, **SETTINGS)
    for backend, network in (("torch", model), ("onnxruntime", runtime)):
        predict_file(network, spec, source, tmp_path / backend / f"{name.split('.')[0]}{suffix}", settings)
    for kind in kinds:
        paths = [tmp_path / backend / f"{name.split('.')[0]}_{kind}{suffix}" for backend in ("torch", "onnxruntime")]
        torch_output, runtime_output = (read_output(path, kind) for path in paths)
        assert torch_output.max() > 0 and runtime_output.shape == torch_output.shape
        if kind == "prob":
            np.testing.assert_allclose(runtime_output, torch_output, atol=1e-5)
        else:
            np.testing.assert_array_equal(runtime_output, torch_output)
