"""unetseg-export: ONNX files that match PyTorch at several sizes and predict through the tiling."""

import json

import lightning
import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from unetseg.cli import export as cli
from unetseg.export import (
    FORMATS,
    OnnxPredictor,
    export_checkpoint,
    load_onnx,
    min_size,
    size_multiple,
)
from unetseg.inference import predict_tiled, select_device
from unetseg.io import Normalization
from unetseg.models import SMPUnet, UNet
from unetseg.training.module import SegmentationModule

NETS = {  # name: (network, its size_multiple and min_size)
    "unet-concat": (lambda: UNet(in_channels=1, classes=1, depth=2, width=4, skip="concat"), (4, 8)),
    "unet-add-residual": (
        lambda: UNet(in_channels=3, classes=3, depth=3, width=4, skip="add", block="residual", upsample="bilinear"),
        (8, 16),
    ),
    "smp-resnet18": (lambda: SMPUnet(in_channels=1, classes=2, encoder_name="resnet18", encoder_depth=3), (8, 8)),
}
SIZES = [(64, 96), (50, 70)]  # a multiple of every net's size_multiple and one of none, both >= min_size


def write_checkpoint(path, net, seed=0):
    """A training checkpoint as Lightning writes it, with randomised BatchNorm statistics (so eval mode matters)."""
    torch.manual_seed(seed)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    targets = {1: "foreground", 3: "boundary"}.get(net.classes, "classes")
    spec = {
        "in_channels": net.in_channels,
        "normalization": Normalization().to_dict(),
        "targets": targets,
        "classes": net.classes,
    }
    module = SegmentationModule(net, input_spec=spec)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    return spec


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(name, format) -> (exported file, input_spec, the PyTorch network in eval mode), each exported once."""
    done = {}

    def get(name: str, format: str):
        if name not in done:
            path = tmp_path_factory.mktemp(name) / "model.ckpt"
            spec = write_checkpoint(path, NETS[name][0]())
            done[name] = path, spec, SegmentationModule.load_from_checkpoint(path).net.eval()
        if (name, format) not in done:
            path, spec, net = done[name]
            done[name, format] = export_checkpoint(path, path.parent / f"model{FORMATS[format]}"), spec, net
        return done[name, format]

    return get


EVERY_EXPORT = [pytest.param(name, format, id=f"{name}-{format}") for format in FORMATS for name in NETS]


@pytest.mark.parametrize("name, format", EVERY_EXPORT)
def test_exported_model_matches_pytorch_at_several_sizes(export, name, format):
    path, spec, net = export(name, format)
    model, loaded_spec = load_onnx(path)
    assert loaded_spec.to_dict() == spec
    worst = 0.0
    with torch.inference_mode():
        for height, width in [*SIZES, (5, 3)]:  # below min_size the loaders pad as PyTorch does
            image = torch.randn(2, net.in_channels, height, width)
            logits = model(image)
            assert logits.shape == (2, net.classes, height, width)
            worst = max(worst, (logits - net(image)).abs().max().item())
    print(f"{path.name} {type(net).__name__}: max |exported - PyTorch| = {worst:.2g}")
    assert worst < 1e-4


def read_raw(path):
    """(run, metadata) of an exported file through its runtime alone: no padding or checks by unetseg."""
    proto = onnx.load(str(path))
    assert max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return (
        lambda image: torch.from_numpy(session.run(None, {"image": image.numpy()})[0]),
        {entry.key: entry.value for entry in proto.metadata_props},
    )


@pytest.mark.parametrize("name, format", EVERY_EXPORT)
def test_exported_file_alone_takes_dynamic_sizes_and_carries_metadata(export, name, format):
    path, spec, net = export(name, format)
    run, metadata = read_raw(path)
    assert json.loads(metadata["input_spec"]) == spec
    assert json.loads(metadata["size_multiple"]) == size_multiple(net)
    assert json.loads(metadata["min_size"]) == min_size(net)
    assert json.loads(metadata["net"])["init_args"] == net.config
    with torch.inference_mode():
        for batch, height, width in [(3, 50, 70), (1, min_size(net), min_size(net) + 1)]:
            image = torch.randn(batch, net.in_channels, height, width)
            assert (run(image) - net(image)).abs().max() < 1e-4


@pytest.mark.parametrize("name", list(NETS))
def test_predict_tiled_through_exported_model_equals_pytorch(export, name):
    path, _, net = export(name, "onnx")
    model, _ = load_onnx(path)
    image = np.random.default_rng(0).random((net.in_channels, 100, 90), dtype=np.float32)
    expected = predict_tiled(net, image, tile_size=64, overlap=16)
    probs = predict_tiled(model, image, tile_size=64, overlap=16)
    assert probs.shape == (net.classes, 100, 90)
    assert np.abs(probs - expected).max() < 1e-4


def test_size_multiples():
    for make_net, sizes in NETS.values():
        net = make_net()
        assert (size_multiple(net), min_size(net)) == sizes
    unet = UNet(depth=4, width=2)
    assert (size_multiple(unet), min_size(unet)) == (16, 32)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)  # any other network: no padding known
    assert (size_multiple(conv), min_size(conv)) == (1, 1)


@pytest.fixture(scope="module")
def unet_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet") / "model.ckpt"
    write_checkpoint(path, NETS["unet-concat"][0]())
    return path


def test_onnx_predictor_is_a_parameterless_module_for_the_engine(unet_checkpoint, tmp_path):
    predictor, spec = load_onnx(export_checkpoint(unet_checkpoint, tmp_path / "model.onnx"))
    assert isinstance(predictor, OnnxPredictor) and spec.in_channels == 1
    assert list(predictor.parameters()) == [] and select_device(predictor) == torch.device("cpu")
    assert predictor.train().training and not predictor.eval().training
    with pytest.raises(ValueError, match=r"takes images \(N, 1, H, W\); got \(1, 3, 64, 64\)"):
        predictor(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r"\['NoSuchExecutionProvider'\]: ONNX Runtime here offers .*CPUExecution"):
        OnnxPredictor(tmp_path / "model.onnx", providers=["NoSuchExecutionProvider"])


def test_loaders_reject_files_not_written_by_unetseg_export(tmp_path):
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    torch.onnx.export(conv, (torch.zeros(1, 1, 8, 8),), str(tmp_path / "plain.onnx"), dynamo=False)
    with pytest.raises(ValueError, match="plain.onnx: no input_spec, size_multiple, min_size, net in its metadata"):
        load_onnx(tmp_path / "plain.onnx")
    (tmp_path / "junk.onnx").write_text("not a model")
    with pytest.raises(ValueError, match="junk.onnx: not a readable ONNX model"):
        load_onnx(tmp_path / "junk.onnx")
    with pytest.raises(FileNotFoundError, match="missing.onnx: no such file"):
        load_onnx(tmp_path / "missing.onnx")


def test_cli_exports_into_new_folders_and_reports_the_check(unet_checkpoint, tmp_path, capsys):
    out = tmp_path / "new" / "folder" / "model.onnx"
    assert cli.main([str(unet_checkpoint), str(out)]) == 0
    assert out.is_file() and sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no .partial left
    report = capsys.readouterr().out
    assert f"wrote {out} (onnx)" in report
    assert "multiples of 4 run unpadded, sizes >= 8 match PyTorch" in report
    difference = float(report.split("logit difference: ")[1].split()[0])
    assert difference < 1e-4
    assert "on inputs of 64x64 and 68x67" in report


@pytest.mark.parametrize(
    "args, message",
    [
        (["{ckpt}", "{tmp}/model.pt", "--format", "onnx"], "{tmp}/model.pt: a onnx file must end in .onnx"),
        (["{ckpt}", "{tmp}/model.bin"], "{tmp}/model.bin: cannot tell the format from the suffix '.bin'"),
        (["{tmp}/missing.ckpt", "{tmp}/model.onnx"], "{tmp}/missing.ckpt: no such checkpoint file"),
        (["{tmp}/junk.ckpt", "{tmp}/model.onnx"], "{tmp}/junk.ckpt: not a readable PyTorch checkpoint"),
        (["{ckpt}", "{tmp}/junk.ckpt/model.onnx"], "cannot create the output folder {tmp}/junk.ckpt"),
        (["{ckpt}", "{tmp}/model.onnx", "--opset", "13"], "opset must be an integer >= 17, got 13"),
    ],
)
def test_cli_usage_errors(unet_checkpoint, tmp_path, capsys, args, message):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    fill = dict(ckpt=unet_checkpoint, tmp=tmp_path)
    assert cli.main([arg.format(**fill) for arg in args]) == 2
    assert f"unetseg-export: error: {message.format(**fill)}" in capsys.readouterr().err
    assert not list(tmp_path.glob("model.*"))


def test_cli_rejects_unknown_format_and_documents_sizes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["a.ckpt", "b.onnx", "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "2**depth (UNet) or 2**encoder_depth (SMPUnet)" in help_text


def test_cli_fails_when_the_export_differs_from_pytorch(unet_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "max_abs_difference", lambda *args, **kwargs: 0.5)
    assert cli.main([str(unet_checkpoint), str(tmp_path / "model.onnx")]) == 1
    assert "differs from PyTorch by 0.5 > 0.001" in capsys.readouterr().err
