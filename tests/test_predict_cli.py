"""unetseg-predict on a folder mixing good and broken images, with a tiny trained checkpoint."""

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage import io as skio

import unetseg.cli.predict
import unetseg.weights
from unetseg.cli.predict import build_parser, main
from unetseg.inference.batch import PredictSummary
from unetseg.models import UNet
from unetseg.synthetic import nuclei_image

REPO = Path(__file__).resolve().parents[1]
TILING = ["--tile-size", "64", "--overlap", "16", "--batch-size", "4", "--device", "cpu"]


def nuclei(shape, seed=0) -> np.ndarray:
    image, _ = nuclei_image(np.random.default_rng(seed), shape)
    return image


GOOD = {  # name -> (height, width)
    "grey.png": (40, 52),
    "calibrated.tif": (44, 50),
    "rgb.png": (36, 48),
    "sub/deeper.png": (40, 40),
    "sub/stack.tif": (30, 34),
}
BROKEN = ("empty.png", "truncated.tif", "text.png", "two_channels.tif")


@pytest.fixture
def tree(tmp_path) -> Path:
    """Good images (8-bit PNG, calibrated 16-bit TIFF, RGB PNG, a sub-folder, a ZYX stack) and broken files."""
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    skio.imsave(root / "grey.png", (nuclei((40, 52)) * 255).astype(np.uint8), check_contrast=False)
    tifffile.imwrite(
        root / "calibrated.tif",
        (nuclei((44, 50), 1) * 4095).astype(np.uint16),
        imagej=True,
        resolution=((5, 1), (5, 1)),
        metadata={"unit": "micron"},
    )
    rgb = np.stack([nuclei((36, 48), seed) for seed in (2, 3, 4)], axis=-1)
    skio.imsave(root / "rgb.png", (rgb * 255).astype(np.uint8), check_contrast=False)
    skio.imsave(root / "sub" / "deeper.png", (nuclei((40, 40), 5) * 255).astype(np.uint8), check_contrast=False)
    stack = np.stack([nuclei((30, 34), seed) for seed in (6, 7)])
    tifffile.imwrite(
        root / "sub" / "stack.tif",
        (stack * 1000).astype(np.uint16),
        imagej=True,
        resolution=((2, 1), (2, 1)),
        metadata={"axes": "ZYX", "unit": "micron", "spacing": 0.75},
    )
    (root / "empty.png").write_bytes(b"")
    tifffile.imwrite(root / "truncated.tif", (nuclei((64, 64), 8) * 4095).astype(np.uint16))
    (root / "truncated.tif").write_bytes((root / "truncated.tif").read_bytes()[:3000])
    (root / "text.png").write_text("not an image\n")
    tifffile.imwrite(root / "two_channels.tif", np.zeros((2, 30, 30), np.uint16), imagej=True, metadata={"axes": "CYX"})
    (root / "notes.txt").write_text("not an image suffix: not an input\n")
    return root


def outputs(root: Path) -> dict[str, Path]:
    return {path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*")) if path.is_file()}


def test_folder_with_broken_files(tree, tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    assert main([str(tree), str(out), "--checkpoint", str(checkpoint), *TILING]) == 1
    captured = capsys.readouterr()

    expected = {name.replace(".png", ".tif") for name in GOOD}
    assert set(outputs(out)) == expected  # one TIFF per good input, sub-folders mirrored, no temporaries
    for name, (height, width) in GOOD.items():
        mask = tifffile.imread(out / name.replace(".png", ".tif"))
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        assert mask.shape == ((2,) if "stack" in name else ()) + (height, width)

    errors = [line for line in captured.err.splitlines() if not line.startswith("warning: ")]  # out-of-domain
    assert len(errors) == len(BROKEN)  # one line each, nothing else
    for name in BROKEN:
        assert sum(line.startswith(f"error: {tree / name}: ") for line in errors) == 1, (name, errors)
    assert any("shape (30, 30, 2)" in line for line in errors if "two_channels" in line), errors
    assert "5 done, 0 skipped (output exists), 4 failed" in captured.out

    with tifffile.TiffFile(out / "calibrated.tif") as tif:
        assert tif.pages.first.tags["XResolution"].value == (5, 1)
        assert tif.imagej_metadata["unit"] == "micron"
    with tifffile.TiffFile(out / "sub" / "stack.tif") as tif:
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["spacing"] == 0.75

    # Resumed: every good output exists and is kept; broken files are tried (and fail) again.
    times = {name: path.stat().st_mtime_ns for name, path in outputs(out).items()}
    assert main([str(tree), str(out), "--checkpoint", str(checkpoint), *TILING]) == 1
    assert "0 done, 5 skipped (output exists), 4 failed" in capsys.readouterr().out
    assert {name: path.stat().st_mtime_ns for name, path in outputs(out).items()} == times

    for path in outputs(out).values():
        path.write_bytes(b"stale")
    assert main([str(tree), str(out), "--checkpoint", str(checkpoint), "--overwrite", *TILING]) == 1
    assert "5 done, 0 skipped (output exists), 4 failed" in capsys.readouterr().out
    assert set(outputs(out)) == expected
    assert all(tifffile.imread(path).dtype == np.uint8 for path in outputs(out).values())


@pytest.mark.parametrize("kind, dtype", [("prob", np.float32), ("labels", np.uint16)])
def test_output_kinds(tree, tmp_path, checkpoint, capsys, kind, dtype):
    for name in BROKEN:
        (tree / name).unlink()
    out = tmp_path / kind
    assert (
        main([str(tree), str(out), "--checkpoint", str(checkpoint), "--output", kind, "--threshold", "0.4", *TILING])
        == 0
    )
    assert all(line.startswith("warning: ") for line in capsys.readouterr().err.splitlines())  # no error
    for name, (height, width) in GOOD.items():
        written = tifffile.imread(out / name.replace(".png", ".tif"))
        assert written.dtype == dtype
        assert written.shape == ((2,) if "stack" in name else ()) + (height, width)
        if kind == "prob":
            assert 0.0 <= written.min() and written.max() <= 1.0


def test_glob_and_single_file(tree, tmp_path, checkpoint, capsys):
    assert (
        main([str(tree), str(tmp_path / "tifs"), "--checkpoint", str(checkpoint), "--glob", "sub/*.tif", *TILING]) == 0
    )
    assert set(outputs(tmp_path / "tifs")) == {"sub/stack.tif"}
    assert main([str(tree / "rgb.png"), str(tmp_path / "one.tif"), "--checkpoint", str(checkpoint), *TILING]) == 0
    assert tifffile.imread(tmp_path / "one.tif").shape == (36, 48)
    assert main([str(tree / "text.png"), str(tmp_path / "folder"), "--checkpoint", str(checkpoint), *TILING]) == 1
    assert f"error: {tree / 'text.png'}: " in capsys.readouterr().err
    assert not (tmp_path / "folder").exists() or outputs(tmp_path / "folder") == {}


def test_usage_errors_exit_2(tree, tmp_path, checkpoint, capsys):
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty"), str(tmp_path / "out"), "--checkpoint", str(checkpoint)]) == 2
    assert "no image files" in capsys.readouterr().err
    assert main([str(tree), str(tmp_path / "out"), "--checkpoint", str(tmp_path / "none.ckpt")]) == 2
    assert "none.ckpt: no such checkpoint file" in capsys.readouterr().err
    assert main([str(tree), str(tree), "--checkpoint", str(checkpoint)]) == 2
    assert "is the INPUT folder" in capsys.readouterr().err
    for arguments, message in (
        ([], "one of the arguments --checkpoint --model is required"),
        (["--checkpoint", str(checkpoint), "--model", "nuclei"], "not allowed with"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([str(tree), str(tmp_path / "out"), *arguments])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_missing_input_is_named(tmp_path, checkpoint, capsys):
    assert main([str(tmp_path / "missing"), str(tmp_path / "out"), "--checkpoint", str(checkpoint)]) == 2
    assert f"INPUT {tmp_path / 'missing'}: no such file or folder" in capsys.readouterr().err


def test_shipped_models(tree, tmp_path, checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(unetseg.weights, "weights_dir", lambda: tmp_path / "weights")
    assert main([str(tree), str(tmp_path / "out"), "--model", "nuclei"]) == 2
    assert "model 'nuclei' is not installed" in capsys.readouterr().err
    (tmp_path / "weights").mkdir()
    os.symlink(checkpoint, tmp_path / "weights" / "nuclei.ckpt")
    assert main([str(tree), str(tmp_path / "out"), "--model", "cells"]) == 2
    assert "unknown model 'cells'; available models: nuclei" in capsys.readouterr().err
    assert main([str(tree), str(tmp_path / "out"), "--model", str(checkpoint)]) == 2  # a file given as a name
    assert (
        f"unknown model '{checkpoint}' (--model takes a shipped model's name; give a checkpoint file with --checkpoint)"
        in capsys.readouterr().err
    )
    assert main([str(tree / "grey.png"), str(tmp_path / "out"), "--model", "nuclei", *TILING]) == 0
    assert (tmp_path / "out" / "grey.tif").is_file()


class Payload:
    """Unpickling this creates a file: what a crafted checkpoint could do with weights_only=False."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_crafted_checkpoint_is_refused_and_never_runs(tree, tmp_path, checkpoint, capsys):
    contents = torch.load(checkpoint, map_location="cpu", weights_only=True)
    contents["state_dict"]["net.stem.body.0.weight"] = Payload(tmp_path / "payload_ran")
    torch.save(contents, tmp_path / "crafted.ckpt")
    assert main([str(tree), str(tmp_path / "out"), "--checkpoint", str(tmp_path / "crafted.ckpt")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'crafted.ckpt'}: refused: the checkpoint holds Python objects" in err
    assert not (tmp_path / "payload_ran").exists()
    assert not (tmp_path / "out").exists()


def test_labels_need_a_foreground_or_boundary_model(tree, tmp_path, checkpoint, capsys):
    contents = torch.load(checkpoint, map_location="cpu", weights_only=True)
    net = UNet(in_channels=1, classes=2, depth=2, width=4)  # a two-class model: class indices, no instances
    contents["hyper_parameters"]["input_spec"] |= {"targets": "classes", "classes": 2}
    contents["hyper_parameters"]["net"]["init_args"]["classes"] = 2
    contents["state_dict"] = {f"net.{key}": value for key, value in net.state_dict().items()}
    torch.save(contents, tmp_path / "classes.ckpt")
    assert (
        main([str(tree), str(tmp_path / "out"), "--checkpoint", str(tmp_path / "classes.ckpt"), "--output", "labels"])
        == 2
    )
    assert "output 'labels' needs a model trained with targets 'foreground' or 'boundary'" in capsys.readouterr().err


def test_help_names_every_option():
    text = build_parser().format_help()
    for option in (
        "--checkpoint",
        "--model",
        "--tile-size",
        "--overlap",
        "--batch-size",
        "--blend",
        "--tta",
        "--output",
        "--threshold",
        "--device",
        "--glob",
        "--overwrite",
        "exit status",
    ):
        assert option in text


@pytest.mark.parametrize("precision, amp", [("auto", None), ("fp32", False), ("bf16", True)])
def test_precision_option_reaches_the_tiling(tmp_path, checkpoint, monkeypatch, precision, amp):
    seen = {}

    def fake_predict_files(model, spec, pairs, settings, **kwargs):
        seen["amp"], seen["compile"] = settings.tiling.amp, settings.tiling.compile
        return PredictSummary()

    monkeypatch.setattr(unetseg.cli.predict, "predict_files", fake_predict_files)
    image = tmp_path / "one.png"
    skio.imsave(image, (nuclei((40, 40)) * 255).astype(np.uint8), check_contrast=False)
    argv = [str(image), str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--precision", precision]
    assert main(argv + TILING) == 0
    assert seen == {"amp": amp, "compile": False}
    assert main(argv + TILING + ["--compile"]) == 0
    assert seen == {"amp": amp, "compile": True}
    with pytest.raises(SystemExit):
        build_parser().parse_args([str(image), "out", "--model", "nuclei", "--precision", "fp16"])
