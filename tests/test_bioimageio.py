"""bioimage.io packages: written by unetseg-export, validated and test-run by bioimageio.core, predicted from."""

import zipfile

import numpy as np
import pytest
import tifffile
import yaml

from unetseg.cli import export as cli
from unetseg.export.bioimageio import export_bioimageio, is_package, load_package, test_package
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_file
from unetseg.io import Normalization
from unetseg.models.checkpoint import CheckpointError
from unetseg.weights import available_models

pytest.importorskip("bioimageio.core", reason="pip install 'unetseg[bioimageio]'")


@pytest.fixture(scope="module")
def package(checkpoint, tmp_path_factory):
    """The tiny session checkpoint exported once as a bioimage.io package."""
    return export_bioimageio(checkpoint, tmp_path_factory.mktemp("bioimageio") / "tiny.zip")


def test_package_passes_bioimageio_core_model_test(package):
    passed, summary = test_package(package)
    assert passed, summary
    assert "Reproduce test outputs from test inputs (onnx)" in summary
    assert "Reproduce test outputs from test inputs (pytorch_state_dict)" in summary


def test_rdf_describes_normalisation_postprocessing_weights_and_provenance(package, checkpoint):
    with zipfile.ZipFile(package) as archive:
        names = set(archive.namelist())
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        test_input = np.load(archive.open("test_input.npy"))
        test_output = np.load(archive.open("test_output.npy"))
        architecture_source = archive.read("unet.py").decode()
    assert {"rdf.yaml", "weights.onnx", "weights.pt", "unet.py", "cover.png", "README.md"} <= names
    assert rdf["format_version"].startswith("0.5") and rdf["license"] == "MIT"
    assert rdf["authors"] and rdf["cite"][0]["doi"] == "10.1007/978-3-319-24574-4_28"
    (inputs,) = rdf["inputs"]
    steps = {step["id"]: step.get("kwargs", {}) for step in inputs["preprocessing"]}
    norm = Normalization()
    assert steps["scale_range"] == {"axes": ["channel", "y", "x"], "min_percentile": norm.low, "max_percentile": 99.8}
    assert steps["clip"] == {"min": 0.0, "max": 1.0}
    assert [axis["type"] for axis in inputs["axes"]] == ["batch", "channel", "space", "space"]
    (outputs,) = rdf["outputs"]
    assert [step["id"] for step in outputs["postprocessing"]][0] == "sigmoid"
    architecture = rdf["weights"]["pytorch_state_dict"]["architecture"]
    assert architecture["source"] == "unet.py" and architecture["callable"] == "UNet"
    assert architecture["kwargs"]["depth"] == 2 and architecture["kwargs"]["width"] == 4
    assert "from unetseg" not in architecture_source and "import unetseg" not in architecture_source  # torch only
    assert rdf["config"]["unetseg"]["input_spec"]["normalization"] == norm.to_dict()
    assert test_input.shape[:2] == (1, 1) and test_output.shape == (1, 1, *test_input.shape[2:])
    assert 0.0 <= test_output.min() and test_output.max() <= 1.0


def test_predict_from_package_equals_predict_from_checkpoint(package, checkpoint, tmp_path):
    image = (np.random.default_rng(0).random((70, 90)) * 4000).astype(np.uint16)
    source = tmp_path / "image.tif"
    tifffile.imwrite(source, image)
    settings = PredictSettings(output="prob")
    results = []
    for model_file in (checkpoint, package):
        model, spec = load_predictor(model_file)
        predict_file(model, spec, source, tmp_path / f"{model_file.stem}.tif", settings)
        results.append(tifffile.imread(tmp_path / f"{model_file.stem}.tif"))
    assert is_package(package)
    np.testing.assert_allclose(results[1], results[0], atol=1e-4)


def test_zip_not_from_unetseg_is_refused_with_its_name(tmp_path):
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as archive:
        archive.writestr("rdf.yaml", "type: model\nname: other\n")
    with pytest.raises(ValueError, match="not a package exported by unetseg"):
        load_package(foreign)
    with pytest.raises(CheckpointError, match=r"foreign.zip: cannot load the bioimage.io package \(not a package"):
        load_predictor(foreign)


def test_cli_exports_and_test_runs_a_package(checkpoint, tmp_path, capsys):
    out = tmp_path / "sub" / "model.zip"
    assert cli.main([str(checkpoint), str(out)]) == 0  # the suffix picks the format
    printed = capsys.readouterr().out
    assert "bioimage.io model package" in printed and "bioimageio.core test passed" in printed
    assert is_package(out)
    assert cli.main([str(checkpoint), str(tmp_path / "model.onnx"), "--format", "bioimageio"]) == 2
    assert "a bioimage.io package must end in .zip" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif("nuclei" not in available_models(), reason="the nuclei model is not installed")
def test_shipped_nuclei_model_package_passes_bioimageio_core(tmp_path, capsys):
    out = tmp_path / "nuclei.zip"
    assert cli.main(["--model", "nuclei", str(out), "--format", "bioimageio"]) == 0
    assert "bioimageio.core test passed" in capsys.readouterr().out
    with zipfile.ZipFile(out) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
        readme = archive.read("README.md").decode()
    assert "nuclei" in rdf["tags"] and len(rdf["cite"]) == 2
    assert rdf["config"]["unetseg"]["input_spec"]["tta"] is True  # unetseg predicts it with TTA by default
    assert "Test-time augmentation: the post-processing was tuned on probabilities averaged" in readme
