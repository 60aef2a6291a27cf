"""unetseg.inference.pipeline: reading inputs as training did, stacks, memory maps, pixel sizes, weights."""

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage import io as skio

import unetseg.weights
from unetseg.inference import TilingConfig, predict_tiled
from unetseg.inference.batch import plan_outputs
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_file, predict_image
from unetseg.inference.postprocess import to_mask
from unetseg.io import ImageReadError, Normalization, to_channels
from unetseg.io.normalize import ChannelBands, plane_range
from unetseg.io.source import Calibration
from unetseg.io.tiff import open_image, read_calibration
from unetseg.models import UNet
from unetseg.models.checkpoint import CheckpointError
from unetseg.spec import InputSpec
from unetseg.synthetic import nuclei_image
from unetseg.training.data import load_sample
from unetseg.weights import available_models, model_path

REPO = Path(__file__).resolve().parents[1]
TILING = dict(tile_size=64, overlap=16, batch_size=4)


@pytest.fixture(scope="session")
def predictor(checkpoint):
    return load_predictor(checkpoint)


@pytest.fixture(scope="session")
def boundary_predictor():
    """An untrained RGB, 3-class (background/interior/edge) tiny U-Net and its input spec."""
    torch.manual_seed(0)
    spec = InputSpec(3, Normalization(low=2.0, high=99.0, clip=False), "boundary", 3)
    return UNet(in_channels=3, classes=3, depth=2, width=4).eval(), spec


def nuclei(shape=(48, 60), seed=0, scale=4095, dtype=np.uint16) -> np.ndarray:
    """A synthetic nuclei image scaled to `scale` in `dtype`."""
    image, _ = nuclei_image(np.random.default_rng(seed), shape)
    return (image * scale).round().astype(dtype)


# --- Normalisation repeats training's ---------------------------------------------------------------


def write_training_pair(root: Path, kind: str) -> tuple[Path, Path]:
    """An image of `kind` and a mask, as training would read them."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    grey = nuclei(seed=3, scale=1.0, dtype=np.float32)
    if kind == "png8":
        image_path = root / "images" / "x.png"
        skio.imsave(image_path, (grey * 255).round().astype(np.uint8), check_contrast=False)
    elif kind == "tif16":
        image_path = root / "images" / "x.tif"
        tifffile.imwrite(image_path, (grey * 4095).round().astype(np.uint16))
    else:  # "rgb8": colours that differ per channel, so grey conversion matters
        image_path = root / "images" / "x.png"
        rgb = np.stack([grey, grey**2, np.sqrt(grey)], axis=-1)
        skio.imsave(image_path, (rgb * 255).round().astype(np.uint8), check_contrast=False)
    mask_path = root / "masks" / "x.tif"
    tifffile.imwrite(mask_path, (grey > 0.5).astype(np.uint16))
    return image_path, mask_path


@pytest.mark.parametrize("kind", ["png8", "tif16", "rgb8"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_normalisation_and_probabilities_equal_training(tmp_path, kind, in_channels):
    image_path, mask_path = write_training_pair(tmp_path, kind)
    normalization = Normalization(low=1.0, high=99.8, clip=True)
    sample = load_sample(image_path, mask_path, in_channels, normalization)
    image = open_image(image_path)
    plane = image.planes[0]
    assert plane_range(plane, in_channels, normalization, chunk_pixels=1000) == sample.value_range
    bands = ChannelBands(plane, in_channels, image_path)
    assert bands.shape == sample.image.shape
    np.testing.assert_array_equal(bands[:, 10:30], sample.image[:, 10:30])

    torch.manual_seed(1)
    model = UNet(in_channels=in_channels, classes=1, depth=2, width=4).eval()
    spec = InputSpec(in_channels, normalization, "foreground", 1)
    probs = predict_image(
        model, spec, read_as_stored(image_path), PredictSettings(output="prob", tiling=TilingConfig(**TILING))
    )
    expected = predict_tiled(model, normalization.apply(sample.image, sample.value_range), **TILING)
    np.testing.assert_array_equal(probs, expected[0])


def read_as_stored(path: Path) -> np.ndarray:
    return tifffile.imread(path) if path.suffix == ".tif" else skio.imread(path)


@pytest.mark.parametrize(
    "dtype, in_channels, shape",
    [
        (np.uint8, 1, (50, 61)),
        (np.uint16, 1, (50, 61)),
        (np.uint16, 1, (50, 61, 3)),
        (np.uint8, 3, (50, 61)),
        (np.float32, 1, (50, 61)),
        (np.float32, 3, (50, 61, 4)),
        (np.int16, 1, (50, 61)),
        (np.float32, 1, (4100, 4000)),  # above io.normalize's 16M values: the same strided subsample
    ],
)
def test_plane_range_band_by_band_equals_the_whole_image_range(dtype, in_channels, shape):
    rng = np.random.default_rng(0)
    if np.dtype(dtype).kind == "f":
        plane = rng.gamma(2.0, 100.0, size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        plane = rng.integers(max(info.min, -3000), min(info.max, 3000), size=shape, endpoint=True).astype(dtype)
    normalization = Normalization(low=3.0, high=99.5)
    expected = normalization.range(to_channels(plane, in_channels))
    assert plane_range(plane, in_channels, normalization, chunk_pixels=997 * 7) == expected


# --- Stacks and memory maps --------------------------------------------------------------------------


@pytest.mark.parametrize("imagej", [True, False])
def test_stack_is_predicted_plane_by_plane_with_its_own_ranges(tmp_path, predictor, imagej):
    model, spec = predictor
    stack = np.stack([nuclei(seed=0), nuclei(seed=1) // 4, nuclei(seed=2) + 3000])  # (3, 48, 60), uneven ranges
    source = tmp_path / "stack.tif"
    if imagej:
        tifffile.imwrite(source, stack, imagej=True, metadata={"axes": "ZYX"})
    else:
        tifffile.imwrite(source, stack, photometric="minisblack")  # no metadata: a long last axis makes it a stack
    image = open_image(source)
    assert image.stack and image.planes.shape == (3, 48, 60)
    for output in ("mask", "prob"):
        settings = PredictSettings(output=output, threshold=0.3, tiling=TilingConfig(**TILING))
        predict_file(model, spec, source, tmp_path / f"{output}.tif", settings)
        written = tifffile.imread(tmp_path / f"{output}.tif")
        expected = np.stack([predict_image(model, spec, plane, settings) for plane in stack])
        assert written.shape == (3, 48, 60) and written.dtype == expected.dtype
        np.testing.assert_array_equal(written, expected)
        np.testing.assert_array_equal(predict_image(model, spec, stack, settings), expected)
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        assert tif.series[0].axes == "ZYX"


def test_memory_mapped_input_and_output_equal_the_in_memory_path(tmp_path, predictor):
    model, spec = predictor
    image = nuclei(shape=(90, 110), seed=4)
    plain, compressed = tmp_path / "plain.tif", tmp_path / "zlib.tif"
    tifffile.imwrite(plain, image)
    tifffile.imwrite(compressed, image, compression="zlib")
    mapped, read = open_image(plain), open_image(compressed)
    assert isinstance(mapped.planes, np.memmap)
    assert not isinstance(read.planes, np.memmap)
    for output in ("mask", "prob", "labels"):
        settings = PredictSettings(output=output, tiling=TilingConfig(**TILING))
        expected = predict_image(model, spec, image, settings)
        for source in (plain, compressed):
            target = tmp_path / "out" / f"{source.stem}_{output}.tif"
            assert predict_file(model, spec, source, target, settings) == 90 * 110
            written = tifffile.imread(target)
            assert written.dtype == expected.dtype
            np.testing.assert_array_equal(written, expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".")) == []  # no temporaries


def test_big_endian_memmap_reads_as_native(tmp_path, predictor):
    model, spec = predictor
    image = nuclei(seed=5)
    source = tmp_path / "big_endian.tif"
    tifffile.imwrite(source, image, byteorder=">")
    assert isinstance(open_image(source).planes, np.memmap)
    settings = PredictSettings(output="prob", tiling=TilingConfig(**TILING))
    predict_file(model, spec, source, tmp_path / "out.tif", settings)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out.tif"), predict_image(model, spec, image, settings))


@pytest.mark.parametrize(
    "write, shape, stack",
    [
        (lambda p, a: tifffile.imwrite(p, a[..., :3].copy()), (1, 40, 50, 3), False),  # RGB, YXS
        (
            lambda p, a: tifffile.imwrite(
                p, np.moveaxis(a[..., :3], -1, 0).copy(), photometric="rgb", planarconfig="separate"
            ),
            (1, 40, 50, 3),
            False,
        ),  # planar RGB, SYX
        (
            lambda p, a: tifffile.imwrite(p, a[..., 0][None].repeat(5, 0), imagej=True, metadata={"axes": "ZYX"}),
            (5, 40, 50),
            True,
        ),
        (lambda p, a: tifffile.imwrite(p, a[..., :3][None].repeat(2, 0), photometric="rgb"), (2, 40, 50, 3), True),
    ],
)
def test_open_image_arranges_planes_channels_last(tmp_path, write, shape, stack):
    rgba = np.random.default_rng(0).integers(0, 255, (40, 50, 4), dtype=np.uint8)
    write(tmp_path / "x.tif", rgba)
    image = open_image(tmp_path / "x.tif")
    assert image.planes.shape == shape and image.stack is stack


@pytest.mark.parametrize(
    "write",
    [
        lambda p: tifffile.imwrite(p, np.zeros((2, 40, 50), np.uint16), imagej=True, metadata={"axes": "CYX"}),
        lambda p: tifffile.imwrite(p, np.zeros((40, 50, 2), np.uint16)),
        lambda p: tifffile.imwrite(
            p, np.zeros((40, 50, 2), np.uint16), photometric="minisblack", planarconfig="contig"
        ),
    ],
)
def test_two_channel_tiff_is_refused_naming_the_file(tmp_path, predictor, write):
    model, spec = predictor
    source = tmp_path / "two.tif"
    write(source)
    with pytest.raises(ImageReadError, match=f"{source}: .*2 channels|{source}: cannot use"):
        predict_file(model, spec, source, tmp_path / "out" / "two.tif", PredictSettings(tiling=TilingConfig(**TILING)))
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_truncated_tiff_is_refused_naming_the_file(tmp_path):
    source = tmp_path / "t.tif"
    tifffile.imwrite(source, nuclei())
    source.write_bytes(source.read_bytes()[:4000])
    with pytest.raises(ImageReadError, match=f"{source}: file is truncated"):
        open_image(source)


# --- Pixel size ----------------------------------------------------------------------------------------


def tags(path: Path) -> tuple:
    with tifffile.TiffFile(path) as tif:
        page = tif.pages.first
        return (
            page.tags["XResolution"].value,
            page.tags["YResolution"].value,
            page.tags["ResolutionUnit"].value,
            tif.imagej_metadata or {},
        )


@pytest.mark.parametrize("output", ["mask", "prob", "labels"])
@pytest.mark.parametrize("kind", ["imagej", "centimetre", "imagej_stack", "ome"])
def test_pixel_size_is_copied_to_the_output(tmp_path, predictor, output, kind):
    model, spec = predictor
    source = tmp_path / "in.tif"
    image = nuclei(shape=(40, 50))
    if kind == "imagej":
        tifffile.imwrite(source, image, imagej=True, resolution=((4, 1), (5, 1)), metadata={"unit": "um"})
        expected = ((4, 1), (5, 1), 1, {"unit": "um"})
    elif kind == "centimetre":
        tifffile.imwrite(source, image, resolution=((3000, 1), (3000, 1)), resolutionunit="CENTIMETER")
        expected = ((3000, 1), (3000, 1), 3, {})
    elif kind == "imagej_stack":
        tifffile.imwrite(
            source,
            np.stack([image, image]),
            imagej=True,
            resolution=((2, 1), (2, 1)),
            metadata={"unit": "micron", "spacing": 0.5, "axes": "ZYX"},
        )
        expected = ((2, 1), (2, 1), 1, {"unit": "micron", "spacing": 0.5})
    else:
        tifffile.imwrite(
            source,
            np.stack([image, image]),
            ome=True,
            photometric="minisblack",
            metadata={
                "axes": "ZYX",
                "PhysicalSizeX": 0.25,
                "PhysicalSizeY": 0.5,
                "PhysicalSizeZ": 1.5,
                "PhysicalSizeXUnit": "µm",
                "PhysicalSizeYUnit": "µm",
            },
        )
        expected = ((4, 1), (2, 1), 1, {"unit": "micron", "spacing": 1.5})
    target = tmp_path / "out.tif"
    predict_file(model, spec, source, target, PredictSettings(output=output, tiling=TilingConfig(**TILING)))
    x, y, unit, imagej = tags(target)
    assert (x, y, unit) == expected[:3]
    assert {key: imagej.get(key) for key in expected[3]} == expected[3]
    if "stack" in kind or kind == "ome":
        assert imagej["slices"] == 2


def test_uint32_output_keeps_the_pixel_size_as_ome(tmp_path):
    calibration = Calibration(resolution=(4.0, 2.0), resolution_unit=1, unit="micron", spacing=1.5)
    labels = np.arange(2 * 6 * 7, dtype=np.uint32).reshape(2, 6, 7) + 70_000
    tifffile.imwrite(tmp_path / "labels.tif", labels, **calibration.tiff_kwargs("ZYX", labels.dtype))
    with tifffile.TiffFile(tmp_path / "labels.tif") as tif:
        assert tif.is_ome and tif.series[0].axes == "ZYX"
        assert read_calibration(tif) == calibration
        np.testing.assert_array_equal(tif.asarray(), labels)


# --- Outputs of boundary models ----------------------------------------------------------------------


def test_boundary_mask_is_interior_plus_edge_not_the_argmax():
    probs = np.array([[[0.4, 0.9]], [[0.3, 0.05]], [[0.3, 0.05]]], dtype=np.float32)  # (3, 1, 2)
    np.testing.assert_array_equal(to_mask(probs, 0.5, "boundary"), [[255, 0]])
    np.testing.assert_array_equal(to_mask(probs, 0.5, "classes"), [[0, 0]])


def test_boundary_model_outputs(tmp_path, boundary_predictor):
    model, spec = boundary_predictor
    source = tmp_path / "rgb.png"
    skio.imsave(source, np.random.default_rng(0).integers(0, 255, (70, 90, 4), dtype=np.uint8), check_contrast=False)
    shapes = {"mask": ((70, 90), np.uint8), "prob": ((3, 70, 90), np.float32), "labels": ((70, 90), np.uint16)}
    for output, (shape, dtype) in shapes.items():
        predict_file(
            model,
            spec,
            source,
            tmp_path / f"{output}.tif",
            PredictSettings(output=output, tiling=TilingConfig(**TILING)),
        )
        written = tifffile.imread(tmp_path / f"{output}.tif")
        assert written.shape == shape and written.dtype == dtype
    probs = tifffile.imread(tmp_path / "prob.tif")
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "mask.tif"), np.where(probs[0] < 0.5, 255, 0))


def test_settings_are_checked():
    with pytest.raises(ValueError, match="output must be one of mask, prob, labels"):
        PredictSettings(output="masks")
    with pytest.raises(ValueError, match="threshold"):
        PredictSettings(threshold=1.5)
    with pytest.raises(ValueError, match="overlap"):
        TilingConfig(tile_size=64, overlap=64)
    spec = InputSpec(1, Normalization(), "classes", 4)
    with pytest.raises(ValueError, match="'labels' needs a model trained with targets 'foreground' or 'boundary'"):
        PredictSettings(output="labels").check(spec)


# --- Finding files -------------------------------------------------------------------------------------


def test_plan_outputs_mirrors_folders_and_skips_hidden_and_output(tmp_path):
    root = tmp_path / "in"
    for name in ("a.png", "sub/b.tif", "sub/deep/c.jpg", ".hidden/d.png", "sub/.e.png", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "out" / "a.tif").parent.mkdir()
    (root / "out" / "a.tif").write_bytes(b"x")  # an earlier run's output inside INPUT
    pairs = plan_outputs(root, root / "out")
    assert [(s.relative_to(root).as_posix(), t.relative_to(root).as_posix()) for s, t in pairs] == [
        ("a.png", "out/a.tif"),
        ("sub/b.tif", "out/sub/b.tif"),
        ("sub/deep/c.jpg", "out/sub/deep/c.tif"),
    ]
    assert [s.relative_to(root).as_posix() for s, _ in plan_outputs(root, tmp_path / "o", glob="*.tif")] == [
        "out/a.tif",
        "sub/b.tif",
    ]  # OUTPUT elsewhere: root/out is just a folder of inputs
    assert [s.name for s, _ in plan_outputs(root, tmp_path / "o", glob="sub/*.tif")] == ["b.tif"]
    assert plan_outputs(root / "a.png", tmp_path / "one.tiff") == [(root / "a.png", tmp_path / "one.tiff")]
    assert plan_outputs(root / "a.png", tmp_path / "o") == [(root / "a.png", tmp_path / "o" / "a.tif")]


def test_plan_outputs_refuses_clashes_and_empty_input(tmp_path):
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        plan_outputs(tmp_path / "in", tmp_path / "out")
    with pytest.raises(ValueError, match="no such file or folder"):
        plan_outputs(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "in" / "a.png").write_bytes(b"x")
    (tmp_path / "in" / "a.tif").write_bytes(b"x")
    with pytest.raises(ValueError, match="both be written to"):
        plan_outputs(tmp_path / "in", tmp_path / "out")
    with pytest.raises(ValueError, match="is the INPUT folder"):
        plan_outputs(tmp_path / "in", tmp_path / "in")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt: not an image file"):
        plan_outputs(tmp_path / "notes.txt", tmp_path / "out")


# --- Checkpoints and shipped weights -------------------------------------------------------------------


class Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_pickle_is_refused_and_never_runs(tmp_path, checkpoint):
    marker = tmp_path / "payload_ran"
    crafted = tmp_path / "crafted.ckpt"
    contents = torch.load(checkpoint, map_location="cpu", weights_only=True)
    contents["hyper_parameters"]["extra"] = Payload(marker)
    torch.save(contents, crafted)
    with pytest.raises(CheckpointError, match=f"{crafted}: refused: .*open"):
        load_predictor(crafted)
    assert not marker.exists()


def test_checkpoint_naming_a_foreign_class_is_refused(tmp_path, checkpoint):
    contents = torch.load(checkpoint, map_location="cpu", weights_only=True)
    contents["hyper_parameters"]["net"]["class_path"] = "antigravity.Fly"
    torch.save(contents, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="foreign.ckpt: refused: its network class 'antigravity.Fly'"):
        load_predictor(tmp_path / "foreign.ckpt")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("text.ckpt", b"hello", "not a readable PyTorch checkpoint"),
        ("empty.ckpt", b"", "not a readable PyTorch checkpoint"),
        ("model.onnx", b"onnx", "cannot load the ONNX model"),
        ("model.h5", b"x", "unknown model file type '.h5'"),
    ],
)
def test_unusable_checkpoints_are_named(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{name}: {message}"):
        load_predictor(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_predictor(tmp_path / "missing.ckpt")


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_torchscript_archive_is_refused(tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Conv2d(1, 1, 3)), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match="scripted.pt: a TorchScript archive; TorchScript is a program"):
        load_predictor(tmp_path / "scripted.pt")


def test_onnx_export_predicts_like_its_checkpoint(tmp_path, predictor):
    pytest.importorskip("onnxruntime")
    from unetseg.export import export_net

    model, spec = predictor
    export_net(model, tmp_path / "tiny.onnx", input_spec=spec)
    exported, exported_spec = load_predictor(tmp_path / "tiny.onnx")
    assert exported_spec == spec
    image = nuclei(seed=9)
    settings = PredictSettings(output="prob", tiling=TilingConfig(**TILING))
    np.testing.assert_allclose(
        predict_image(exported, exported_spec, image, settings), predict_image(model, spec, image, settings), atol=1e-5
    )


def test_load_predictor_returns_the_net_and_its_input_spec(predictor):
    model, spec = predictor
    assert isinstance(model, UNet) and not model.training
    stored = spec.to_dict()
    intensity = stored.pop("intensity")  # what the 3 training images looked like (unetseg.io.domain)
    assert stored == {
        "in_channels": 1,
        "normalization": {"low": 1.0, "high": 99.8, "clip": True},
        "targets": "foreground",
        "classes": 1,
    }
    assert intensity["images"] == 3 and 0.0 <= intensity["median"][0] <= intensity["median"][1] <= 1.0


def test_shipped_model_names(tmp_path, monkeypatch):
    monkeypatch.setattr(unetseg.weights, "weights_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="model 'nuclei' is not installed .*available models: none installed"):
        model_path("nuclei")
    (tmp_path / "nuclei.ckpt").write_bytes(b"x")
    assert available_models() == ["nuclei"] and model_path("nuclei") == tmp_path / "nuclei.ckpt"
    with pytest.raises(ValueError, match="unknown model 'cells'; available models: nuclei"):
        model_path("cells")


def test_output_files_get_ordinary_permissions(tmp_path, predictor):
    model, spec = predictor
    skio.imsave(tmp_path / "a.png", nuclei(scale=255, dtype=np.uint8), check_contrast=False)
    umask = os.umask(0o022)
    try:
        for output in ("mask", "labels"):
            predict_file(
                model,
                spec,
                tmp_path / "a.png",
                tmp_path / f"{output}.tif",
                PredictSettings(output=output, tiling=TilingConfig(**TILING)),
            )
            assert (tmp_path / f"{output}.tif").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


@pytest.mark.parametrize("classes, targets", [(1, "foreground"), (3, "boundary"), (4, "distance"), (4, "classes")])
def test_device_mask_equals_the_host_mask(classes, targets):
    from unetseg.inference.postprocess import to_mask

    probs = torch.softmax(torch.randn(classes, 9, 7, generator=torch.Generator().manual_seed(classes)), dim=0)
    if classes == 1:
        probs = torch.rand(1, 9, 7, generator=torch.Generator().manual_seed(0))
    mask = to_mask(probs, 0.4, targets)
    assert mask.dtype == torch.uint8
    np.testing.assert_array_equal(mask.numpy(), to_mask(probs.numpy(), 0.4, targets))
