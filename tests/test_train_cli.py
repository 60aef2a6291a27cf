"""unetseg-train end to end on tiny synthetic data: run folder, checkpoints that rebuild themselves, resume."""

import csv
import json

import pytest
import torch
import yaml
from conftest import CONFIGS, QUIET, tiny_train_args
from skimage import io as skio

from unetseg.cli import train
from unetseg.models import SMPUnet, UNet
from unetseg.models.checkpoint import CheckpointError
from unetseg.synthetic import make_nuclei_dataset
from unetseg.training.module import SegmentationModule


@pytest.fixture
def capture_cli(monkeypatch):
    """Run train.main and return the LightningCLI it built (main itself returns nothing)."""
    built = []

    class CapturingCLI(train.TrainCLI):
        def __init__(self, *args, **kwargs):
            built.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train, "TrainCLI", CapturingCLI)

    def run(args):
        train.main(args)
        return built[-1]

    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch of configs/tiny.yaml on 6 synthetic 96x96 images; returns (data root, run folder)."""
    base = tmp_path_factory.mktemp("tiny_run")
    root = make_nuclei_dataset(base / "d", count=6, shape=(96, 96))
    run_dir = base / "run"
    train.main(tiny_train_args(root, run_dir, "--trainer.max_epochs", "1"))
    return root, run_dir


def test_fit_writes_the_run_folder(tiny_run):
    root, run_dir = tiny_run
    for name in (
        "checkpoints/best.ckpt",
        "checkpoints/last.ckpt",
        "metrics.csv",
        "curves.png",
        "split.json",
        "config.yaml",
    ):
        assert (run_dir / name).is_file(), name
    split = json.loads((run_dir / "split.json").read_text())
    assert sorted(split["train"] + split["val"]) == [f"nuclei_{i:03d}" for i in range(6)]
    assert len(split["val"]) == 1
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    dice = [float(row["val/dice"]) for row in rows if row.get("val/dice")]
    assert dice and all(0.0 <= value <= 1.0 for value in dice)
    assert any(row.get("train/loss_epoch") for row in rows)
    curves = skio.imread(run_dir / "curves.png")
    assert curves.shape[:2] == (400, 1000)  # figsize (10, 4) at 100 dpi
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["data"]["root"] == str(root)
    assert config["model"]["net"]["init_args"]["width"] == 4


def test_checkpoint_rebuilds_the_network_and_input_spec(tiny_run):
    _, run_dir = tiny_run
    model = SegmentationModule.load_from_checkpoint(run_dir / "checkpoints/best.ckpt")
    assert isinstance(model.net, UNet)
    assert model.net.config == dict(
        in_channels=1,
        classes=1,
        depth=2,
        width=4,
        skip="concat",
        block="plain",
        norm="batch",
        upsample="transpose",
        dropout=0.0,
        blocks_per_level=1,
        growth=None,
        layers=4,
        deep_supervision=False,
        spatial_dims=2,
        pool=None,
        spacing=None,
    )
    spec = model.hparams["input_spec"]
    assert spec["in_channels"] == 1
    assert spec["normalization"] == {"low": 1.0, "high": 99.8, "clip": True}
    assert spec["targets"] == "foreground" and spec["classes"] == 1
    checkpoint = torch.load(run_dir / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, checkpoint["state_dict"][name])
    model.eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 37, 53)).shape == (1, 1, 37, 53)


@pytest.mark.parametrize("name", ["best.ckpt", "last.ckpt"])
def test_checkpoints_are_pure_data(tiny_run, name):
    _, run_dir = tiny_run
    checkpoint = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
    assert checkpoint["hyper_parameters"]["net"]["class_path"] == "unetseg.models.unet.UNet"
    assert checkpoint["hyper_parameters"]["net"]["init_args"]["depth"] == 2
    assert checkpoint["global_step"] == 2  # 16 tiles per epoch / batch 8
    assert "datamodule_hyper_parameters" not in checkpoint  # no dataclasses: the input spec says what matters
    assert checkpoint["hyper_parameters"]["input_spec"]["in_channels"] == 1


def test_resume_from_last_continues(shared_dataset, tmp_path):
    run_dir = tmp_path / "run"
    train.main(tiny_train_args(shared_dataset, run_dir, "--trainer.max_epochs", "1"))
    before = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    train.main(tiny_train_args(shared_dataset, run_dir, "--trainer.max_epochs", "2", "--ckpt_path", "last"))
    after = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert after["global_step"] == before["global_step"] + 2 == 4
    assert after["epoch"] == before["epoch"] + 1
    assert not torch.equal(after["state_dict"]["net.head.weight"], before["state_dict"]["net.head.weight"])
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]


def test_fast_dev_run_of_the_unet_on_the_embedded_dataset(capture_cli, synthetic_cache, tmp_path):
    cli = capture_cli(
        [
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.fast_dev_run",
            "true",
            *QUIET,
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert isinstance(cli.model.net, UNet)
    assert cli.model.hparams["input_spec"]["in_channels"] == 1
    # root: null generated the embedded dataset once, into the (patched) cache.
    (dataset,) = synthetic_cache.iterdir()
    assert (dataset / ".complete").is_file()
    assert len(list((dataset / "images").iterdir())) == 24


def test_fast_dev_run_of_the_smp_baseline(capture_cli, shared_dataset, tmp_path):
    cli = capture_cli(
        [
            "--config",
            str(CONFIGS / "smp_unet.yaml"),
            "--data.root",
            str(shared_dataset),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.fast_dev_run",
            "true",
            "--data.in_channels",
            "1",
            "--model.net.init_args.in_channels",
            "1",
            "--model.net.init_args.encoder_name",
            "resnet18",
            "--data.tile_size",
            "64",
            "--data.batch_size",
            "2",
            "--data.num_workers",
            "0",
            *QUIET,
        ]
    )
    assert cli.trainer.state.finished and cli.trainer.global_step == 1
    assert isinstance(cli.model.net, SMPUnet)
    assert cli.model.net.config["encoder_name"] == "resnet18"
    assert cli.model.hparams["net"]["class_path"] == "unetseg.models.baseline.SMPUnet"


def test_channels_and_classes_are_stated_once_under_data(capture_cli, shared_dataset, tmp_path, capsys):
    # tiny.yaml's network says in_channels 1, classes 1: the data's 3 channels and boundary targets win.
    cli = capture_cli(
        tiny_train_args(
            shared_dataset,
            tmp_path / "run",
            "--data.in_channels",
            "3",
            "--data.targets",
            "boundary",
            "--trainer.fast_dev_run",
            "true",
        )
    )
    assert cli.model.net.config["in_channels"] == 3 and cli.model.net.config["classes"] == 3
    assert cli.model.hparams["input_spec"]["in_channels"] == 3
    assert "warning: every image is grey but data.in_channels is 3" in capsys.readouterr().err


def test_a_pretrained_network_of_other_channels_is_one_line_naming_both(shared_dataset, tmp_path, checkpoint, capsys):
    assert (
        train.main(
            tiny_train_args(
                shared_dataset,
                tmp_path / "run",
                "--data.in_channels",
                "3",
                "--model.pretrained",
                str(checkpoint),
                "--trainer.fast_dev_run",
                "true",
            )
        )
        == 1
    )
    (message,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "in_channels 1, this run's 3" in message and str(checkpoint) in message


def test_help_shows_the_options_a_user_sets(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--data.root", "--data.in_channels", "--model.net.init_args.width", "--trainer.max_epochs", "tiny"):
        assert option in out
    assert len(out.splitlines()) < 60


def test_fit_help_lists_unetseg_networks_not_torch_nn(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "known subclasses: unetseg.UNet, unetseg.SMPUnet" in " ".join(out.split())
    assert "torch.nn.Conv2d" not in out and "timm" not in out
    assert len(out.splitlines()) < 1000  # was 2108 with every torch.nn and timm class


@pytest.mark.parametrize(
    "native, config, expected",
    [
        (True, {}, "bf16-mixed"),
        (False, {}, "32-true"),
        (True, {"accelerator": "cpu", "precision": None}, "bf16-mixed"),
        (True, {"precision": "32-true"}, None),  # the config's choice stands
        (False, {"precision": "bf16-mixed"}, None),
    ],
)
def test_precision_is_chosen_per_machine_unless_the_config_sets_it(monkeypatch, native, config, expected):
    from unetseg.cli.train import automatic_precision
    from unetseg.runtime import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert automatic_precision(config) == expected


def test_a_pretrained_network_of_other_classes_names_adapt_head(shared_dataset, tmp_path, checkpoint, capsys):
    args = tiny_train_args(
        shared_dataset, tmp_path / "run", "--data.targets", "boundary", "--model.pretrained", str(checkpoint)
    )
    assert train.main([*args, "--trainer.fast_dev_run", "true"]) == 1
    (message,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "classes 1, this run's 3" in message and "--model.adapt_head true" in message
    assert train.main([*args, "--model.adapt_head", "true", "--trainer.fast_dev_run", "true"]) == 0


def test_adapt_head_keeps_the_shared_classes_and_every_other_weight(checkpoint):
    from unetseg.models import build_net, net_state_dict
    from unetseg.models.checkpoint import load_net_weights, read_checkpoint

    stored = read_checkpoint(checkpoint)
    old = net_state_dict(stored["state_dict"])
    description = stored["hyper_parameters"]["net"]
    net = build_net({**description, "init_args": {**description["init_args"], "classes": 3}})
    fresh = {name: value.clone() for name, value in net.state_dict().items()}
    with pytest.raises(CheckpointError, match="do not fit"):
        load_net_weights(net, checkpoint)
    adapted = load_net_weights(net, checkpoint, adapt_head=True)
    assert adapted == ["head.weight", "head.bias"]
    new = net.state_dict()
    for name in adapted:
        assert new[name].shape[0] == 3 and old[name].shape[0] == 1
        torch.testing.assert_close(new[name][:1], old[name].to(new[name].dtype))
        torch.testing.assert_close(new[name][1:], fresh[name][1:])
    for name in new.keys() - set(adapted):
        torch.testing.assert_close(new[name], old[name].to(new[name].dtype))
