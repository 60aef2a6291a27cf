"""Every configs/*.yaml parses with the training CLI and builds what it says (nothing is fitted).

Complete configs (with a model) are parsed and instantiated; overlays such as a DDP config, meant to
follow another `--config`, are parsed on top of configs/tiny.yaml only, as they may ask for hardware.
"""

import importlib

import pytest
import yaml
from conftest import CONFIGS

from unetseg.cli.train import TrainCLI
from unetseg.training.data import SegmentationDataModule
from unetseg.training.module import SegmentationModule

CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


class ParseOnlyCLI(TrainCLI):
    """Parses and validates arguments, instantiates nothing."""

    def instantiate_classes(self) -> None:
        pass


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}, leaving lists (callbacks) whole."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and "class_path" not in value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[path.name for path in CONFIG_FILES])
def test_config_parses(path, tmp_path):
    expected = yaml.safe_load(path.read_text())
    base = [] if "model" in expected else ["--config", str(CONFIGS / "tiny.yaml")]
    cli = ParseOnlyCLI(
        SegmentationModule,
        SegmentationDataModule,
        run=False,
        args=[*base, "--config", str(path), "--data.root", str(tmp_path / "data")],
    )
    config = cli.config.as_dict()
    for key, value in flatten({k: v for k, v in expected.items() if k in ("trainer", "data")}).items():
        if key in ("trainer.callbacks", "data.root"):
            continue
        node = config
        for part in key.split("."):
            node = node[part]
        assert node == value, key


def test_the_shipped_configs_exist():
    assert {"tiny.yaml", "unet.yaml", "smp_unet.yaml"} <= {path.name for path in CONFIG_FILES}


COMPLETE = [path for path in CONFIG_FILES if "model" in yaml.safe_load(path.read_text())]


@pytest.mark.parametrize("path", COMPLETE, ids=[path.name for path in COMPLETE])
def test_complete_config_instantiates(path, tmp_path):
    expected = yaml.safe_load(path.read_text())
    cli = TrainCLI(
        SegmentationModule,
        SegmentationDataModule,
        run=False,
        args=[
            "--config",
            str(path),
            "--data.root",
            str(tmp_path / "data"),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
    )

    net = expected["model"]["net"]
    module_name, _, class_name = net["class_path"].rpartition(".")
    assert isinstance(cli.model.net, getattr(importlib.import_module(module_name), class_name))
    for key, value in net.get("init_args", {}).items():
        assert cli.model.net.config[key] == value, key
    for key, value in expected["model"].items():
        if key != "net":
            assert cli.model.hparams[key] == value, key

    data = cli.datamodule
    assert data.root == str(tmp_path / "data")  # only parsed: setup() never ran, nothing was read
    assert data.split is None
    for key, value in expected["data"].items():
        if key not in ("root", "augmentation", "normalization"):
            assert getattr(data, key) == value, key
    for key, value in expected["data"].get("augmentation", {}).items():
        assert getattr(data.augmentation, key) == value, key
    assert data.in_channels == cli.model.net.config["in_channels"]
    assert data.output_classes == cli.model.classes  # on_fit_start would refuse a mismatch

    trainer = expected["trainer"]
    assert cli.trainer.max_epochs == trainer["max_epochs"]
    assert cli.trainer.default_root_dir == str(tmp_path / "run")
    monitors = {getattr(callback, "monitor", None) for callback in cli.trainer.callbacks}
    assert monitors & {"val/dice", "val/dsb"}  # foreground Dice, or the DSB score for instance models


def test_normalisation_and_augmentation_options_reach_the_input_spec(tmp_path):
    cli = TrainCLI(
        SegmentationModule,
        SegmentationDataModule,
        run=False,
        args=[
            "--config",
            str(CONFIGS / "tiny.yaml"),
            "--data.root",
            str(tmp_path / "data"),
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--data.normalization.low",
            "2.5",
            "--data.normalization.clip",
            "false",
            "--data.augmentation.elastic",
            "0.3",
        ],
    )
    assert cli.datamodule.normalization.low == 2.5 and cli.datamodule.augmentation.elastic == 0.3
    assert cli.datamodule.input_spec.to_dict()["normalization"] == {"low": 2.5, "high": 99.8, "clip": False}


def test_bad_option_value_is_refused_by_name(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ParseOnlyCLI(
            SegmentationModule,
            SegmentationDataModule,
            run=False,
            args=["--config", str(CONFIGS / "tiny.yaml"), "--data.tile_size", "big"],
        )
    assert exit_info.value.code != 0
    assert "tile_size" in capsys.readouterr().err
