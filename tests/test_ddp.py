"""configs/ddp.yaml: two CPU processes (DDP over gloo) train through scripts/train.py, as a user would launch them.

Lightning's ddp strategy starts the other ranks by re-running the script, so the run is a
subprocess. `TileProbe`, imported by the ranks from this file, records what each rank saw.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from unetseg.models import UNet
from unetseg.synthetic import make_nuclei_dataset
from unetseg.training.module import SegmentationModule

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 150  # a normal run takes 15-35 s on 2 busy cores; a rank-0-only collective would wait 30 minutes


class TileProbe(Callback):
    """Writes probe_rank<R>.json into the run folder: world size, optimiser steps and a hash of every training tile."""

    def __init__(self):
        self.tiles: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_index):
        self.tiles += [hashlib.sha1(tile.cpu().numpy().tobytes()).hexdigest() for tile in batch["image"]]

    def on_train_end(self, trainer, pl_module):
        record = {"world_size": trainer.world_size, "global_step": trainer.global_step, "tiles": self.tiles}
        (Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json").write_text(json.dumps(record))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One epoch of configs/tiny.yaml + configs/ddp.yaml on 2 CPU processes; returns (run folder, output)."""
    base = tmp_path_factory.mktemp("ddp")
    data = make_nuclei_dataset(base / "data", count=6, shape=(96, 96))
    run_dir = base / "run"
    command = [
        sys.executable,
        "scripts/train.py",
        "--config",
        "configs/tiny.yaml",
        "--config",
        "configs/ddp.yaml",
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.num_nodes",
        "1",
        "--trainer.sync_batchnorm",
        "false",  # torch's SyncBatchNorm refuses CPU tensors
        "--trainer.max_epochs",
        "1",
        "--data.tiles_per_epoch",
        "32",
        "--data.num_workers",
        "0",
        "--trainer.default_root_dir",
        str(run_dir),
        "--data.root",
        str(data),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        f"--trainer.callbacks+={__name__}.TileProbe",
    ]
    env = dict(
        os.environ,
        UNETSEG_CACHE=str(base / "cache"),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])),
    )
    # A new session, so that a hung run is killed with the rank it started.
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(
            f"DDP training did not finish in {TIMEOUT_S} s (a collective called on one rank only?):\n{output[-4000:]}"
        )
    assert process.returncode == 0, output[-4000:]
    return run_dir, output


def read_probes(run_dir: Path) -> list[dict]:
    return [json.loads((run_dir / f"probe_rank{rank}.json").read_text()) for rank in (0, 1)]


def test_two_processes_train_and_the_checkpoint_loads(ddp_run):
    run_dir, output = ddp_run
    assert "distributed_backend=gloo" in output and "Starting with 2 processes" in output
    assert [probe["world_size"] for probe in read_probes(run_dir)] == [2, 2]
    model = SegmentationModule.load_from_checkpoint(run_dir / "checkpoints/best.ckpt")
    assert isinstance(model.net, UNet) and model.hparams["input_spec"]["in_channels"] == 1
    assert torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)["global_step"] == 2


def test_ddp_config_and_its_merge_over_a_model_config(ddp_run):
    ddp = yaml.safe_load((REPO / "configs/ddp.yaml").read_text())
    assert ddp == {
        "trainer": {"accelerator": "gpu", "strategy": "ddp", "devices": "auto", "num_nodes": 1, "sync_batchnorm": True}
    }
    config = yaml.safe_load((ddp_run[0] / "config.yaml").read_text())
    assert config["trainer"]["strategy"] == "ddp" and str(config["trainer"]["devices"]) == "2"
    assert config["model"]["net"]["init_args"]["width"] == 4  # from tiny.yaml


def test_sync_batchnorm_checkpoints_load_into_the_plain_network():
    # sync_batchnorm: true converts the BatchNorm layers; checkpoints must still rebuild the plain UNet.
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(UNet(depth=2, width=4))
    assert sum(isinstance(module, torch.nn.SyncBatchNorm) for module in synced.modules()) == 10
    UNet(depth=2, width=4).load_state_dict(synced.state_dict())  # strict: same keys and shapes


def test_tiles_per_epoch_is_split_across_ranks(ddp_run):
    # tiles_per_epoch 32 over 2 ranks: 16 tiles, 2 batches of 8 per rank, so 2 optimiser steps, not 4.
    for probe in read_probes(ddp_run[0]):
        assert len(probe["tiles"]) == 16 and probe["global_step"] == 2


def test_ranks_draw_different_tiles(ddp_run):
    rank0, rank1 = read_probes(ddp_run[0])
    shared = set(rank0["tiles"]) & set(rank1["tiles"])
    assert not shared, f"{len(shared)} of {len(rank0['tiles'])} tiles were drawn by both ranks"
