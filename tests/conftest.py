"""Shared fixtures: tiny synthetic nuclei datasets in tmp_path, and a private synthetic cache."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

import unetseg.synthetic
from unetseg.synthetic import make_nuclei_dataset

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


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
