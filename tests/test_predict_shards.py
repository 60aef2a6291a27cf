"""Sharded batch prediction: several processes split a folder, each output written once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import io as skio

from unetseg.cli.predict import resolve_shard
from unetseg.inference.batch import shard
from unetseg.synthetic import nuclei_image

REPO = Path(__file__).resolve().parents[1]


def test_shards_are_disjoint_and_cover_the_plan():
    pairs = [(Path(f"in/{i}.png"), Path(f"out/{i}.tif")) for i in range(7)]
    shares = [shard(pairs, index, 3) for index in range(3)]
    assert sorted(sum(shares, [])) == sorted(pairs)
    assert [len(share) for share in shares] == [3, 2, 2]
    with pytest.raises(ValueError, match="0 <= index < count"):
        shard(pairs, 3, 3)


def test_shard_from_option_and_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_shard(None) == (0, 1)
    assert resolve_shard("1/4") == (1, 4)
    monkeypatch.setenv("SLURM_PROCID", "2")
    monkeypatch.setenv("SLURM_NTASKS", "3")
    assert resolve_shard(None) == (2, 3)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_shard(None) == (1, 2)  # torchrun first
    for bad in ("2/2", "a/b", "1", "-1/2"):
        with pytest.raises(ValueError, match="--shard"):
            resolve_shard(bad)


def test_two_processes_give_the_masks_of_one(tmp_path, checkpoint):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for index in range(5):
        image, _ = nuclei_image(np.random.default_rng(index), (48, 56))
        folder = root / "sub" if index % 2 else root
        skio.imsave(folder / f"image_{index}.png", (image * 255).astype(np.uint8), check_contrast=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts" / "predict.py"), str(root)]
    options = ["--checkpoint", str(checkpoint), "--output", "prob", "--tile-size", "32", "--overlap", "8"]
    single = subprocess.run([*command, str(tmp_path / "one"), *options], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    ranks = [
        subprocess.Popen(
            [*command, str(tmp_path / "two"), *options],
            env={**env, "RANK": str(rank), "WORLD_SIZE": "2"},
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [process.communicate(timeout=300)[0] for process in ranks]
    assert [process.returncode for process in ranks] == [0, 0]
    assert "3 file(s) (share 0/2)" in logs[0] and "2 file(s) (share 1/2)" in logs[1]
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*.tif"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*.tif"))
    assert one == two and len(one) == 5
    for relative in one:
        np.testing.assert_array_equal(
            tifffile.imread(tmp_path / "one" / relative), tifffile.imread(tmp_path / "two" / relative)
        )
