"""--backend onnxruntime: a checkpoint's network run by ONNX Runtime, exported once into the cache."""

import numpy as np
import pytest
import tifffile
import torch

from unetseg.cli.predict import main
from unetseg.export.onnx import OnnxPredictor
from unetseg.inference import TilingConfig
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_image
from unetseg.io import Normalization
from unetseg.models import UNet
from unetseg.models.checkpoint import CheckpointError
from unetseg.synthetic import nuclei_image
from unetseg.training.module import SegmentationModule

pytest.importorskip("onnxruntime")
TILING = TilingConfig(tile_size=64, overlap=16, batch_size=4, amp=False)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNETSEG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_onnxruntime_predicts_the_probabilities_torch_does_and_exports_once(cache, checkpoint):
    model, spec = load_predictor(checkpoint)
    runtime, runtime_spec = load_predictor(checkpoint, backend="onnxruntime")
    assert isinstance(runtime, OnnxPredictor) and runtime_spec == spec
    exported = list((cache / "onnx").glob("*.onnx"))
    assert len(exported) == 1 and exported[0].name.startswith(checkpoint.stem)
    stamp = exported[0].stat().st_mtime_ns
    image, _ = nuclei_image(np.random.default_rng(3), (90, 110))
    settings = PredictSettings(output="prob", tiling=TILING)
    np.testing.assert_allclose(
        predict_image(runtime, spec, image, settings), predict_image(model, spec, image, settings), atol=1e-5
    )
    load_predictor(checkpoint, backend="onnxruntime")
    assert [path.stat().st_mtime_ns for path in (cache / "onnx").glob("*.onnx")] == [stamp]  # reused, not redone


def test_a_3d_model_is_refused_by_onnxruntime_naming_the_file(cache, tmp_path):
    net = UNet(in_channels=1, classes=1, depth=2, width=4, spatial_dims=3)
    spec = {"in_channels": 1, "normalization": Normalization().to_dict(), "targets": "foreground", "classes": 1}
    module = SegmentationModule(net, input_spec=spec)
    path = tmp_path / "volume.pt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    with pytest.raises(CheckpointError, match=r"volume.pt: a 3-D model; --backend onnxruntime runs 2-D models"):
        load_predictor(path, backend="onnxruntime")
    assert not (cache / "onnx").exists()


def test_an_unknown_backend_is_refused(checkpoint):
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime, got 'tvm'"):
        load_predictor(checkpoint, backend="tvm")


def test_the_command_line_predicts_with_onnxruntime_as_with_torch(cache, tmp_path, checkpoint):
    image, _ = nuclei_image(np.random.default_rng(4), (80, 96))
    source = tmp_path / "in" / "nuclei.tif"
    source.parent.mkdir()
    tifffile.imwrite(source, (image * 4000).astype(np.uint16))
    common = ["--checkpoint", str(checkpoint), "--output", "prob", "--precision", "fp32", "-q"]
    common += ["--tile-size", "64", "--overlap", "16"]
    assert main([str(source.parent), str(tmp_path / "torch")] + common) == 0
    assert main([str(source.parent), str(tmp_path / "ort"), "--backend", "onnxruntime"] + common) == 0
    np.testing.assert_allclose(
        tifffile.imread(tmp_path / "ort" / "nuclei.tif"), tifffile.imread(tmp_path / "torch" / "nuclei.tif"), atol=1e-5
    )


@pytest.mark.parametrize("option", [["--precision", "bf16"], ["--dask", "local:1"]])
def test_onnxruntime_refuses_what_it_cannot_do_before_loading(cache, tmp_path, checkpoint, option, capsys):
    source = tmp_path / "nuclei.tif"
    tifffile.imwrite(source, np.zeros((32, 32), np.uint16))
    argv = [str(source), str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--backend", "onnxruntime"]
    assert main(argv + option) == 2
    assert "--backend onnxruntime runs in float32 on this process; it does not combine with " + option[0] in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists() and not (cache / "onnx").exists()


def test_a_damaged_export_in_the_cache_is_made_again(cache, checkpoint, caplog):
    load_predictor(checkpoint, backend="onnxruntime")
    (exported,) = (cache / "onnx").glob("*.onnx")
    exported.write_bytes(exported.read_bytes()[:100])  # truncated
    runtime, _ = load_predictor(checkpoint, backend="onnxruntime")
    assert isinstance(runtime, OnnxPredictor) and exported.stat().st_size > 1000
    assert f"{exported}: cannot load the ONNX model" in caplog.text and "exporting it again" in caplog.text


def test_an_unwritable_cache_is_named_in_the_refusal(tmp_path, monkeypatch, checkpoint):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv("UNETSEG_CACHE", str(blocked))
    with pytest.raises(CheckpointError, match=rf"{checkpoint.name}: cannot run it with ONNX Runtime \(.*blocked"):
        load_predictor(checkpoint, backend="onnxruntime")
