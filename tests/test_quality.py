"""Out-of-domain warnings at prediction, the intensity summary in the input spec, PNG outputs and overlays."""

import numpy as np
import pytest
from skimage import io as skio

from unetseg.cli.predict import main as predict_main
from unetseg.inference.overlay import overlay
from unetseg.io.domain import DomainReport, domain_warnings, intensity_summary
from unetseg.io.normalize import Normalization
from unetseg.spec import InputSpec
from unetseg.synthetic import nuclei_image

TILING = ["--tile-size", "64", "--overlap", "16", "--batch-size", "4", "--device", "cpu"]


def fluorescence(seed: int = 0, shape=(96, 96)) -> np.ndarray:
    image, _ = nuclei_image(np.random.default_rng(seed), shape)
    return (image * 255).astype(np.uint8)  # dark background, bright nuclei


@pytest.fixture(scope="module")
def summary() -> dict:
    images = [fluorescence(seed)[None] for seed in range(6)]
    normalization = Normalization()
    return intensity_summary(images, [normalization.range(image) for image in images], normalization)


def test_images_like_the_training_data_raise_no_warning(summary):
    assert summary["images"] == 6 and summary["median"][1] < 0.3
    assert domain_warnings(fluorescence(7), 1, Normalization(), summary) == []


def test_channels_say_what_was_converted(summary):
    grey, rgb = fluorescence(8), np.stack([fluorescence(9)] * 3, axis=-1)
    (kind, reason), *_ = domain_warnings(grey, 3, Normalization(), {})
    assert kind == "channels" and reason == (
        "has 1 channel(s) but the model was trained on 3: it was given the grey channel repeated 3 times"
    )
    kinds = [kind for kind, _ in domain_warnings(rgb, 1, Normalization(), summary)]
    assert kinds == ["channels"]
    assert "the mean of the RGB channels" in domain_warnings(rgb, 1, Normalization(), summary)[0][1]


def test_grey_into_a_model_trained_on_grey_stored_as_rgb_is_expected():
    rgb_copies = [np.stack([fluorescence(seed)] * 3) for seed in range(4)]  # (3, H, W), equal channels
    normalization = Normalization()
    summary = intensity_summary(rgb_copies, [normalization.range(image) for image in rgb_copies], normalization)
    assert summary["grey"] == 1.0
    assert domain_warnings(fluorescence(5), 3, normalization, summary) == []
    colour = [np.stack([fluorescence(seed), fluorescence(seed + 1), fluorescence(seed + 2)]) for seed in range(4)]
    summary = intensity_summary(colour, [normalization.range(image) for image in colour], normalization)
    assert summary["grey"] == 0.0
    assert [kind for kind, _ in domain_warnings(fluorescence(5), 3, normalization, summary)][:1] == ["channels"]


def test_another_bit_depth_and_another_kind_of_image_are_named(summary):
    sixteen_bit = fluorescence(10).astype(np.uint16) * 200
    ((kind, reason),) = domain_warnings(sixteen_bit, 1, Normalization(), summary)
    assert kind == "intensity" and "another bit depth or exposure" in reason
    bright_field = 255 - fluorescence(11)  # bright background, dark objects: the median moves to ~0.9
    ((kind, reason),) = domain_warnings(bright_field, 1, Normalization(), summary)
    assert kind == "brightness" and "another kind of image" in reason


def test_the_report_warns_once_per_kind(summary, caplog):
    spec = InputSpec(1, intensity=summary)
    report = DomainReport()
    for seed in range(3):
        report.check(f"rgb{seed}.png", np.stack([fluorescence(seed)] * 3, axis=-1), spec)
    assert report.counts == {"channels": 3}
    assert report.summary() == ["2 more input(s) with the same channels warning"]


def test_the_intensity_summary_round_trips_and_old_specs_still_load(summary):
    spec = InputSpec(1, targets="boundary", classes=3, intensity=summary)
    assert InputSpec.from_dict(spec.to_dict()) == spec
    old = {
        "in_channels": 1,
        "normalization": {"low": 1.0, "high": 99.8, "clip": True},
        "targets": "foreground",
        "classes": 1,
    }
    assert InputSpec.from_dict(old).intensity == {} and "intensity" not in InputSpec.from_dict(old).to_dict()
    with pytest.raises(ValueError, match="bad intensity"):
        InputSpec.from_dict({**old, "intensity": [1, 2]})


# --- PNG outputs and overlays ----------------------------------------------------------------------------


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "cells.png"
    skio.imsave(path, fluorescence(3, (80, 90)), check_contrast=False)
    return path


@pytest.mark.parametrize("kind, dtype", [("labels", np.uint16), ("mask", np.uint8)])
def test_png_output_for_masks_and_labels(image_file, tmp_path, checkpoint, kind, dtype):
    out = tmp_path / "out" / "cells_mask.png"
    assert predict_main([str(image_file), str(out), "--checkpoint", str(checkpoint), "--output", kind, *TILING]) == 0
    written = skio.imread(out)
    assert written.shape == (80, 90) and written.dtype == dtype
    tif = tmp_path / "out" / "cells.tif"
    assert predict_main([str(image_file), str(tif), "--checkpoint", str(checkpoint), "--output", kind, *TILING]) == 0
    np.testing.assert_array_equal(written, skio.imread(tif))  # the same prediction, another format


@pytest.mark.parametrize(
    "output, options, message",
    [
        ("p.png", ["--output", "prob"], "PNG holds one plane of 8/16-bit masks or labels, not float probabilities"),
        ("p.jpg", [], "outputs are .tif/.tiff, or .png for masks and labels"),
    ],
)
def test_unwritable_output_names_are_refused(image_file, tmp_path, checkpoint, capsys, output, options, message):
    status = predict_main([str(image_file), str(tmp_path / output), "--checkpoint", str(checkpoint), *options])
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / output).exists()


def test_a_folder_input_needs_an_output_folder(image_file, tmp_path, checkpoint, capsys):
    status = predict_main([str(image_file.parent), str(tmp_path / "masks.png"), "--checkpoint", str(checkpoint)])
    assert status == 2 and "a folder INPUT needs an OUTPUT folder" in capsys.readouterr().err
    assert not (tmp_path / "masks.png").exists()


def test_overlay_draws_the_outlines_on_the_input(image_file, tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    status = predict_main(
        [
            str(image_file),
            str(out),
            "--checkpoint",
            str(checkpoint),
            "--output",
            "labels",
            "--threshold",
            "0.3",
            "--overlay",
            *TILING,
        ]
    )
    assert status == 0 and f"overlays (input with predicted outlines): {out / 'cells_overlay.png'}" in (
        capsys.readouterr().out
    )
    picture, labels = skio.imread(out / "cells_overlay.png"), skio.imread(out / "cells.tif")
    assert picture.shape == (80, 90, 3) and picture.dtype == np.uint8
    # The input with the outlines of exactly these labels (drawing is tested on known regions below).
    np.testing.assert_array_equal(picture, overlay(skio.imread(image_file), labels, "labels"))


def test_the_overlay_path_printed_is_the_one_written_with_several_outputs(image_file, tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    args = [str(image_file), str(out), "--checkpoint", str(checkpoint), "--output", "labels", "prob", "--overlay"]
    assert predict_main([*args, *TILING]) == 0
    assert f"overlays (input with predicted outlines): {out / 'cells_overlay.png'}" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == ["cells_labels.tif", "cells_overlay.png", "cells_prob.tif"]
    labels = skio.imread(out / "cells_labels.tif")  # drawn from the first output asked for
    np.testing.assert_array_equal(
        skio.imread(out / "cells_overlay.png"), overlay(skio.imread(image_file), labels, "labels")
    )


def test_outlines_follow_the_regions():
    image = fluorescence(4, (40, 50))
    labels = np.zeros((40, 50), np.uint16)
    labels[5:15, 5:20], labels[20:30, 30:45] = 1, 2
    picture = overlay(image, labels, "labels")
    yellow = np.all(picture == (255, 255, 0), axis=-1)
    assert yellow.sum() == (2 * 10 + 2 * 15 - 4) + (2 * 10 + 2 * 15 - 4)  # the inner rim of each rectangle
    assert not yellow[labels == 0].any()
    probs = np.zeros((40, 50), np.float32)
    probs[5:15, 5:20] = 0.9
    one = (labels == 1).astype(np.uint8)
    np.testing.assert_array_equal(overlay(image, probs, "prob", threshold=0.5), overlay(image, one, "mask"))
