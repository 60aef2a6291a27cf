"""Instances and scores in 3-D: the watershed of `to_labels` on volumes, metrics on (Z, Y, X) label arrays,
unetseg-evaluate on TIFF stacks and NIfTI, and the small synthetic stack that StarDist ships."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from unetseg.cli.evaluate import main as evaluate_main
from unetseg.evaluation.metrics import as_instances, instance_scores, segmentation_scores
from unetseg.inference.postprocess import peak_footprint, to_labels
from unetseg.io.nifti import write_nifti
from unetseg.training.targets import make_target

pytest.importorskip("nibabel")


def two_touching_balls(shape=(12, 32, 48), spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Two balls of radius 6 (physical) touching along X, as (Z, Y, X) labels 1 and 2."""
    grid = np.stack(np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij"), -1)
    labels = np.zeros(shape, np.int32)
    centre = np.asarray(shape) * np.asarray(spacing) / 2
    for label, dx in ((1, -5.5), (2, 5.5)):
        inside = (((grid - centre - np.asarray([0, 0, dx])) / 6.0) ** 2).sum(-1) <= 1
        labels[inside & (labels == 0)] = label
    return labels


def boundary_probs(labels: np.ndarray) -> np.ndarray:
    """Perfect (background, interior, edge) probabilities of a label volume, as a boundary model would give."""
    target = make_target(labels, "boundary")
    return np.stack([target == k for k in range(3)]).astype(np.float32)


def test_to_labels_separates_touching_objects_in_3d():
    truth = two_touching_balls()
    labels = to_labels(boundary_probs(truth), min_size=5)
    assert labels.shape == truth.shape and labels.max() == 2
    assert instance_scores(labels, truth)["f1"] == 1.0


def test_one_class_watershed_uses_the_voxel_spacing():
    # Thick slices (Z spacing 3): in voxels the balls are flat discs; physically they are round.
    truth = two_touching_balls(shape=(6, 32, 48), spacing=(3.0, 1.0, 1.0))
    probs = (truth > 0)[None].astype(np.float32)
    labels = to_labels(probs, min_size=5, min_distance=3, spacing=(3.0, 1.0, 1.0))
    assert labels.max() == 2
    assert instance_scores(labels, truth)["f1"] == 1.0


def test_peak_footprint_is_shorter_along_thick_axes():
    assert peak_footprint(4, (2.0, 0.5, 0.5)).shape == (3, 9, 9)
    assert peak_footprint(4, None) is None


def test_metrics_match_objects_by_voxel_iou():
    truth = two_touching_balls()
    shifted = np.roll(truth, 1, axis=0)  # one plane off: IoU of each ball well above 0.5
    scores = segmentation_scores(shifted, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (2, 0, 0)
    assert 0.7 < scores["dice"] < 1.0
    merged = (truth > 0).astype(np.uint8)  # one binary mask: the two touching balls are one 6-connected object
    assert as_instances(merged).max() == 1
    assert instance_scores(as_instances(merged), truth)["fn"] >= 1  # at most one ball can match the merged object
    # Objects that touch only along Z in 3-D are separate in 2-D planes but one 3-D component when merged.
    column = np.zeros((4, 5, 5), np.uint8)
    column[:2, 1:4, 1:4], column[2:, 1:4, 1:4] = 1, 2
    assert segmentation_scores(column, column)["f1"] == 1.0
    assert segmentation_scores((column > 0).astype(np.uint8), column)["n_pred"] == 1


def test_evaluate_scores_tiff_stacks_and_nifti(tmp_path, capsys):
    truth = two_touching_balls()
    pred = truth.copy()
    pred[pred == 2] = 0  # one of two objects found
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "a.tif", truth.astype(np.uint16))
    write_nifti(tmp_path / "pred" / "a.nii.gz", pred.astype(np.uint16))
    write_nifti(tmp_path / "gt" / "b.nii.gz", truth.astype(np.uint16))
    tifffile.imwrite(tmp_path / "pred" / "b.tif", truth.astype(np.uint16))
    status = evaluate_main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--json", str(tmp_path / "s.json")])
    assert status == 0, capsys.readouterr().err
    import json

    report = json.loads((tmp_path / "s.json").read_text())
    assert report["images"]["a"]["tp"] == 1 and report["images"]["a"]["fn"] == 1
    assert report["images"]["b"]["f1"] == 1.0
    assert report["summary"]["n_gt"] == 4


def test_evaluate_names_a_volume_of_another_shape(tmp_path, capsys):
    (tmp_path / "gt").mkdir()
    (tmp_path / "pred").mkdir()
    tifffile.imwrite(tmp_path / "gt" / "a.tif", np.zeros((4, 8, 8), np.uint8))
    tifffile.imwrite(tmp_path / "pred" / "a.tif", np.zeros((5, 8, 8), np.uint8))
    assert evaluate_main([str(tmp_path / "pred"), str(tmp_path / "gt")]) == 1
    assert "is (5, 8, 8), GT" in capsys.readouterr().err


def stardist_stack() -> tuple[np.ndarray, np.ndarray]:
    """The synthetic 3-D nuclei stack and labels shipped with StarDist (BSD-3), read from the installed package."""
    stardist = pytest.importorskip("stardist", reason="the stardist package (extra stardist-data) is not installed")
    folder = Path(stardist.__file__).parent / "data" / "images"
    if not (folder / "img3d.tif").is_file():
        pytest.skip("this stardist install has no data/images/img3d.tif")
    return tifffile.imread(folder / "img3d.tif"), tifffile.imread(folder / "mask3d.tif")


def test_stardist_stack_instances_are_recovered_from_boundary_targets():
    image, truth = stardist_stack()
    assert image.shape == truth.shape and image.ndim == 3
    labels = to_labels(boundary_probs(truth), min_size=3)
    scores = instance_scores(labels, truth)
    assert scores["n_gt"] == len(np.unique(truth)) - 1
    assert scores["f1"] > 0.9, scores
    assert segmentation_scores(truth, truth)["f1"] == 1.0


@pytest.mark.parametrize("shape, spacing", [((96, 112), None), ((12, 48, 56), (2.0, 0.5, 0.5))])
def test_one_class_labels_leave_components_under_min_size_out_of_the_peak_search_and_keep_the_objects(shape, spacing):
    """`to_labels` skips components smaller than min_size when it looks for distance maxima (they only make
    objects that are removed); it finds the objects of the search over every component, on noisy
    probabilities with many tiny components beside large touching ones."""
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.measure import label
    from skimage.segmentation import watershed

    from unetseg.inference.postprocess import remove_small

    rng = np.random.default_rng(0)
    probs = ndimage.gaussian_filter(rng.random(shape), 3 if spacing is None else (1, 3, 3))
    probs = (probs - probs.min()) / (probs.max() - probs.min())
    probs = np.clip(probs + 0.35 * (rng.random(shape) > 0.97), 0, 1)[None]  # speckles: tiny components
    foreground = probs[0] > 0.5
    components = label(foreground)
    sizes = np.bincount(components.ravel())[1:]
    assert (sizes < 15).sum() > 50 and (sizes >= 15).sum() >= 1  # both kinds are there
    distance = ndimage.distance_transform_edt(foreground, sampling=spacing)
    footprint = peak_footprint(4, spacing)
    peaks = peak_local_max(distance, min_distance=4, footprint=footprint, labels=components, exclude_border=False)
    markers = np.zeros(shape, dtype=np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    expected = remove_small(watershed(-distance, markers=markers, mask=foreground), 15)
    labels = to_labels(probs, min_size=15, min_distance=4, spacing=spacing)
    assert labels.max() == expected.max() > 3 and np.array_equal(labels > 0, expected > 0)
    # The same objects, one to one; skimage's watershed breaks ties between fronts of equal height by
    # the order pixels entered its queue, which the left-out markers change: a few pixels where two
    # objects meet may go to the other one.
    overlap = np.zeros((labels.max() + 1, expected.max() + 1), dtype=np.int64)
    np.add.at(overlap, (labels.ravel(), expected.ravel()), 1)
    match = overlap[1:, 1:].argmax(axis=1)
    assert len(set(match)) == labels.max()
    moved = (labels > 0).sum() - overlap[1:, 1:].max(axis=1).sum()
    assert moved <= 0.005 * (labels > 0).sum()
