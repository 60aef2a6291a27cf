"""The README's training path, walked as a new user would: plan a config from a folder, train it, read the
log, resume it. Also the run-folder promises: last.ckpt is the final step, curves follow every validation."""

import csv

import torch
import yaml
from conftest import CONFIGS

from unetseg.cli import plan as plan_cli
from unetseg.cli import train
from unetseg.training import callbacks
from unetseg.training.callbacks import trim_metrics

FAST = ["--data.tiles_per_epoch", "8", "--data.batch_size", "4", "--data.num_workers", "0"]


def val_rows(run_dir):
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("val/dice")]


def test_plan_train_resume(make_dataset, tmp_path, capsys, monkeypatch):
    root = make_dataset(count=6, shape=(96, 96))
    config, run_dir = tmp_path / "configs" / "mine.yaml", tmp_path / "runs" / "mine"
    assert (
        plan_cli.main(
            [
                str(root),
                "--budget",
                "2m",
                "--widths",
                "4",
                "--batch-sizes",
                "4",
                "--out",
                str(config),
                "--run-dir",
                str(run_dir),
            ]
        )
        == 0
    )
    assert f"unetseg-train --config {config}" in capsys.readouterr().out

    draws = []
    monkeypatch.setattr(callbacks, "plot_curves", lambda *args: draws.append(args))
    train.main(["--config", str(config), "--trainer.max_epochs", "2", *FAST])
    log = capsys.readouterr().err
    # The start: what it trains on, where it writes, on what; the end: the outcome and where it is.
    assert "data: 6 image/mask pairs in " + str(root.resolve()) + ": 5 for training, 1 for validation" in log
    assert f"run folder: {run_dir}; device: cpu" in log and "precision" in log
    assert "training: 2 epochs of 2 steps (4 steps in all)" in log
    assert "epoch 1/2  step 2" in log and "epoch 2/2  step 4" in log and "val/dice" in log
    assert "best val/dice " in log and f": {run_dir / 'checkpoints' / 'best.ckpt'}" in log
    assert f"last checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}" in log
    assert f"config: {run_dir / 'config.yaml'}" in log
    assert "\r" not in log and "Tip:" not in log and "GPU available" not in log  # no bar, no noise in a file
    assert len(draws) == 2 + 1  # curves redrawn after each validation, and at the end

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4  # the final step (its periodic save is every 10 steps or more)
    assert last["hyper_parameters"]["net"]["init_args"]["in_channels"] == 1  # linked from data.in_channels
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["in_channels"] == 1

    monkeypatch.undo()
    train.main(["--config", str(config), "--trainer.max_epochs", "3", "--ckpt_path", "last", *FAST])
    log = capsys.readouterr().err
    assert "resuming at step 4" in log and "epoch 3/3  step 6" in log
    assert [int(row["epoch"]) for row in val_rows(run_dir)] == [0, 1, 2]  # the history is kept, not restarted
    assert f"curves: {run_dir / 'curves.png'}" in log and (run_dir / "curves.png").is_file()
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6


def test_last_checkpoint_is_the_final_step_between_periodic_saves(shared_dataset, tmp_path):
    run_dir = tmp_path / "run"
    # tiny.yaml saves last.ckpt every 20 steps; 3 epochs of 2 steps end at step 6, before any periodic save.
    train.main(
        [
            "--config",
            "tiny",
            "--data.root",
            str(shared_dataset),
            "--trainer.default_root_dir",
            str(run_dir),
            "--trainer.max_epochs",
            "3",
            "--data.tiles_per_epoch",
            "16",
        ]
    )
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 6 and last["epoch"] == 3


def test_a_fresh_run_in_an_old_folder_starts_a_new_history(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,val/dice\n0,1,0.5\n1,3,0.6\n2,5,0.7\n")
    trim_metrics(path, before_step=4)  # a resume at step 4 replays what came after
    assert path.read_text().splitlines() == ["epoch,step,val/dice", "0,1,0.5", "1,3,0.6"]
    trim_metrics(path, before_step=0)  # a new run
    assert path.read_text().splitlines() == ["epoch,step,val/dice"]


def test_option_errors_are_one_line(capsys):
    assert train.main(["--config", "tiny", "-q", "--data.in_channels", "2"]) == 1
    assert capsys.readouterr().err == "error: in_channels must be 1 (grey) or 3 (RGB), got 2\n"


def test_demo_shows_progress_and_prints_working_paths(synthetic_cache, tmp_path, monkeypatch, capsys):
    from unetseg.cli import demo

    real_train = demo.train_cli.main
    fast = ["--trainer.max_epochs", "1", "--data.tiles_per_epoch", "8", "--model.net.init_args.width", "4"]
    monkeypatch.setattr(demo.train_cli, "main", lambda argv: real_train([*argv, *fast]))
    assert demo.main(out=str(tmp_path / "demo")) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" in captured.err and "best val/dice" in captured.err  # progress, also without a terminal
    overlays = sorted((tmp_path / "demo" / "predictions").glob("*_overlay.png"))
    assert len(overlays) == 3 and f"overlays:     {overlays[0]}" in captured.out
    (score,) = [line for line in captured.out.splitlines() if "score them:" in line]
    assert score.split()[2].endswith("unetseg-evaluate")


def test_the_log_names_the_metric_the_best_checkpoint_is_chosen_by(make_dataset, tmp_path, capsys):
    """A config that keeps the checkpoint of lowest val/loss (as nuclei.yaml keeps the highest val/dsb):
    the epoch lines and the end summary name val/loss and its best value, not val/dice."""
    config = (CONFIGS / "tiny.yaml").read_text()
    assert "monitor: val/dice, mode: max" in config
    (tmp_path / "loss.yaml").write_text(config.replace("monitor: val/dice, mode: max", "monitor: val/loss, mode: min"))
    run_dir = tmp_path / "run"
    args = ["--config", str(tmp_path / "loss.yaml"), "--data.root", str(make_dataset(count=6, shape=(96, 96)))]
    assert train.main([*args, "--trainer.default_root_dir", str(run_dir), "--trainer.max_epochs", "3", *FAST]) == 0
    log = capsys.readouterr().err
    lowest = min(float(row["val/loss"]) for row in val_rows(run_dir))
    assert f"(best val/loss {lowest:.4f})" in log
    assert f"best val/loss {lowest:.4f}: {run_dir / 'checkpoints' / 'best.ckpt'}" in log
    assert "best val/dice" not in log
