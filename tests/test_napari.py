"""The napari plugin, driven as a user drives it: open the widget from the plugin's manifest, choose the model
and the layer, press Run (or Fine-tune), wait for the worker, and check the layers it made against
unetseg-predict's files for the same image and settings.

Headless: Qt's offscreen platform, with OpenGL (which napari's canvas needs) from a virtual X server (Xvfb)
started here when there is no display.
"""

from __future__ import annotations

import ast
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning
import numpy as np
import pytest
import tifffile
import torch

pytest.importorskip("napari", reason="the napari plugin's tests need pip install 'unetseg[napari]'")

from unetseg.cli.predict import main as predict_main  # noqa: E402
from unetseg.evaluation.metrics import foreground_dice  # noqa: E402
from unetseg.inference.loading import load_predictor  # noqa: E402
from unetseg.inference.pipeline import PredictSettings, predict_image  # noqa: E402
from unetseg.inference.tiling import TilingConfig  # noqa: E402
from unetseg.io.normalize import Normalization  # noqa: E402
from unetseg.io.source import spacing_calibration  # noqa: E402
from unetseg.models import UNet  # noqa: E402
from unetseg.napari import avoid_llvm_clash  # noqa: E402
from unetseg.synthetic import nuclei_image, nuclei_volume  # noqa: E402
from unetseg.training.module import SegmentationModule  # noqa: E402
from unetseg.weights import model_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WAIT_MS = 90_000
pytestmark = pytest.mark.filterwarnings("ignore:System theme detection requires a Qt6 backend:UserWarning")


def die_with_parent() -> None:
    """In the Xvfb child: the kernel sends it SIGTERM when this process ends (prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


@pytest.fixture(scope="session", autouse=True)
def headless_display():
    """QT_QPA_PLATFORM=offscreen, and an Xvfb display for OpenGL where there is none (set before any QApplication)."""
    saved = {key: os.environ.get(key) for key in ("QT_QPA_PLATFORM", "DISPLAY")}
    os.environ["QT_QPA_PLATFORM"] = "offscreen"
    server = None
    if not os.environ.get("DISPLAY"):
        xvfb = shutil.which("Xvfb")
        if xvfb is None:
            message = "napari's canvas needs OpenGL: install Xvfb (apt-get install xvfb) or run with a display"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
        read, write = os.pipe()
        server = subprocess.Popen(
            [xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
            pass_fds=(write,),
            preexec_fn=die_with_parent,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(write)
        with os.fdopen(read) as display:
            number = display.readline().strip()  # Xvfb writes its display number when it is ready
        if not number:
            server.kill()
            pytest.fail("Xvfb did not start")
        os.environ["DISPLAY"] = f":{number}"
    yield
    from qtpy.QtWidgets import QApplication

    if server is not None and QApplication.instance() is None:
        server.terminate()
        server.wait(timeout=10)
    # Else Qt holds the display to the end of the process, and Xvfb ends with the process (die_with_parent):
    # killing it first would end the process through Xlib's I/O error handler.
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def open_widget(viewer, name: str):
    """A widget as a user opens it: Plugins > unetseg > `name`, through the manifest."""
    _, widget = viewer.window.add_plugin_dock_widget("unetseg", name)
    return widget


def wait(qtbot, widget) -> None:
    """Until the widget's workers (model loading, prediction, fine-tuning, saving) are done."""
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)


def choose_file(qtbot, widget, path: Path) -> None:
    """Pick a model file in the Segment widget and wait until it is loaded."""
    wait(qtbot, widget)  # the default model's loading, started when the widget opened
    widget.model.value = "checkpoint or package file..."
    widget.model_file.value = path
    wait(qtbot, widget)
    assert widget.model_info.value.startswith(path.name), widget.status.value


def press(qtbot, widget, button) -> None:
    button.native.click()
    wait(qtbot, widget)


def uint16(image: np.ndarray) -> np.ndarray:
    return (image * 4095).round().astype(np.uint16)


def cli_outputs(image_path: Path, out: Path, *options: str) -> dict[str, np.ndarray]:
    """unetseg-predict's labels and probabilities of one file."""
    assert predict_main([str(image_path), str(out), "--output", "labels", "prob", "--device", "cpu", *options]) == 0
    return {kind: tifffile.imread(out.with_name(f"{out.stem}_{kind}.tif")) for kind in ("labels", "prob")}


# --- packaging -------------------------------------------------------------------------------------------


def test_manifest_validates_and_napari_lists_the_plugin():
    result = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", "unetseg"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout
    from npe2 import PluginManager

    manager = PluginManager.instance()
    manager.discover()
    manifest = manager.get_manifest("unetseg")
    assert {widget.display_name for widget in manifest.contributions.widgets} == {"Segment", "Fine-tune"}
    assert {sample.key for sample in manifest.contributions.sample_data} == {"nuclei", "nuclei_volume"}
    assert {tuple(writer.filename_extensions) for writer in manifest.contributions.writers} == {(".zip",), (".csv",)}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_nothing_outside_the_plugin_imports_napari_or_qt():
    gui = ("napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy", "unetseg.napari")
    offenders = {
        str(path.relative_to(REPO)): sorted(name for name in imported_modules(path) if name.startswith(gui))
        for path in (REPO / "unetseg").rglob("*.py")
        if "napari" not in path.relative_to(REPO / "unetseg").parts
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_llvm_guard_keeps_triton_out_only_where_a_driver_loaded_llvm(tmp_path, monkeypatch):
    maps = tmp_path / "maps"
    maps.write_text("7f00 r-xp /usr/lib/x86_64-linux-gnu/libLLVM-15.so.1\n")
    monkeypatch.delitem(sys.modules, "triton", raising=False)
    assert avoid_llvm_clash(maps) is True
    assert sys.modules["triton"] is None
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    monkeypatch.delitem(sys.modules, "triton")
    maps.write_text("7f00 r-xp /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert avoid_llvm_clash(maps) is False
    assert "triton" not in sys.modules


# --- Segment -------------------------------------------------------------------------------------------


def test_segment_widget_labels_equal_unetseg_predict(make_napari_viewer, qtbot, tmp_path):
    """The shipped nuclei model, its stored post-processing (seed threshold, min size, TTA) as the defaults; the
    layers land with the image's scale and translate and hold what unetseg-predict writes."""
    image, _ = nuclei_image(np.random.default_rng(3), (128, 128))
    tifffile.imwrite(tmp_path / "image.tif", uint16(image))
    viewer = make_napari_viewer()
    layer = viewer.add_image(uint16(image), name="cells", scale=(0.5, 0.25), translate=(10.0, -4.0))
    widget = open_widget(viewer, "Segment")
    wait(qtbot, widget)
    assert widget.model.value == "nuclei"
    _, spec = load_predictor(model_path("nuclei"))
    stored = spec.postprocess
    assert (widget.threshold.value, widget.seed_threshold.value, widget.min_size.value, widget.tta.value) == (
        stored["threshold"],
        stored["seed_threshold"],
        stored["min_size"],
        spec.tta,
    )
    widget.image.value = layer
    widget.prob_output.value = True
    press(qtbot, widget, widget.run_button)
    assert widget.status.value.startswith("done"), widget.status.value

    expected = cli_outputs(tmp_path / "image.tif", tmp_path / "cli.tif", "--model", "nuclei")
    labels, prob = widget.outputs["labels"], widget.outputs["prob"]
    assert labels.name == "cells labels" and prob.name == "cells probability"
    assert labels.data.max() >= 10  # nuclei found, not an empty image compared with an empty image
    np.testing.assert_array_equal(labels.data, expected["labels"])
    foreground = expected["prob"][1] + expected["prob"][2]  # boundary model: interior + edge
    np.testing.assert_allclose(prob.data, foreground, atol=1e-6)
    for output in (labels, prob):
        assert tuple(output.scale) == (0.5, 0.25) and tuple(output.translate) == (10.0, -4.0)

    # Other settings, run again: the same layers are updated, as unetseg-predict's options change its files.
    widget.threshold.value, widget.seed_threshold.value, widget.min_size.value = 0.4, 0.0, 50
    widget.tta.value, widget.prob_output.value = False, False
    press(qtbot, widget, widget.run_button)
    expected = cli_outputs(
        tmp_path / "image.tif",
        tmp_path / "cli2.tif",
        "--model",
        "nuclei",
        "--threshold",
        "0.4",
        "--min-size",
        "50",
        "--no-tta",
    )
    assert [output.name for output in viewer.layers if output.name.startswith("cells ")] == [
        "cells labels",
        "cells probability",
    ]
    assert widget.outputs["labels"] is labels
    np.testing.assert_array_equal(labels.data, expected["labels"])


def volume_checkpoint(path: Path) -> Path:
    """A tiny 3-D U-Net (depth 2, width 4) whose head is scaled so that its probabilities follow the image
    (bright voxels over 0.5): untrained, but its labels have objects to compare."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, classes=1, depth=2, width=4, spatial_dims=3).eval()
    volume, _ = nuclei_volume(np.random.default_rng(0), (12, 48, 48), (2.0, 0.5, 0.5))
    with torch.no_grad():
        logits = net(torch.from_numpy(volume)[None, None])
        middle = float(logits.median())
        net.head.weight.mul_(-300.0)
        net.head.bias.copy_(net.head.bias - middle).mul_(-300.0)
    spec = {"in_channels": 1, "normalization": Normalization().to_dict(), "targets": "foreground", "classes": 1}
    module = SegmentationModule(net, input_spec=spec)
    state = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    torch.save({**state, "pytorch-lightning_version": lightning.__version__}, path)
    return path


def test_volume_model_takes_the_layer_scale_as_voxel_size_and_a_2d_model_predicts_stacks_plane_by_plane(
    make_napari_viewer, qtbot, tmp_path, checkpoint
):
    spacing = (2.0, 0.5, 0.5)
    volume, _ = nuclei_volume(np.random.default_rng(1), (12, 48, 48), spacing)
    calibration = spacing_calibration(spacing).tiff_kwargs("ZYX", np.uint16)
    tifffile.imwrite(tmp_path / "volume.tif", uint16(volume), **calibration)
    viewer = make_napari_viewer()
    layer = viewer.add_image(uint16(volume), name="volume", scale=spacing, translate=(3.0, 0.0, 1.0))
    widget = open_widget(viewer, "Segment")
    widget.image.value = layer
    choose_file(qtbot, widget, volume_checkpoint(tmp_path / "volume.ckpt"))
    assert "3-D" in widget.model_info.value
    press(qtbot, widget, widget.run_button)
    expected = cli_outputs(
        tmp_path / "volume.tif", tmp_path / "volume_out.tif", "--checkpoint", str(tmp_path / "volume.ckpt")
    )
    labels = widget.outputs["labels"]
    assert labels.data.shape == (12, 48, 48) and labels.data.max() >= 2
    np.testing.assert_array_equal(labels.data, expected["labels"])
    assert tuple(labels.scale) == spacing and tuple(labels.translate) == (3.0, 0.0, 1.0)
    # The voxel size matters: the same voxels read as isotropic give other objects, so it was used.
    isotropic = tmp_path / "isotropic.tif"
    tifffile.imwrite(isotropic, uint16(volume))
    flat = cli_outputs(isotropic, tmp_path / "isotropic_out.tif", "--checkpoint", str(tmp_path / "volume.ckpt"))
    assert not np.array_equal(flat["labels"], labels.data)

    # A 2-D model on the same stack: each plane by itself, as unetseg-predict predicts a TIFF stack.
    choose_file(qtbot, widget, checkpoint)
    widget.threshold.value, widget.min_size.value = 0.05, 3  # the tiny model is barely trained: objects anyway
    press(qtbot, widget, widget.run_button)
    expected = cli_outputs(
        tmp_path / "volume.tif",
        tmp_path / "stack_out.tif",
        "--checkpoint",
        str(checkpoint),
        "--threshold",
        "0.05",
        "--min-size",
        "3",
    )
    np.testing.assert_array_equal(widget.outputs["labels"].data, expected["labels"])


class Reads:
    """A lazily read stack that records the size of every read."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype, self.ndim, self.reads = array, array.shape, array.dtype, array.ndim, []

    def __getitem__(self, key):
        block = self.array[key]
        self.reads.append(block.size)
        return block


def test_dask_multiscale_layer_is_predicted_from_its_finest_level_without_loading_it(
    make_napari_viewer, qtbot, checkpoint
):
    import dask.array as da

    stack = np.stack([uint16(nuclei_image(np.random.default_rng(seed), (96, 96))[0]) for seed in range(3)])
    finest = Reads(stack)
    pyramid = [da.from_array(finest, chunks=stack.shape), stack[:, ::2, ::2], stack[:, ::4, ::4]]
    viewer = make_napari_viewer()
    layer = viewer.add_image(pyramid, multiscale=True, name="pyramid", scale=(1.0, 0.3, 0.3))
    widget = open_widget(viewer, "Segment")
    widget.image.value = layer
    choose_file(qtbot, widget, checkpoint)
    widget.threshold.value, widget.min_size.value = 0.05, 3
    finest.reads.clear()
    press(qtbot, widget, widget.run_button)
    assert finest.reads and max(finest.reads) <= stack[0].size  # a plane (or a band of one) at a time
    model, spec = load_predictor(checkpoint)
    settings = PredictSettings(output="labels", threshold=0.05, min_size=3, tiling=TilingConfig(tta=False))
    labels = widget.outputs["labels"]
    np.testing.assert_array_equal(labels.data, predict_image(model, spec, stack, settings))
    assert labels.data.shape == stack.shape and tuple(labels.scale) == (1.0, 0.3, 0.3)


def test_cancel_stops_a_prediction_and_adds_no_layer(make_napari_viewer, qtbot, checkpoint):
    viewer = make_napari_viewer()
    stack = np.random.default_rng(0).integers(0, 4096, (40, 128, 128), dtype=np.uint16)
    layer = viewer.add_image(stack, name="long")
    widget = open_widget(viewer, "Segment")
    widget.image.value = layer
    choose_file(qtbot, widget, checkpoint)
    widget.run_button.native.click()
    widget.cancel_button.native.click()
    wait(qtbot, widget)
    assert widget.status.value == "cancelled"
    assert [layer.name for layer in viewer.layers] == ["long"]
    assert widget.run_button.enabled and not widget.cancel_button.enabled


# --- Fine-tune ------------------------------------------------------------------------------------------


def test_fine_tuning_on_corrected_labels_raises_dice(make_napari_viewer, qtbot, tmp_path, checkpoint):
    """The tiny model finds no nuclei in a dark-on-bright image; the user corrects a crop, fine-tunes for
    20 s, and the Segment widget predicts again, better; the fine-tuned model saves and reloads."""
    image, truth = nuclei_image(np.random.default_rng(5), (128, 128))
    inverted = uint16(1.0 - image)
    viewer = make_napari_viewer()
    layer = viewer.add_image(inverted, name="dark nuclei", scale=(0.5, 0.5), translate=(2.0, 2.0))
    segment = open_widget(viewer, "Segment")
    segment.image.value = layer
    choose_file(qtbot, segment, checkpoint)
    press(qtbot, segment, segment.run_button)
    predicted = segment.outputs["labels"]
    before = foreground_dice(predicted.data > 0, truth > 0)

    # The user's corrections: the true objects of a crop (rows 16-111, columns 8-103), placed on the image.
    crop = (slice(16, 112), slice(8, 104))
    corrected = viewer.add_labels(truth[crop], name="corrections", scale=(0.5, 0.5), translate=(2.0 + 8.0, 2.0 + 4.0))
    tune = open_widget(viewer, "Fine-tune")
    tune.image.value, tune.labels.value = layer, corrected
    tune.seconds.value = 20
    tune.tile_size.value = 64
    cpu = time.process_time()
    press(qtbot, tune, tune.train_button)
    seconds = time.process_time() - cpu
    wait(qtbot, segment)  # the Segment widget predicts again with the new model
    after = foreground_dice(predicted.data > 0, truth > 0)
    print(f"fine-tuning: Dice {before:.3f} -> {after:.3f}, {seconds:.1f} s of CPU")
    assert after >= before + 0.2, (before, after)
    assert seconds <= 60
    assert "fine-tuned" in segment.model_info.value
    assert len(tune.losses) >= 10 and tune.loss.value.startswith(f"{tune.losses[-1][1]:.4f}")
    assert np.array_equal(corrected.data, truth[crop])  # the corrections were not overwritten

    tune.checkpoint_path.value = tmp_path / "tuned.ckpt"
    press(qtbot, tune, tune.save_checkpoint_button)
    assert tune.status.value.startswith("saved"), tune.status.value
    model, spec = load_predictor(tmp_path / "tuned.ckpt")
    settings = PredictSettings(output="labels", tiling=TilingConfig(tta=False))
    np.testing.assert_array_equal(predict_image(model, spec, inverted, settings), predicted.data)
    tune.package_path.value = tmp_path / "tuned.zip"
    press(qtbot, tune, tune.save_package_button)
    assert tune.status.value.startswith("saved"), tune.status.value
    package, package_spec = load_predictor(tmp_path / "tuned.zip")  # its ONNX weights, through ONNX Runtime
    assert package_spec == spec
    from_package = predict_image(package, package_spec, inverted, PredictSettings(output="prob"))
    np.testing.assert_allclose(
        from_package, predict_image(model, spec, inverted, PredictSettings(output="prob")), atol=1e-4
    )


# --- Sample data and writers -------------------------------------------------------------------------


def test_samples_and_writers(make_napari_viewer, tmp_path):
    import roifile

    viewer = make_napari_viewer()
    viewer.open_sample("unetseg", "nuclei")
    image, labels = viewer.layers["nuclei"], viewer.layers["nuclei truth"]
    assert image.data.shape == (256, 256) and image.data.dtype == np.uint16
    assert labels.data.shape == (256, 256) and labels.data.max() >= 10
    viewer.open_sample("unetseg", "nuclei_volume")
    assert tuple(viewer.layers["nuclei volume"].scale) == (2.0, 0.5, 0.5)

    viewer.layers.selection = {labels}
    viewer.layers.save(str(tmp_path / "rois.zip"), selected=True, plugin="unetseg")
    rois = roifile.roiread(tmp_path / "rois.zip")
    assert len(rois) == len(np.unique(labels.data)) - 1

    viewer.layers.selection = {labels, image}
    viewer.layers.save(str(tmp_path / "objects.csv"), selected=True, plugin="unetseg")
    with open(tmp_path / "objects.csv") as handle:
        rows = {int(row["label"]): row for row in csv.DictReader(handle)}
    assert set(rows) == set(np.unique(labels.data)) - {0}
    first = labels.data == 1
    assert int(rows[1]["area"]) == first.sum()
    assert float(rows[1]["mean_intensity_0"]) == pytest.approx(image.data[first].mean())
