"""Shared fixtures: tiny synthetic nuclei datasets in tmp_path, and a private synthetic cache."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import unetseg.runtime.precision
import unetseg.synthetic
from unetseg.cli.train import main as train_main
from unetseg.synthetic import make_nuclei_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def tiny_train_args(root, run_dir, *extra):
    """unetseg-train arguments: configs/tiny.yaml on `root`, 16 tiles per epoch, into `run_dir`, quietly."""
    return [
        "--config",
        str(CONFIGS / "tiny.yaml"),
        "--data.root",
        str(root),
        "--trainer.default_root_dir",
        str(run_dir),
        "--data.tiles_per_epoch",
        "16",
        *QUIET,
        *extra,
    ]


@pytest.fixture(scope="session", autouse=True)
def float32_by_default():
    """The suite gives the same numbers on every CPU: automatic precision is float32 unless a test turns bf16 on."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(unetseg.runtime.precision, "cpu_has_native_bf16", lambda: False)
        yield


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared CPU run faster on one thread than contending for several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny U-Net (depth 2, width 4) trained for one 16-tile epoch by unetseg-train, once per session."""
    base = tmp_path_factory.getbasetemp()
    path = base / "predict_tiny_run" / "checkpoints" / "best.ckpt"
    if not path.is_file():
        data = make_nuclei_dataset(base / "predict_tiny_data", count=4, shape=(96, 96))
        train_main(tiny_train_args(data, path.parents[1], "--trainer.max_epochs", "1", "--trainer.logger", "false"))
    return path


@pytest.fixture
def make_dataset(tmp_path):
    """Factory: write a tiny synthetic nuclei dataset (count pairs, shape) under tmp_path and return its root."""

    def make(name: str = "d", count: int = 6, shape: tuple[int, int] = (96, 96), seed: int = 0) -> Path:
        return make_nuclei_dataset(tmp_path / name, count=count, shape=shape, seed=seed)

    return make


@pytest.fixture(scope="session")
def shared_dataset(tmp_path_factory) -> Path:
    """One read-only tiny dataset (6 pairs of 96x96) for tests that do not modify files."""
    return make_nuclei_dataset(tmp_path_factory.mktemp("shared") / "d", count=6, shape=(96, 96))


@pytest.fixture
def synthetic_cache(tmp_path, monkeypatch) -> Path:
    """Point the embedded dataset's cache (read once at import) to tmp_path, for `root: null` configs."""
    cache = tmp_path / "cache"
    monkeypatch.setattr(unetseg.synthetic, "DEFAULT_CACHE", cache)
    monkeypatch.setenv("UNETSEG_CACHE", str(cache))
    return cache


def write_pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    """Write root/images/<name>.tif and root/masks/<name>.tif (name may hold sub-folders)."""
    for folder, array in (("images", image), ("masks", mask)):
        path = root / folder / f"{name}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, array)
