"""Shared fixtures: tiny synthetic nuclei datasets in tmp_path, and a private synthetic cache."""

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from torch import nn

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


def first_channel_model(in_channels: int = 2, dims: int = 2) -> nn.Module:
    """Logits = the first input channel: a 1x1 (1x1x1) convolution with weight 1, bias 0."""
    model = (nn.Conv2d if dims == 2 else nn.Conv3d)(in_channels, 1, kernel_size=1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, 0] = 1.0
    return model


def conv_stack(in_channels: int = 2, classes: int = 1, width: int = 6, seed: int = 0, dims: int = 2) -> nn.Module:
    """Three random 3x3 (3x3x3) convolutions: every output pixel sees exactly 3 pixels around it."""
    torch.manual_seed(seed)
    conv = nn.Conv2d if dims == 2 else nn.Conv3d
    return nn.Sequential(
        conv(in_channels, width, 3, padding=1),
        nn.Tanh(),
        conv(width, width, 3, padding=1),
        nn.Tanh(),
        conv(width, classes, 3, padding=1),
    )


def same_objects(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the labels a and b hold the same objects, whatever their numbers."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))
