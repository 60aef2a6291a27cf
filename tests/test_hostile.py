"""Hostile inputs and faults (issue 9): one regression test per numbered defect, in order.

Each test reproduces the defect's case and asserts the fixed behaviour: no silent garbage, no
code or huge allocations from checkpoints, no lost or broken checkpoints and outputs.
"""

import csv
import errno
import json
import logging
import os
import shutil
import sys

import lightning.pytorch as pl
import numpy as np
import pytest
import tifffile
import torch
from conftest import CONFIGS, tiny_train_args
from PIL import Image
from skimage import io as skio

import unetseg.models.checkpoint
from unetseg.cli import evaluate as evaluate_cli
from unetseg.cli import export as export_cli
from unetseg.cli import predict as predict_cli
from unetseg.cli import train as train_cli
from unetseg.evaluation import evaluate as evaluation
from unetseg.inference.batch import plan_outputs
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_image
from unetseg.io import ImageReadError, Normalization, find_images, open_image, read_image, read_labels
from unetseg.io.source import check_pixels
from unetseg.models import UNet
from unetseg.models.checkpoint import CheckpointError, checked_net_description, load_net_weights
from unetseg.synthetic import nuclei_image
from unetseg.training.data import load_sample
from unetseg.training.module import SegmentationModule
from unetseg.training.safety import AtomicCheckpointIO, FiniteLoss, NonFiniteTrainingError

TILING = ["--tile-size", "64", "--overlap", "16", "--batch-size", "4", "--device", "cpu", "-q"]


def nuclei(shape, seed=0) -> np.ndarray:
    image, _ = nuclei_image(np.random.default_rng(seed), shape)
    return image.astype(np.float32)


def finite_checkpoint(path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())


# --- 1. One NaN pixel emptied the whole prediction ----------------------------------------------------


def test_1_nan_and_inf_pixels_do_not_empty_the_prediction_and_are_named(checkpoint, tmp_path, capsys):
    model, spec = load_predictor(checkpoint)
    clean = nuclei((96, 96)) * 1000
    settings = PredictSettings(output="prob", tiling=predict_cli.TilingConfig(tile_size=64, overlap=16))
    expected = predict_image(model, spec, clean, settings)
    broken = clean.copy()
    broken[10, 10] = np.nan
    broken[60:90, 60:90] = np.inf
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "nan.tif", broken)
    arguments = [str(folder), str(tmp_path / "out"), "--checkpoint", str(checkpoint), *TILING, "--output", "prob"]
    status = predict_cli.main(arguments)
    assert status == 0
    probs = tifffile.imread(tmp_path / "out" / "nan.tif")
    assert np.isfinite(probs).all()
    # Away from the broken pixels (beyond the tiny net's receptive field) the prediction is the clean one.
    np.testing.assert_allclose(probs[30:50, 0:40], expected[30:50, 0:40], atol=1e-4)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(folder / "nan.tif") in warnings[0] and "NaN or infinite" in warnings[0]
    assert "901 of 9216" in warnings[0]  # 1 NaN + 30 x 30 Inf


def test_1_training_data_with_nan_pixels_warns_naming_the_file(tmp_path, caplog):
    image = nuclei((48, 48)) * 100
    image[5, 5] = np.nan
    tifffile.imwrite(tmp_path / "image.tif", image)
    tifffile.imwrite(tmp_path / "mask.tif", (image > 50).astype(np.uint8))
    with caplog.at_level(logging.WARNING, logger="unetseg"):
        sample = load_sample(tmp_path / "image.tif", tmp_path / "mask.tif", 1, Normalization())
    assert [str(tmp_path / "image.tif") in record.getMessage() for record in caplog.records] == [True]
    assert all(np.isfinite(sample.value_range))
    assert np.isfinite(Normalization().apply(sample.image, sample.value_range)).all()


# --- 2. Training saved NaN garbage as best.ckpt; NaN checkpoints predicted silently --------------------


def test_2_diverging_training_exits_nonzero_and_writes_no_non_finite_checkpoint(shared_dataset, tmp_path, capsys):
    run_dir = tmp_path / "run"
    status = train_cli.main(tiny_train_args(shared_dataset, run_dir, "--model.lr", "1e6", "--trainer.max_epochs", "3"))
    assert status == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error:") and ("NaN" in error or "nan" in error)
    assert "Traceback" not in capsys.readouterr().err
    for path in (run_dir / "checkpoints").glob("*.ckpt") if (run_dir / "checkpoints").is_dir() else []:
        assert finite_checkpoint(path), path


def test_2_finite_loss_stops_at_the_first_nan_loss_before_its_backward_pass(tmp_path):
    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))

        def training_step(self, batch, batch_index):
            loss = (self.weight * batch["image"]).sum()
            return loss * torch.nan if self.global_step == 3 else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    items = [{"image": torch.ones(1), "name": f"cell_{index // 2}"} for index in range(20)]
    data = torch.utils.data.DataLoader(items, batch_size=2)
    module = Module()
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[FiniteLoss()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(
        NonFiniteTrainingError, match=r"loss is nan at step 3 \(epoch 0, batch 3 of the epoch, tiles from cell_3\)"
    ):
        trainer.fit(module, data)
    assert torch.isfinite(module.weight).all() and module.weight.item() == pytest.approx(1 - 3 * 0.2)


@pytest.fixture
def nan_checkpoint(checkpoint, tmp_path):
    content = torch.load(checkpoint, map_location="cpu", weights_only=True)
    name = next(key for key, value in content["state_dict"].items() if value.is_floating_point())
    content["state_dict"][name] = content["state_dict"][name].clone().fill_(float("nan"))
    path = tmp_path / "nan.ckpt"
    torch.save(content, path)
    return path


def test_2_checkpoints_with_nan_weights_are_refused_by_predict_and_export(nan_checkpoint, tmp_path, capsys):
    image = tmp_path / "x.png"
    skio.imsave(image, (nuclei((40, 40)) * 255).astype(np.uint8), check_contrast=False)
    assert predict_cli.main([str(image), str(tmp_path / "out"), "--checkpoint", str(nan_checkpoint), *TILING]) == 2
    assert export_cli.main([str(nan_checkpoint), str(tmp_path / "nan.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("hold NaN or infinite values") == 2 and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="NaN"):
        load_net_weights(UNet(in_channels=1, classes=1, depth=2, width=4), nan_checkpoint)


def test_2_export_self_check_fails_on_nan(tmp_path):
    pytest.importorskip("onnxruntime")
    from unetseg.export import export_net, max_abs_difference

    net = UNet(in_channels=1, classes=1, depth=2, width=4).eval()
    path = export_net(net, tmp_path / "m.onnx", "onnx")
    broken = UNet(in_channels=1, classes=1, depth=2, width=4).eval()
    with torch.no_grad():
        broken.head.weight.fill_(float("nan"))
    assert max_abs_difference(path, broken, [(32, 32)]) == float("inf")


# --- 3. Checkpoints chose what got imported and how much was allocated ---------------------------------


def crafted_checkpoint(path, class_path, **init_args):
    torch.save(
        {"state_dict": {}, "hyper_parameters": {"net": {"class_path": class_path, "init_args": init_args}}}, path
    )
    return path


def test_3_no_checkpoint_imports_a_module_it_names(tmp_path, monkeypatch, capsys):
    (tmp_path / "evilmod.py").write_text(
        f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\nimport torch\nclass Net(torch.nn.Module): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    path = crafted_checkpoint(tmp_path / "evil.ckpt", "evilmod.Net")
    with pytest.raises(CheckpointError, match="not one of unetseg's networks"):
        SegmentationModule.load_from_checkpoint(path)
    assert export_cli.main([str(path), str(tmp_path / "evil.onnx")]) == 2
    assert predict_cli.main([str(path), str(tmp_path / "out"), "--checkpoint", str(path)]) == 2
    assert "evilmod" not in sys.modules and not (tmp_path / "ran").exists()
    linear = crafted_checkpoint(tmp_path / "linear.ckpt", "torch.nn.Linear", in_features=60000, out_features=60000)
    with pytest.raises(CheckpointError, match="not one of unetseg's networks"):
        SegmentationModule.load_from_checkpoint(linear)


@pytest.mark.parametrize("argument, value", [("width", 6000), ("width", 30000), ("depth", 40), ("in_channels", -1)])
def test_3_network_arguments_out_of_bounds_are_refused_before_building(tmp_path, argument, value):
    path = crafted_checkpoint(tmp_path / "big.ckpt", "unetseg.models.UNet", **{argument: value})
    with pytest.raises(CheckpointError, match=f"{argument}={value} is outside"):
        SegmentationModule.load_from_checkpoint(path)
    with pytest.raises(CheckpointError, match=f"{argument}={value} is outside"):
        unetseg.models.checkpoint.load_net(path)


def test_3_checkpoints_never_download_encoder_weights(tmp_path):
    description = {"class_path": "unetseg.models.SMPUnet", "init_args": {"encoder_weights": "imagenet"}}
    assert checked_net_description(description, "x.ckpt")["init_args"]["encoder_weights"] is None


def test_3_pretrained_weights_are_read_as_data(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"state_dict": Payload()}, tmp_path / "pickle.ckpt")
    with pytest.raises(CheckpointError, match="holds Python objects"):
        load_net_weights(UNet(in_channels=1, classes=1, depth=2, width=4), tmp_path / "pickle.ckpt")
    (tmp_path / "random.ckpt").write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as error:
        load_net_weights(UNet(in_channels=1, classes=1, depth=2, width=4), tmp_path / "random.ckpt")
    assert "Python objects" not in str(error.value)  # 11: random bytes are not "Python objects"


# --- 4. last.ckpt destroyed by a copy across filesystems ------------------------------------------------


def test_4_checkpoints_are_written_beside_the_target_fsynced_and_renamed(tmp_path, monkeypatch):
    target = tmp_path / "run" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 1}, target)
    renames, syncs = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), real_replace(src, dst))[1])
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(fd), real_fsync(fd))[1])
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}, "global_step": 2}, target)
    assert len(renames) == 1 and os.path.dirname(renames[0][0]) == str(target.parent) and syncs
    assert torch.load(target, weights_only=True)["global_step"] == 2

    def full_disk(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(OSError, match="last.ckpt: cannot write the checkpoint .No space left on device.; the previous"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, target)

    assert sorted(path.name for path in target.parent.iterdir()) == ["last.ckpt"]
    assert torch.load(target, weights_only=True)["global_step"] == 2


def test_4_train_writes_checkpoints_through_the_atomic_writer(shared_dataset, tmp_path, monkeypatch):
    built = []

    class Capturing(train_cli.TrainCLI):
        def __init__(self, *args, **kwargs):
            built.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(train_cli, "TrainCLI", Capturing)
    assert train_cli.main(tiny_train_args(shared_dataset, tmp_path / "run", "--trainer.fast_dev_run", "true")) == 0
    assert isinstance(built[0].trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(callback, FiniteLoss) for callback in built[0].trainer.callbacks)


# --- 5. TIFF decompression bombs ------------------------------------------------------------------------


def bomb(path, height, width, dtype=np.uint8):
    """A small deflate TIFF whose header then claims height x width pixels."""
    tifffile.imwrite(path, np.zeros((64, 64), dtype), compression="zlib", rowsperstrip=64, metadata=None)
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        tags["ImageWidth"].overwrite(width)
        tags["ImageLength"].overwrite(height)
        tags["RowsPerStrip"].overwrite(height)
    return path


@pytest.mark.parametrize("height, width, dtype", [(50000, 50000, np.uint8), (100000, 100000, np.float32)])
def test_5_decompression_bombs_are_refused_from_the_header(checkpoint, tmp_path, capsys, height, width, dtype):
    folder = tmp_path / "in"
    folder.mkdir()
    path = bomb(folder / "bomb.tif", height, width, dtype)
    assert path.stat().st_size < 10_000
    with pytest.raises(ImageReadError, match="more than the limit"):
        open_image(path)
    with pytest.raises(ImageReadError, match="more than the limit"):
        read_image(path)
    skio.imsave(folder / "good.png", (nuclei((40, 40)) * 255).astype(np.uint8), check_contrast=False)
    assert predict_cli.main([str(folder), str(tmp_path / "out"), "--checkpoint", str(checkpoint), *TILING]) == 1
    captured = capsys.readouterr()
    assert "bomb.tif: claims" in captured.err and "1 done" in captured.out and "1 failed" in captured.out


def test_5_the_cap_admits_30000_squared_rgb_replaces_pillows_and_is_configurable(checkpoint, tmp_path, monkeypatch):
    check_pixels(tmp_path / "big.tif", (30000, 30000, 3), 3, predict_cli.DEFAULT_MAX_PIXELS)
    with pytest.raises(ImageReadError, match="refused before decoding"):
        check_pixels(tmp_path / "big.tif", (40000, 40000, 3), 3, predict_cli.DEFAULT_MAX_PIXELS)
    skio.imsave(tmp_path / "x.png", (nuclei((40, 40)) * 255).astype(np.uint8), check_contrast=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow's own cap would refuse this 40 x 40 image
    assert read_image(tmp_path / "x.png").shape == (40, 40)
    arguments = [str(tmp_path / "x.png"), str(tmp_path / "out"), "--checkpoint", str(checkpoint), *TILING]
    assert predict_cli.main([*arguments, "--max-pixels", "1000"]) == 1
    assert predict_cli.main(arguments) == 0


# --- 6. A stale best.ckpt after a kill and --ckpt_path last ---------------------------------------------


def test_6_a_restarted_run_replaces_best_ckpt_instead_of_versioning_it(shared_dataset, tmp_path):
    run_dir = tmp_path / "run"
    assert train_cli.main(tiny_train_args(shared_dataset, run_dir, "--trainer.max_epochs", "1")) == 0
    best = run_dir / "checkpoints" / "best.ckpt"
    (run_dir / "checkpoints" / "last.ckpt").unlink()  # killed after best.ckpt, before the first last.ckpt
    os.utime(best, ns=(0, 0))
    assert (
        train_cli.main(tiny_train_args(shared_dataset, run_dir, "--trainer.max_epochs", "1", "--ckpt_path", "last"))
        == 0
    )
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert best.stat().st_mtime_ns > 0  # written by the rerun


# --- 7. SIGBUS on a full disk with memory-mapped outputs -------------------------------------------------


def test_7_a_full_disk_fails_one_file_cleanly_and_the_rest_still_run(checkpoint, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a", "b"):
        skio.imsave(folder / f"{name}.png", (nuclei((40, 40)) * 255).astype(np.uint8), check_contrast=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".b.k3x_9q2z.tmp.tif").write_bytes(b"left by a SIGKILL")  # 11: stale temporaries are removed
    real = os.posix_fallocate

    def fallocate(fd, offset, length):
        if os.readlink(f"/proc/self/fd/{fd}").startswith(str(out / ".a.")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, length)

    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    assert predict_cli.main([str(folder), str(out), "--checkpoint", str(checkpoint), *TILING]) == 1
    captured = capsys.readouterr()
    assert "a.png: cannot reserve" in captured.err and "No space left on device" in captured.err
    assert "1 done" in captured.out and "1 failed" in captured.out
    assert sorted(path.name for path in out.iterdir()) == ["b.tif"]  # no temporary file left, stale one gone


# --- 8. An input destroyed in file mode ------------------------------------------------------------------


def test_8_file_mode_never_writes_over_an_input(checkpoint, tmp_path, capsys):
    skio.imsave(tmp_path / "x.png", (nuclei((40, 40)) * 255).astype(np.uint8), check_contrast=False)
    own = (nuclei((40, 40), 1) * 60000).astype(np.uint16)
    tifffile.imwrite(tmp_path / "x.tif", own)
    for extra in ([], ["--overwrite"]):
        assert predict_cli.main([str(tmp_path / "x.png"), str(tmp_path), "--checkpoint", str(checkpoint), *extra]) == 2
    assert "may be one of your images" in capsys.readouterr().err
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "x.tif"), own)


def test_8_11_output_a_parent_of_input_plans_the_files_and_never_an_input(tmp_path):
    inputs = tmp_path / "in"
    (inputs / "in").mkdir(parents=True)
    tifffile.imwrite(inputs / "a.tif", np.zeros((8, 8), np.uint8))
    assert [target for _, target in plan_outputs(inputs, tmp_path)] == [tmp_path / "a.tif"]  # not "no image files"
    tifffile.imwrite(inputs / "in" / "a.tif", np.zeros((8, 8), np.uint8))  # its output would be in/a.tif: an input
    with pytest.raises(ValueError, match="is an input file"):
        plan_outputs(inputs, tmp_path)


# --- 9. Evaluate cut labels to int32 ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype, big", [(np.uint64, 2**32 + 1), (np.uint32, 2**31 + 5), (np.uint64, 2**64 - 1)])
def test_9_evaluate_keeps_wide_labels_exact(tmp_path, capsys, dtype, big):
    labels = np.zeros((32, 32), dtype)
    labels[2:10, 2:10] = 1
    labels[20:30, 20:30] = big
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "a.tif", labels)
    assert read_labels(tmp_path / "gt" / "a.tif").max() == big
    status = evaluate_cli.main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--json", str(tmp_path / "r.json")])
    assert status == 0
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert summary["f1"] == 1.0 and summary["n_gt"] == 2 and summary["tp"] == 2


def test_9_evaluate_reports_a_pair_it_cannot_score_and_scores_the_rest(tmp_path, capsys, monkeypatch):
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        for name in ("a", "b"):
            tifffile.imwrite(tmp_path / folder / f"{name}.tif", np.eye(16, dtype=np.uint8))
    real = evaluation.segmentation_scores
    calls = []

    def scores(pred, gt):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("labels must not be negative")
        return real(pred, gt)

    monkeypatch.setattr(evaluation, "segmentation_scores", scores)
    assert evaluate_cli.main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 1
    captured = capsys.readouterr()
    assert "a.tif: cannot score" in captured.err and "mean of 1 images" in captured.out


# --- 10. JPEG masks accepted silently ---------------------------------------------------------------------


def test_10_jpeg_masks_are_refused_with_the_reason(tmp_path, capsys):
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    skio.imsave(tmp_path / "m.jpg", mask, check_contrast=False)
    with pytest.raises(ImageReadError, match="JPEG compression is lossy"):
        read_labels(tmp_path / "m.jpg")
    tifffile.imwrite(tmp_path / "p.tif", mask)
    assert evaluate_cli.main([str(tmp_path / "p.tif"), str(tmp_path / "m.jpg")]) == 1
    assert "lossy" in capsys.readouterr().err


# --- 11. Smaller defects ----------------------------------------------------------------------------------


def test_11_resume_keeps_the_metrics_history(shared_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = ["--trainer.logger", "true", "--trainer.log_every_n_steps", "1"]
    assert train_cli.main(tiny_train_args(shared_dataset, run_dir, "--trainer.max_epochs", "1", *args)) == 0
    first = (run_dir / "metrics.csv").read_text().splitlines()
    resumed = tiny_train_args(shared_dataset, run_dir, "--trainer.max_epochs", "2", "--ckpt_path", "last", *args)
    assert train_cli.main(resumed) == 0
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    epochs = {row["epoch"] for row in csv.DictReader(rows)}
    assert epochs == {"0", "1"} and len(rows) > len(first)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--data.tile_size", "0", "data.tile_size must be a positive"),
        ("--data.tiles_per_epoch", "0", "tiles_per_epoch must be a positive"),
        ("--data.tiles_per_epoch", "4", "must be at least data.batch_size"),
    ],
)
def test_11_bad_training_options_are_one_line_errors(shared_dataset, tmp_path, capsys, option, value, message):
    assert train_cli.main(tiny_train_args(shared_dataset, tmp_path / "run", option, value)) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ValueError, match=message):
        train_cli.main(tiny_train_args(shared_dataset, tmp_path / "run", option, value, "-v"))


def test_11_training_data_errors_are_one_line_naming_the_file(shared_dataset, tmp_path, capsys):
    root = tmp_path / "d"
    shutil.copytree(shared_dataset, root)
    mask = sorted((root / "masks").iterdir())[0]
    mask.write_bytes(b"not a tiff")
    assert train_cli.main(tiny_train_args(root, tmp_path / "run", "--trainer.fast_dev_run", "true")) == 1
    err = capsys.readouterr().err
    assert f"{mask}: cannot read image" in err and "Traceback" not in err


def test_11_symbolic_link_loops_are_named(tmp_path, caplog):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((8, 8), np.uint8))
    (tmp_path / "loop.tif").symlink_to(tmp_path / "loop.tif")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "missing.png")
    with caplog.at_level(logging.WARNING, logger="unetseg"):
        assert list(find_images(tmp_path)) == ["a"]
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "loop.tif: skipped" in messages and "dangling.png: skipped" in messages


@pytest.mark.parametrize("size", ["0", "-2.5"])
def test_11_bad_ome_pixel_size_does_not_make_an_image_unreadable(tmp_path, caplog, size):
    path = tmp_path / "ome.tif"
    tifffile.imwrite(path, np.ones((16, 16), np.uint16), ome=True, metadata={"PhysicalSizeX": 1.0})
    with tifffile.TiffFile(path, mode="r+b") as tif:
        description = tif.pages[0].tags["ImageDescription"]
        description.overwrite(description.value.replace('PhysicalSizeX="1.0"', f'PhysicalSizeX="{size}"'))
    with caplog.at_level(logging.WARNING, logger="unetseg"):
        image = open_image(path)
    assert image.planes.shape == (1, 16, 16) and image.calibration.resolution is None
    assert "pixel size metadata ignored" in caplog.text


@pytest.mark.parametrize("tile", ["1", "8", "100000"])
def test_11_tile_sizes_are_bounded(tile, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict_cli.build_parser().parse_args(["in", "out", "--model", "nuclei", "--tile-size", tile])
    assert exit_info.value.code == 2 and "must be from 16 to 8192" in capsys.readouterr().err


def test_11_evaluate_scores_zyx_stacks_as_predict_writes_them(tmp_path, capsys):
    stack = np.zeros((5, 24, 24), np.uint16)
    stack[1:4, 4:12, 4:12] = 1
    stack[0:2, 16:22, 16:22] = 2
    for folder in ("pred", "gt"):
        (tmp_path / folder).mkdir()
        tifffile.imwrite(tmp_path / folder / "s.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    assert evaluate_cli.main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 0
    assert "mean of 1 images" in capsys.readouterr().out


def test_11_predict_usage_errors_are_one_line_with_the_traceback_behind_v(tmp_path, capsys):
    arguments = [str(tmp_path / "missing"), str(tmp_path / "out"), "--model", "nuclei"]
    assert predict_cli.main(arguments) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert predict_cli.main([*arguments, "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_11_atomic_outputs_leave_nothing_behind_on_failure(tmp_path, monkeypatch):
    from unetseg.io.tiff import write_tiff

    write_tiff(tmp_path / "x.tif", np.ones((4, 4), np.uint8))

    def dies_half_way(path, array, **kwargs):
        open(path, "wb").write(b"II*\x00")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", dies_half_way)
    with pytest.raises(OSError, match="No space"):
        write_tiff(tmp_path / "x.tif", np.zeros((4, 4), np.uint8))
    assert [path.name for path in tmp_path.iterdir()] == ["x.tif"]
    monkeypatch.undo()
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "x.tif"), 1)


def test_11_evaluate_reads_a_grey_mask_stored_as_three_equal_channels_as_2d(tmp_path):
    mask = np.zeros((24, 24), np.uint8)
    mask[4:12, 4:12] = 1
    tifffile.imwrite(tmp_path / "rgb.tif", np.stack([mask] * 3, axis=-1), photometric="minisblack")
    tifffile.imwrite(tmp_path / "stack.tif", np.stack([mask] * 3), imagej=True, metadata={"axes": "ZYX"})
    np.testing.assert_array_equal(read_labels(tmp_path / "rgb.tif", stack=True), mask)
    assert read_labels(tmp_path / "stack.tif", stack=True).shape == (3, 24, 24)


def test_6_configs_without_the_option_never_version_checkpoint_names(shared_dataset, tmp_path):
    config = (CONFIGS / "tiny.yaml").read_text()
    assert "enable_version_counter" not in config  # unetseg-train sets it, as for a config of unetseg-plan or a user
    (tmp_path / "c.yaml").write_text(config)
    run_dir = tmp_path / "run"
    args = ["--config", str(tmp_path / "c.yaml"), *tiny_train_args(shared_dataset, run_dir)[2:]]
    assert train_cli.main([*args, "--trainer.max_epochs", "1"]) == 0
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    assert train_cli.main([*args, "--trainer.max_epochs", "1", "--ckpt_path", "last"]) == 0
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
