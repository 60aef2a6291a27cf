"""Fold ensembles: one model file of K networks that predicts with the mean of their probabilities, through
every path a single network takes; ONNX export round-trips; bad ensembles are refused by name."""

import numpy as np
import pytest
import torch

from unetseg.inference import TilingConfig
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_image
from unetseg.io.normalize import Normalization
from unetseg.models import UNet, describe_net
from unetseg.models.checkpoint import CheckpointError, make_ensemble, save_checkpoint
from unetseg.models.ensemble import Ensemble
from unetseg.spec import InputSpec

SETTINGS = PredictSettings("prob", tiling=TilingConfig(64, 16, amp=False, tta=False))


def member(path, seed, classes=1, targets="foreground", depth=2):
    """A small U-Net checkpoint with random weights of `seed`, as unetseg-train writes them."""
    torch.manual_seed(seed)
    net = UNet(in_channels=1, classes=classes, depth=depth, width=4)
    spec = InputSpec(1, Normalization(1.0, 99.0), targets, classes)
    state = {f"net.{key}": value for key, value in net.state_dict().items()}
    save_checkpoint(
        {"hyper_parameters": {"net": describe_net(net), "input_spec": spec.to_dict()}, "state_dict": state}, path
    )
    return path


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 4000, (100, 90)).astype(np.uint16)


@pytest.mark.parametrize("classes, targets", [(1, "foreground"), (3, "boundary")])
def test_an_ensemble_predicts_the_mean_of_its_members_probabilities(tmp_path, image, classes, targets):
    paths = [member(tmp_path / f"fold{k}.ckpt", k, classes, targets, depth=2 + k % 2) for k in range(3)]
    ensemble_path = make_ensemble(paths, tmp_path / "ensemble.ckpt")
    model, spec = load_predictor(ensemble_path, "cpu")
    assert isinstance(model, Ensemble) and len(model.members) == 3
    assert spec == load_predictor(paths[0], "cpu")[1]
    mean = np.mean([predict_image(*load_predictor(path, "cpu"), image, SETTINGS) for path in paths], axis=0)
    together = predict_image(model, spec, image, SETTINGS)
    np.testing.assert_allclose(together, mean, atol=1e-5)
    if classes > 1:
        np.testing.assert_allclose(together.sum(axis=0), 1.0, atol=1e-5)


def test_an_ensemble_exports_to_onnx_and_predicts_the_same(tmp_path, image):
    pytest.importorskip("onnxruntime")
    from unetseg.export.onnx import export_checkpoint

    paths = [member(tmp_path / f"fold{k}.ckpt", k) for k in range(2)]
    ensemble_path = make_ensemble(paths, tmp_path / "ensemble.ckpt")
    onnx_path = export_checkpoint(ensemble_path, tmp_path / "ensemble.onnx")
    from_onnx = predict_image(*load_predictor(onnx_path, "cpu"), image, SETTINGS)
    from_torch = predict_image(*load_predictor(ensemble_path, "cpu"), image, SETTINGS)
    np.testing.assert_allclose(from_onnx, from_torch, atol=1e-4)


def test_ensembles_of_different_input_specs_or_of_one_network_are_refused(tmp_path):
    grey = member(tmp_path / "a.ckpt", 0)
    boundary = member(tmp_path / "b.ckpt", 1, classes=3, targets="boundary")
    with pytest.raises(CheckpointError, match="b.ckpt: its input spec differs from"):
        make_ensemble([grey, boundary], tmp_path / "e.ckpt")
    with pytest.raises(CheckpointError, match="an ensemble takes 2 to 16 checkpoints, got 1"):
        make_ensemble([grey], tmp_path / "e.ckpt")
    ensemble = make_ensemble([grey, member(tmp_path / "c.ckpt", 2)], tmp_path / "e.ckpt")
    with pytest.raises(CheckpointError, match="is an ensemble already"):
        make_ensemble([ensemble, grey], tmp_path / "f.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt", "b.ckpt", "c.ckpt", "e.ckpt"]


def test_a_crafted_ensemble_file_is_refused_before_anything_is_built(tmp_path):
    """The members of an ensemble file go through the same allow-list and bounds as one network."""
    net = describe_net(UNet(in_channels=1, classes=1, depth=2, width=4))
    spec = InputSpec(1, Normalization(), "foreground", 1).to_dict()
    cases = {
        "one.ckpt": ([net], "must list 2 to 16 member networks"),
        "foreign.ckpt": ([net, {"class_path": "os.system", "init_args": {}}], "is not one of unetseg's networks"),
        "huge.ckpt": ([net, {**net, "init_args": {**net["init_args"], "width": 100000}}], "width=100000 is outside"),
    }
    for name, (members, message) in cases.items():
        hparams = {"net": {"class_path": "unetseg.models.ensemble.Ensemble", "members": members}, "input_spec": spec}
        save_checkpoint({"hyper_parameters": hparams, "state_dict": {}}, tmp_path / name)
        with pytest.raises(CheckpointError, match=message):
            load_predictor(tmp_path / name, "cpu")


def test_an_ensemble_exports_to_a_bioimageio_package_of_onnx_weights_only(tmp_path, image):
    pytest.importorskip("bioimageio.spec")
    import zipfile

    import yaml

    from unetseg.export.bioimageio import export_bioimageio

    ensemble_path = make_ensemble([member(tmp_path / f"fold{k}.ckpt", k) for k in range(2)], tmp_path / "e.ckpt")
    package = export_bioimageio(ensemble_path, tmp_path / "e.zip")
    with zipfile.ZipFile(package) as archive:
        rdf = yaml.safe_load(archive.read("rdf.yaml"))
    assert list(rdf["weights"]) == ["onnx"]  # no single architecture to rebuild an ensemble from
    from_package = predict_image(*load_predictor(package, "cpu"), image, SETTINGS)
    np.testing.assert_allclose(
        from_package, predict_image(*load_predictor(ensemble_path, "cpu"), image, SETTINGS), atol=1e-4
    )


def test_the_ensemble_benchmark_counts_k_times_tta_forward_passes(tmp_path, monkeypatch):
    """benchmarks/bench_ensemble.py on 2 tiny images: every variant's row, and tile forwards counted per tile =
    networks x TTA passes (an ensemble of 5 with TTA: 40; the ensemble of TTA's cost: 8)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_ensemble.py"
    module_spec = importlib.util.spec_from_file_location("bench_ensemble", path)
    bench = importlib.util.module_from_spec(module_spec)
    monkeypatch.setitem(sys.modules, "bench_ensemble", bench)  # its dataclass looks its module up there
    monkeypatch.syspath_prepend(str(path.parent))  # its sibling peak.py, as when run as a script
    module_spec.loader.exec_module(bench)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 4000, shape).astype(np.uint16) for shape in ((70, 90), (64, 64))]
    settings = PredictSettings("mask", tiling=TilingConfig(64, 16, amp=False))
    rows = bench.time_variants(member(tmp_path / "net.ckpt", 0), images, tmp_path, members=5, settings=settings)
    assert [row.variant for row in rows] == [
        "one network",
        "one network + TTA",
        "ensemble of 5",
        "ensemble of 5 + TTA",
        "ensemble of 8 (TTA's cost)",
    ]
    assert [(row.networks, row.tta_passes) for row in rows] == [(1, 1), (1, 8), (5, 1), (5, 8), (8, 1)]
    assert [row.forwards_per_tile for row in rows] == [1, 8, 5, 40, 8]  # counted by hooks, not assumed
    assert all(row.seconds_per_image > 0 for row in rows)
    table = bench.format_table(rows).splitlines()
    assert len(table) == 2 + 5 and table[0].startswith("| variant | networks x TTA passes |")
    assert table[5].startswith("| ensemble of 5 + TTA | 5 x 8 = 40 | 40 |")
    assert table[2].split(" | ")[-2] == "1.00x" and table[3].endswith("| 1.00x |")  # ratios to one network, to TTA
    tta, both = bench.equal_cost(rows)
    assert tta.startswith("- one network + TTA (1 x 8 = 8 forward passes per tile")
    assert "as many passes as ensemble of 8 (TTA's cost): measured" in tta
    assert "(5 x 8 = 40 forward passes per tile" in both and "an ensemble of 40 networks: ~" in both
