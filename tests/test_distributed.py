"""Block-wise prediction on a Dask cluster (`unetseg.distributed`, `unetseg-predict --dask`) against single-machine
runs: a 2048 x 2048 OME-Zarr of synthetic nuclei in 512 chunks and a 3-D OME-Zarr volume on `local:2` (labels
equal up to renumbering, probabilities within 1e-6), a real receptive field (a U-Net) seamless across blocks,
a worker killed by its pid mid-run, an interrupted run resumed, folders file by file, and the default path
never importing dask.

The models are 1x1 convolutions (and one tiny U-Net), so the two CPU workers stay fast.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage
from torch import nn

from unetseg.inference.pipeline import PredictSettings, predict_file
from unetseg.inference.postprocess import to_labels
from unetseg.inference.tiling import TilingConfig, tile_starts
from unetseg.inference.volume import VolumeTiling
from unetseg.io.source import Calibration, spacing_calibration
from unetseg.spec import InputSpec

pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")

from unetseg.distributed import connect, predict_blocks, predict_on_cluster, use_model  # noqa: E402
from unetseg.distributed.geometry import BlockGrid, tile_span  # noqa: E402
from unetseg.distributed.merge import face_pairs, face_strips, local_ids, merge_labels  # noqa: E402

KINDS = ("mask", "prob", "labels")
TILING = TilingConfig(256, 64, amp=False)
SETTINGS = PredictSettings(output=KINDS, tiling=TILING, format="ome-zarr")
REFERENCE = PredictSettings(output=KINDS, tiling=TILING)  # single machine, TIFF outputs
SPACING = (2.0, 0.5, 0.5)


def pointwise(dims: int = 2) -> nn.Module:
    """A 1x1 convolution: foreground logits 20 x - 6 of the normalised input (bright nuclei)."""
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(1, 1, 1)
    with torch.no_grad():
        conv.weight.fill_(20.0)
        conv.bias.fill_(-6.0)
    return conv.eval()


def nuclei(shape=(2048, 2048), seed=0, step=40) -> np.ndarray:
    """uint16 nuclei on a jittered grid, a third of them touching a smaller one (no watershed ties: see README)."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    rows, cols = shape
    for cy in range(step // 2, rows, step):
        for cx in range(step // 2, cols, step):
            y, x, r = cy + rng.uniform(-8, 8), cx + rng.uniform(-8, 8), rng.uniform(5, 9)
            discs = [(y, x, r)]
            if rng.random() < 0.3:
                angle, small = rng.uniform(0, 2 * np.pi), r - rng.uniform(1.5, 3)
                distance = r + small - 1.5
                discs.append((y + distance * np.sin(angle), x + distance * np.cos(angle), small))
            for y, x, r in discs:
                y0, y1 = int(max(0, y - r - 1)), int(min(rows, y + r + 2))
                x0, x1 = int(max(0, x - r - 1)), int(min(cols, x + r + 2))
                if y1 <= y0 or x1 <= x0:
                    continue
                yy, xx = np.mgrid[y0:y1, x0:x1]
                image[y0:y1, x0:x1][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = rng.uniform(0.5, 1.0)
    image = ndimage.gaussian_filter(image, 1.0) + rng.normal(0.05, 0.02, shape)
    return np.clip(image * 40000, 0, 65535).astype(np.uint16)


def spheres(shape=(32, 160, 160), seed=1) -> np.ndarray:
    """uint16 separated spheres (3 to 5 voxels across in Z at SPACING) on a grid."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(2000, 300, shape)
    zz, yy, xx = np.indices(shape)
    for z in range(5, shape[0] - 2, 10):
        for y in range(10, shape[1], 22):
            for x in range(10, shape[2], 22):
                centre = np.array([z, y, x]) + rng.uniform(-2, 2, 3)
                radius = rng.uniform(3, 4.5)  # microns
                inside = sum(((a - c) * s) ** 2 for a, c, s in zip((zz, yy, xx), centre, SPACING)) <= radius**2
                volume[inside] = rng.uniform(25000, 40000)
    return np.clip(volume, 0, 65535).astype(np.uint16)


def write_zarr(path, array, chunks, axes, calibration=Calibration()):
    """An OME-Zarr image of `array` with level 0 in `chunks`."""
    from unetseg.io.zarr import OmeZarrWriter

    store = OmeZarrWriter(path, array.shape, array.dtype, axes, calibration, False)
    store.array = store.group.create_array("0", shape=array.shape, dtype=array.dtype, chunks=chunks, overwrite=True)
    store.array[...] = array
    return store.commit()


def level0(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["0"][...]


def same_up_to_renumbering(a: np.ndarray, b: np.ndarray) -> bool:
    """True when the labels `a` and `b` are one relabelling of the other (background kept)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()], 1).astype(np.int64), axis=0)
    background = pairs[(pairs[:, 0] == 0) | (pairs[:, 1] == 0)]
    return (
        len(np.unique(pairs[:, 0])) == len(pairs) == len(np.unique(pairs[:, 1]))
        and len(background) == 1
        and not background.any()
    )


@pytest.fixture(scope="module")
def client():
    with connect("local:2") as client:
        yield client


@pytest.fixture(scope="module")
def model2d(client):
    model, spec = pointwise(2), InputSpec(1)
    return model, spec, use_model(client, (model, spec), "cpu", torch_threads=1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory, model2d, client):
    """The 2048 x 2048 OME-Zarr (512 chunks), its single-machine outputs and an uninterrupted cluster run."""
    root = tmp_path_factory.mktemp("slide")
    source = write_zarr(root / "slide.ome.zarr", nuclei(), (512, 512), "yx")
    model, spec, on_cluster = model2d
    predict_file(model, spec, source, root / "single" / "slide.tif", REFERENCE)
    single = {kind: tifffile.imread(root / "single" / f"slide_{kind}.tif") for kind in KINDS}
    copy = shutil.copytree(source, root / "run" / "slide.ome.zarr")
    report = predict_blocks(client, on_cluster, copy, root / "run" / "out" / "slide.tif", SETTINGS, block=512)
    cluster = {kind: level0(path) for kind, path in report.outputs.items()}
    return {"root": root, "source": source, "single": single, "cluster": cluster, "report": report}


def fresh_copy(slide, name):
    """A copy of the input (outputs go into its labels group) and the target beside it."""
    folder = slide["root"] / name
    return shutil.copytree(slide["source"], folder / "slide.ome.zarr"), folder / "out" / "slide.tif"


# -- geometry and merge, no cluster ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(2048, 256, 64), (1000, 256, 64), (300, 64, 16), (90, 128, 32)]
)
def test_a_blocks_tiles_are_the_whole_images_tiles(length, tile, overlap):
    everywhere = tile_starts(length, tile, overlap) if length >= tile else None
    for start in range(0, length, 37):
        stop = min(length, start + 53)
        first, last = tile_span(length, tile, overlap, start, stop)
        assert first <= start and stop <= last <= length
        if everywhere is None:
            assert (first, last) == (0, length)  # padded whole
            continue
        local = set(tile_starts(last - first, tile, overlap) + first)
        assert local == {s for s in everywhere if first <= s and s + tile <= last}  # the whole axis's tiles
        assert local >= {s for s in everywhere if s < stop and s + tile > start}  # all that cover [start, stop)


def test_labels_merge_across_a_face():
    # two blocks of one row of a 1 x 8 image, cores [0, 4) and [4, 8), halo 2: an object across the face, one
    # left of it, one right of it touching it; each block labelled its core and halo with numbers of its own
    grid = BlockGrid((1, 1, 8), (1, 1, 4), (0, 0, 2), (None, 8, 8), (None, 0, 0))
    left, right = grid.block_at((0, 0, 0)), grid.block_at((0, 0, 1))
    whole = np.array([[[5, 0, 7, 7, 7, 9, 9, 0]]])  # objects 5, 7 (across the face), 9 (touching 7)
    ids = {}
    for block in (left, right):
        labelled = whole[(slice(None), slice(None), slice(*block.labelled[2]))] * (3 if block is right else 1)
        ids[block.name], written, total = local_ids(labelled, block.core_slices("labelled"))
        assert (written, total) == ((2, 3) if block is left else (2, 2))
    strips = [face_strips(ids[b.name], b, grid.shape, (2,)) for b in (left, right)]
    pairs = face_pairs(strips[0]["high2"], strips[1]["low2"])
    lookups, count = merge_labels([2, 2], [3, 2], [(0, 1, pairs)])
    assert count == 3  # 5, 7 and 9: 7 once, although both blocks wrote part of it
    final = np.concatenate([lookups[0][ids[left.name][0, 0, :4]], lookups[1][ids[right.name][0, 0, 2:]]])
    assert same_up_to_renumbering(final, whole[0, 0])


# -- the cluster -------------------------------------------------------------------------------------------------


def test_2d_ome_zarr_blocks_equal_the_single_machine(slide):
    single, cluster, report = slide["single"], slide["cluster"], slide["report"]
    assert (report.blocks, report.predicted, report.reused, report.cut) == (16, 16, 0, 0)
    assert np.abs(cluster["prob"] - single["prob"]).max() <= 1e-6
    assert np.array_equal(cluster["mask"], single["mask"])
    assert cluster["labels"].dtype == np.uint32 and report.objects == len(np.unique(single["labels"])) - 1 > 3000
    assert same_up_to_renumbering(cluster["labels"], single["labels"])
    whole = to_labels(single["prob"][None], 0.5, min_size=15)  # and the labels of the whole array at once
    assert same_up_to_renumbering(cluster["labels"], whole)
    labels = zarr.open_group(str(report.outputs["labels"]), mode="r")
    assert report.outputs["labels"].parent.parent.name == "slide.ome.zarr"  # into the input's labels group
    assert labels["0"].chunks == (512, 512) and labels["1"].shape == (1024, 1024)  # block chunks, a pyramid
    assert np.array_equal(labels["1"][...], cluster["labels"][::2, ::2])
    assert not list(report.outputs["prob"].parent.glob(".*"))  # no work folder or partial output left


def test_3d_ome_zarr_volume_blocks_equal_the_single_machine(client, tmp_path):
    volume = spheres()
    calibration = spacing_calibration(SPACING, "micron")
    source = write_zarr(tmp_path / "volume.ome.zarr", volume, (8, 64, 64), "zyx", calibration)
    model, spec = pointwise(3), InputSpec(1)
    tiles = VolumeTiling((8, 48, 48), (2, 12, 12))
    reference = PredictSettings(output=KINDS, tiling=TILING, volume=tiles)
    predict_file(model, spec, source, tmp_path / "single" / "volume.tif", reference)
    single = {kind: tifffile.imread(tmp_path / "single" / f"volume_{kind}.tif") for kind in KINDS}
    on_cluster = use_model(client, (model, spec), "cpu", torch_threads=1)
    settings = PredictSettings(output=KINDS, tiling=TILING, volume=tiles, format="ome-zarr")
    target = tmp_path / "out" / "volume.tif"
    report = predict_blocks(client, on_cluster, source, target, settings, block=(16, 64, 64), halo=(6, 24, 24))
    cluster = {kind: level0(path) for kind, path in report.outputs.items()}
    assert (report.blocks, report.cut) == (2 * 3 * 3, 0)
    assert np.abs(cluster["prob"] - single["prob"]).max() <= 1e-6
    assert np.array_equal(cluster["mask"], single["mask"])
    assert report.objects > 100 and same_up_to_renumbering(cluster["labels"], single["labels"])
    scale = zarr.open_group(str(report.outputs["labels"]), mode="r").attrs["ome"]["multiscales"][0]["datasets"][0]
    assert scale["coordinateTransformations"][0]["scale"] == list(SPACING)


@pytest.mark.parametrize("blend", ["gaussian", "center"])
def test_a_receptive_field_is_seamless_across_blocks(client, tmp_path, blend):
    from unetseg.models import UNet

    torch.manual_seed(0)
    model, spec = UNet(in_channels=1, classes=1, depth=2, width=4).eval(), InputSpec(1)
    image = ndimage.gaussian_filter(np.random.default_rng(2).random((300, 260)), 3).astype(np.float32)
    source = write_zarr(tmp_path / "image.ome.zarr", image, (64, 64), "yx")
    tiling = TilingConfig(64, 16, blend=blend, amp=False)
    predict_file(model, spec, source, tmp_path / "single.tif", PredictSettings(output="prob", tiling=tiling))
    on_cluster = use_model(client, (model, spec), "cpu", torch_threads=1)
    settings = PredictSettings(output="prob", tiling=tiling, format="ome-zarr")
    report = predict_blocks(client, on_cluster, source, tmp_path / "out" / "image.tif", settings, block=96)
    assert report.blocks == 4 * 3
    assert np.abs(level0(report.outputs["prob"]) - tifffile.imread(tmp_path / "single.tif")).max() <= 1e-6


def test_a_2d_model_predicts_each_plane_of_a_stack(client, model2d, tmp_path):
    stack = np.stack([nuclei((200, 180), seed=s) for s in range(3)]) // 256
    source = write_zarr(tmp_path / "stack.ome.zarr", stack.astype(np.uint8), (1, 64, 64), "zyx")
    model, spec, on_cluster = model2d
    tiling = TilingConfig(64, 16, amp=False)
    single = PredictSettings(output=("prob", "labels"), tiling=tiling)
    predict_file(model, spec, source, tmp_path / "single" / "stack.tif", single)
    settings = PredictSettings(output=("prob", "labels"), tiling=tiling, format="ome-zarr")
    report = predict_blocks(client, on_cluster, source, tmp_path / "out" / "stack.tif", settings, block=64, halo=48)
    assert report.blocks == 3 * 4 * 3 and report.cut == 0
    prob = tifffile.imread(tmp_path / "single" / "stack_prob.tif")
    assert np.abs(level0(report.outputs["prob"]) - prob).max() <= 1e-6
    labels = tifffile.imread(tmp_path / "single" / "stack_labels.tif")
    assert same_up_to_renumbering(level0(report.outputs["labels"]), labels)


def test_a_tiled_compressed_tiff_is_read_block_by_block(client, model2d, tmp_path):
    tifffile.imwrite(tmp_path / "tiled.tif", nuclei((1000, 900)), tile=(256, 256), compression="zlib")
    model, spec, on_cluster = model2d
    tiling = TilingConfig(128, 32, amp=False)
    predict_file(model, spec, tmp_path / "tiled.tif", tmp_path / "single.tif", PredictSettings(KINDS, tiling=tiling))
    settings = PredictSettings(KINDS, tiling=tiling, format="ome-zarr")
    target = tmp_path / "out" / "tiled.tif"
    report = predict_blocks(client, on_cluster, tmp_path / "tiled.tif", target, settings, block=256)
    assert report.blocks == 4 * 4 and report.cut == 0
    single = {kind: tifffile.imread(tmp_path / f"single_{kind}.tif") for kind in KINDS}
    cluster = {kind: level0(path) for kind, path in report.outputs.items()}
    assert np.abs(cluster["prob"] - single["prob"]).max() <= 1e-6
    assert np.array_equal(cluster["mask"], single["mask"])
    assert same_up_to_renumbering(cluster["labels"], single["labels"])


def test_a_worker_killed_mid_run_leaves_the_outputs_complete_and_identical(client, model2d, slide):
    source, target = fresh_copy(slide, "killed")
    pids = client.run(os.getpid)
    markers = target.parent / ".slide.blocks" / "done"
    killed = {}

    def kill_one_busy_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            busy = [w for w, keys in client.processing().items() if any("unetseg-block" in str(k) for k in keys)]
            if busy and markers.is_dir() and any(markers.iterdir()):  # mid-run: some blocks done, one running
                killed["pid"] = pids[busy[0]]
                os.kill(killed["pid"], signal.SIGKILL)
            time.sleep(0.01)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    try:
        report = predict_blocks(client, model2d[2], source, target, SETTINGS, block=512)
    finally:
        killer.join()
    assert killed, "the run ended before a worker could be killed"
    with pytest.raises(ProcessLookupError):
        os.kill(killed["pid"], 0)
    for kind, expected in slide["cluster"].items():
        assert np.array_equal(level0(report.outputs[kind]), expected), kind  # complete and identical
    client.wait_for_workers(2, timeout=60)  # the nanny started a new worker process; it loaded the model
    assert killed["pid"] not in client.run(os.getpid).values()


def test_an_interrupted_run_resumes_without_redoing_finished_blocks(client, model2d, slide):
    source, target = fresh_copy(slide, "resumed")
    work = target.parent / ".slide.blocks"

    def interrupt(done, total):
        if done >= 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict_blocks(client, model2d[2], source, target, SETTINGS, block=512, on_block=interrupt)
    deadline = time.monotonic() + 60  # blocks already running when the client stopped finish on their workers
    while time.monotonic() < deadline and any(keys for keys in client.processing().values()):
        time.sleep(0.05)
    finished = {marker.name: marker.stat().st_mtime_ns for marker in (work / "done").iterdir()}
    assert len(finished) >= 4
    assert not (source / "labels" / "labels").exists() and not (target.parent / "slide_prob.ome.zarr").exists()
    assert (target.parent / ".slide_prob.ome.zarr.partial").is_dir()  # nothing partial under a final name
    seen = {}

    def record(done, total):
        seen.update({name: (work / "done" / name).stat().st_mtime_ns for name in finished})

    report = predict_blocks(client, model2d[2], source, target, SETTINGS, block=512, on_block=record)
    assert report.reused == len(finished) and report.predicted == 16 - len(finished)
    assert seen == finished  # the finished blocks were not predicted again
    for kind, expected in slide["cluster"].items():
        assert np.array_equal(level0(report.outputs[kind]), expected), kind
    assert not work.exists()


def test_a_folder_is_predicted_file_by_file(client, model2d, tmp_path):
    model, spec, _ = model2d
    folder = tmp_path / "in"
    folder.mkdir()
    for index in range(3):
        tifffile.imwrite(folder / f"image{index}.tif", nuclei((128, 160), seed=index))
    (folder / "broken.tif").write_bytes(b"not a tiff")
    settings = PredictSettings(output=("mask", "labels"), tiling=TilingConfig(64, 16, amp=False))
    summary = predict_on_cluster(client, (model, spec), folder, tmp_path / "out", settings)
    assert len(summary.done) == 3 and list(summary.failed) == [folder / "broken.tif"]
    for index in range(3):
        predict_file(model, spec, folder / f"image{index}.tif", tmp_path / "single" / f"image{index}.tif", settings)
        for kind in ("mask", "labels"):
            name = f"image{index}_{kind}.tif"
            assert np.array_equal(tifffile.imread(tmp_path / "out" / name), tifffile.imread(tmp_path / "single" / name))
    again = predict_on_cluster(client, (model, spec), folder, tmp_path / "out", settings)
    assert len(again.skipped) == 3 and not again.done


def test_cluster_addresses_are_checked():
    for address in ("local:0", "local:x", "slurm:-1", "nonsense"):
        with pytest.raises(ValueError, match="forms: local:N"), connect(address):
            pass


def test_slurm_jobs_come_from_dasks_own_configuration(tmp_path, monkeypatch):
    import dask

    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    for command, body in (
        ("sbatch", 'cp "$1" "$(dirname "$0")/job.sh"; echo "Submitted batch job 4242"'),
        ("scancel", ""),
    ):
        (bin_folder / command).write_text(f"#!/bin/sh\n{body}\n")
        (bin_folder / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_folder}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(ValueError, match="jobqueue.slurm in ~/.config/dask/jobqueue.yaml"), connect("slurm:1"):
        pass
    configured = {"jobqueue.slurm.cores": 2, "jobqueue.slurm.memory": "4GB", "jobqueue.slurm.queue": "gpu"}
    with dask.config.set(configured), connect("slurm:1") as client:
        assert client.dashboard_link.startswith("http")
        deadline = time.monotonic() + 30
        while not (bin_folder / "job.sh").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    script = (bin_folder / "job.sh").read_text()
    assert "#SBATCH -p gpu" in script and "#SBATCH --cpus-per-task=2" in script and "#SBATCH --mem=4G" in script


def tiny_checkpoint(path):
    """A training checkpoint of an untrained tiny U-Net, as unetseg-train stores it."""
    from unetseg.models import UNet

    torch.manual_seed(0)
    net = UNet(in_channels=1, classes=1, depth=2, width=4)
    description = {"class_path": "unetseg.models.unet.UNet", "init_args": {"depth": 2, "width": 4}}
    torch.save(
        {
            "state_dict": {f"net.{key}": value for key, value in net.state_dict().items()},
            "hyper_parameters": {"net": description, "input_spec": InputSpec(1).to_dict()},
        },
        path,
    )
    return path


def test_cli_dask_predicts_an_ome_zarr_block_by_block(tmp_path, capsys):
    from unetseg.cli.predict import main

    checkpoint = tiny_checkpoint(tmp_path / "tiny.ckpt")
    source = write_zarr(tmp_path / "slide.ome.zarr", nuclei((512, 512)), (128, 128), "yx")
    out = tmp_path / "out" / "slide.tif"
    common = [str(source), str(out.parent), "--checkpoint", str(checkpoint), "--output", "labels", "prob"]
    assert main([*common, "--dask", "local:2"]) == 2  # block-wise writes OME-Zarr only
    assert "add --format ome-zarr" in capsys.readouterr().err
    assert main([*common, "--dask", "local:none", "--format", "ome-zarr"]) == 2
    assert "forms: local:N" in capsys.readouterr().err
    args = [*common, "--format", "ome-zarr", "--tile-size", "128", "--overlap", "32", "--dask", "local:2", "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "Dask dashboard: http://" in printed and "1 done" in printed
    assert (source / "labels" / "labels").is_dir() and (out.parent / "slide_prob.ome.zarr").is_dir()
    assert main(args) == 0 and "1 skipped" in capsys.readouterr().out  # resumable: the outputs exist


def test_the_default_path_never_imports_dask(tmp_path):
    image = tmp_path / "image.tif"
    tifffile.imwrite(image, nuclei((96, 96)))
    checkpoint = tiny_checkpoint(tmp_path / "tiny.ckpt")
    script = (
        "import sys, unetseg, unetseg.inference.pipeline\n"
        "from unetseg.cli.predict import main\n"
        f"assert main([{str(image)!r}, {str(tmp_path / 'out')!r}, '--checkpoint', {str(checkpoint)!r}, "
        "'--output', 'labels', '--tile-size', '64', '--overlap', '16', '-q']) == 0\n"
        "packages = ('dask', 'distributed', 'dask_jobqueue')\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] in packages)\n"
        "print(json.dumps(loaded))\n"
    )
    done = subprocess.run([sys.executable, "-c", "import json\n" + script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert (tmp_path / "out" / "image.tif").is_file()
