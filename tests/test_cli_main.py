"""`python -m unetseg` dispatch, packaged configs by name, and the layout rules of the package."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from unetseg.cli import COMMANDS
from unetseg.cli.train import packaged_configs, resolve_config, resolve_configs

REPO = Path(__file__).resolve().parents[1]


def test_module_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "unetseg", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert {"plan", "train", "predict", "evaluate", "tune", "export", "demo"} <= set(COMMANDS)
    for name in COMMANDS:
        assert f"  {name} " in result.stdout


def test_unknown_subcommand_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "unetseg", "fly"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown subcommand 'fly'" in result.stderr


def test_packaged_configs_resolve_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = packaged_configs()
    assert {"tiny", "demo", "unet", "smp_unet", "nuclei", "ddp"} <= configs.keys()
    assert resolve_config("tiny") == str(configs["tiny"]) and Path(resolve_config("tiny.yaml")).is_file()
    (tmp_path / "mine.yaml").write_text("seed_everything: 1\n")
    assert resolve_config("mine.yaml") == "mine.yaml"  # a file beats a name
    assert resolve_configs(["--config", "tiny", "--config=demo", "--data.root", "x"]) == [
        "--config",
        str(configs["tiny"]),
        f"--config={configs['demo']}",
        "--data.root",
        "x",
    ]
    with pytest.raises(SystemExit, match="--config nope: no such file, and not a packaged config"):
        resolve_config("nope")


def test_top_level_configs_folder_is_the_packaged_one():
    assert sorted(p.name for p in (REPO / "configs").glob("*.yaml")) == sorted(
        p.name for p in (REPO / "unetseg" / "configs").glob("*.yaml")
    )


def test_torch_load_lives_in_one_module():
    users = sorted(
        str(path.relative_to(REPO)) for path in (REPO / "unetseg").rglob("*.py") if "torch.load(" in path.read_text()
    )
    assert users == ["unetseg/models/checkpoint.py"]


def test_every_cli_module_runs_as_a_script():
    for module, _ in COMMANDS.values():
        source = (REPO / (module.replace(".", "/") + ".py")).read_text()
        assert 'if __name__ == "__main__":' in source, module


def test_prediction_path_imports_no_training_stack():
    code = (
        "import sys, unetseg.cli.predict, unetseg.export.onnx; "
        "print(sorted(m for m in ('lightning', 'torchmetrics', 'segmentation_models_pytorch', 'albumentations') "
        "if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def unetseg_imports(path: Path) -> set[str]:
    """The unetseg modules a source file imports (absolute imports, as the package writes them)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("unetseg"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("unetseg"))
    return names


ABOVE_RUNTIME = (
    "unetseg.io",
    "unetseg.training",
    "unetseg.inference",
    "unetseg.evaluation",
    "unetseg.planning",
    "unetseg.export",
    "unetseg.cli",
)


@pytest.mark.parametrize(
    ("layer", "forbidden", "allowed"),
    [
        ("runtime", ABOVE_RUNTIME, ()),
        ("io", ABOVE_RUNTIME[1:] + ("unetseg.models",), ()),
        # models write checkpoints atomically, and read nothing else of files
        ("models", ABOVE_RUNTIME, ("unetseg.io.files",)),
        ("inference", ("unetseg.training", "unetseg.evaluation", "unetseg.planning", "unetseg.cli"), ()),
        # training validates with the instance post-processing and its scores, and nothing else of prediction
        (
            "training",
            ("unetseg.cli", "unetseg.inference", "unetseg.planning", "unetseg.evaluation"),
            ("unetseg.inference.postprocess", "unetseg.evaluation.metrics"),
        ),
        ("evaluation", ("unetseg.cli", "unetseg.training", "unetseg.planning"), ()),
        ("export", ("unetseg.cli", "unetseg.training", "unetseg.planning", "unetseg.evaluation"), ()),
        ("planning", ("unetseg.cli",), ()),
        # the napari plugin is an entry point beside the CLI: it calls the layers below, never the CLI
        ("napari", ("unetseg.cli",), ()),
        # block-wise prediction on a cluster: built on prediction and io, used only by the CLI
        ("distributed", ("unetseg.cli", "unetseg.training", "unetseg.planning", "unetseg.evaluation"), ()),
    ],
)
def test_imports_flow_one_way(layer, forbidden, allowed):
    offenders = {
        str(path.relative_to(REPO)): sorted(
            name
            for name in unetseg_imports(path)
            if name.startswith(forbidden) and not (allowed and name.startswith(allowed))
        )
        for path in (REPO / "unetseg" / layer).rglob("*.py")
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_leaf_modules_import_no_unetseg_layer_above_them():
    for leaf in ("spec.py", "runtime/precision.py", "runtime/logs.py"):
        names = unetseg_imports(REPO / "unetseg" / leaf)
        assert not any(name.startswith(("unetseg.training", "unetseg.inference", "unetseg.cli")) for name in names), (
            leaf
        )
