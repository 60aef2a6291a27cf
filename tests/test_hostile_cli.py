"""unetseg-predict given nonsense (issue 25): bad options, OUTPUT that is INPUT, a GPU that is not there, odd
names, a read-only OUTPUT, a corrupt file among good ones, two inputs for one output name, two runs into one
folder at once, and a run killed with SIGKILL then run again. Each test asserts the message and what is
(and is not) on disk afterwards."""

import errno
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage import io as skio

from unetseg.cli import predict as predict_cli
from unetseg.io.files import atomic_output, remove_stale_temporaries
from unetseg.synthetic import nuclei_image

TILING = ["--tile-size", "64", "--overlap", "16", "--batch-size", "4", "--device", "cpu", "-q"]
REPO = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under root (hidden ones too), with its content."""
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in root.rglob("*")}


def grey(shape=(40, 40), seed=0) -> np.ndarray:
    image, _ = nuclei_image(np.random.default_rng(seed), shape)
    return (image * 255).astype(np.uint8)


def images(folder: Path, names=("a.png", "b.png", "c.png"), shape=(40, 40)) -> Path:
    for seed, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        skio.imsave(folder / name, grey(shape, seed), check_contrast=False)
    return folder


def one_error_line(capsys) -> str:
    """The one error line on stderr (after argparse's usage block, if any)."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    usage = [line for line in err[:-1] if line.startswith("usage:") or line.startswith(" ")]
    assert err and len(usage) == len(err) - 1, err
    return err[-1]


@pytest.mark.parametrize(
    "options, message",
    [
        (["--tile-size", "-64"], "--tile-size: must be a positive integer, got -64"),
        (["--tile-size", "64", "--overlap", "64"], "overlap must be an integer with 0 <= overlap < tile_size (64)"),
        (["--tile-size", "64", "--overlap", "100"], "0 <= overlap < tile_size (64), got 100"),
        (["--tile-size", "64", "--overlap", "-8"], "0 <= overlap < tile_size (64), got -8"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got 0"),
        (["--volume-tile=-1,2,3"], "expected Z,Y,X"),
        (["--device", "gpu"], "--device: expected one of auto, cpu, cuda or cuda:N, got 'gpu'"),
    ],
)
def test_nonsense_options_are_one_line_usage_errors_and_nothing_is_written(
    checkpoint, tmp_path, capsys, options, message
):
    folder = images(tmp_path / "in")
    before = tree(tmp_path)
    status = predict_cli.main([str(folder), str(tmp_path / "out"), "--checkpoint", str(checkpoint), "-q", *options])
    assert status == 2 and message in one_error_line(capsys)
    assert tree(tmp_path) == before


predict_cli_main = predict_cli.main


@pytest.fixture(autouse=True)
def argparse_exits_as_status(monkeypatch):
    """argparse errors exit (SystemExit 2); the tests read them as the status main would give."""

    def main(argv=None):
        try:
            return predict_cli_main(argv)
        except SystemExit as exit_info:
            return exit_info.code

    monkeypatch.setattr(predict_cli, "main", main)


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="this machine has a cuda:7")
def test_a_gpu_that_is_not_there_is_a_usage_error_before_any_output(checkpoint, tmp_path, capsys):
    folder = images(tmp_path / "in")
    before = tree(tmp_path)
    arguments = [str(folder), str(tmp_path / "out"), "--checkpoint", str(checkpoint), "-q", "--device", "cuda:7"]
    assert predict_cli.main(arguments) == 2
    line = one_error_line(capsys)
    assert "--device cuda:7: " in line and ("CUDA is not available" in line or "GPU(s), cuda:0 to" in line)
    assert tree(tmp_path) == before


def test_output_folder_that_is_the_input_folder_is_refused_and_inputs_untouched(checkpoint, tmp_path, capsys):
    folder = images(tmp_path / "in", ("a.tif", "b.png"))
    before = tree(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert predict_cli.main([str(folder), str(folder), "--checkpoint", str(checkpoint), *TILING, *extra]) == 2
        assert "is the INPUT folder; outputs would replace inputs" in one_error_line(capsys)
    assert predict_cli.main([str(folder), str(folder / ".." / "in"), "--checkpoint", str(checkpoint), *TILING]) == 2
    assert "is the INPUT folder" in one_error_line(capsys)
    assert tree(tmp_path) == before


def test_names_with_spaces_and_non_ascii_characters_round_trip(checkpoint, tmp_path):
    folder = images(tmp_path / "in dir ü", ("a b.png", "ñandú 細胞.png", "sub ordner/z é.png"))
    out = tmp_path / "out ü"
    assert predict_cli.main([str(folder), str(out), "--checkpoint", str(checkpoint), *TILING]) == 0
    written = sorted(str(path.relative_to(out)) for path in out.rglob("*") if path.is_file())
    assert written == ["a b.tif", "sub ordner/z é.tif", "ñandú 細胞.tif"]
    assert tifffile.imread(out / "ñandú 細胞.tif").shape == (40, 40)


def test_a_read_only_output_folder_is_one_usage_error_before_any_work(checkpoint, tmp_path, capsys, monkeypatch):
    folder = images(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse as a read-only mount would
        real = tempfile.mkstemp

        def mkstemp(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == out:
                raise PermissionError(errno.EROFS, "Read-only file system", str(dir))
            return real(*args, dir=dir, **kwargs)

        monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    before = tree(tmp_path)
    loaded = []
    monkeypatch.setattr(predict_cli, "load_predictor", lambda *a, **k: loaded.append(1))
    try:
        assert predict_cli.main([str(folder), str(out), "--checkpoint", str(checkpoint), *TILING]) == 2
    finally:
        out.chmod(0o755)
    line = one_error_line(capsys)
    assert line.startswith(f"error: OUTPUT {out}: cannot write in {out} (") and loaded == []
    assert tree(tmp_path) == before


def test_one_corrupt_file_among_good_ones_fails_alone(checkpoint, tmp_path, capsys):
    folder = images(tmp_path / "in", ("a.png", "c.png"))
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (folder / "d.tif").write_bytes(b"II*\x00" + b"\xff" * 50)
    before = tree(folder)
    out = tmp_path / "out"
    assert predict_cli.main([str(folder), str(out), "--checkpoint", str(checkpoint), *TILING]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert [line.split(": ")[1] for line in errors] == [str(folder / "b.png"), str(folder / "d.tif")]
    assert sorted(path.name for path in out.iterdir()) == ["a.tif", "c.tif"]
    assert tree(folder) == before


@pytest.mark.parametrize("names", [("a.png", "a.tif"), ("v.nii.gz", "v.tif"), ("s/x.png", "s/x.tiff")])
def test_two_inputs_for_one_output_name_are_refused_before_any_output(checkpoint, tmp_path, capsys, names):
    folder = tmp_path / "in"
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".nii.gz"):
            nibabel = pytest.importorskip("nibabel")
            nibabel.save(nibabel.Nifti1Image(np.ones((8, 8, 2), np.uint8), np.eye(4)), folder / name)
        else:
            tifffile.imwrite(folder / name, grey()) if "tif" in name else skio.imsave(folder / name, grey())
    before = tree(tmp_path)
    assert predict_cli.main([str(folder), str(tmp_path / "out"), "--checkpoint", str(checkpoint), *TILING]) == 2
    line = one_error_line(capsys)
    assert "would both be written to" in line and all(str(folder / name) in line for name in names)
    assert tree(tmp_path) == before


# --- Two runs at once, and a killed run -------------------------------------------------------------------


def test_a_second_run_never_removes_the_temporary_another_run_is_writing(tmp_path):
    target = tmp_path / "a.tif"
    (tmp_path / ".a.k3x_9q2z.tmp.tif").write_bytes(b"left by a SIGKILL")  # no process holds it
    with atomic_output(target) as temporary:  # this run's temporary: locked while it is written
        temporary.write_bytes(b"being written")
        assert [path.name for path in remove_stale_temporaries(target)] == []  # as another run would, now
        assert temporary.exists()
    assert target.read_bytes() == b"being written"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.tif"]


def cli_process(arguments: list[str], prelude: str = "") -> subprocess.Popen:
    """unetseg-predict in a new Python process (after `prelude`), one torch thread."""
    code = f"{textwrap.dedent(prelude)}\nfrom unetseg.cli.predict import main\nraise SystemExit(main({arguments!r}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_two_runs_into_one_folder_at_once_leave_whole_outputs(checkpoint, tmp_path):
    folder = images(tmp_path / "in", [f"i{n}.png" for n in range(6)], shape=(96, 96))
    reference = tmp_path / "reference"
    arguments = [str(folder), str(tmp_path / "out"), "--checkpoint", str(checkpoint), *TILING]
    arguments += ["--output", "labels", "prob", "--overwrite", "--precision", "fp32"]
    runs = [cli_process(arguments) for _ in range(2)]
    results = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err.decode()[-2000:] for _, err in results]
    assert predict_cli.main([str(folder), str(reference), *arguments[2:]]) == 0
    out = tmp_path / "out"
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in reference.iterdir())
    for path in reference.iterdir():  # whole files, as one process writes them (threads change the last bits)
        np.testing.assert_allclose(tifffile.imread(out / path.name), tifffile.imread(path), atol=1e-4)


def test_a_run_killed_mid_folder_leaves_nothing_that_looks_done_and_a_rerun_completes(checkpoint, tmp_path, capsys):
    folder = images(tmp_path / "in", ("a.png", "b.png", "c.png"), shape=(96, 96))
    out = tmp_path / "out"
    arguments = [str(folder), str(out), "--checkpoint", str(checkpoint), *TILING, "--output", "labels", "prob"]
    prelude = """
        import os, signal
        from unetseg.inference import sinks
        band = sinks.OutputWriter.band

        def killed_mid_b(self, item, start, stop, probs):  # SIGKILL while b's outputs are half written
            band(self, item, start, stop, probs)
            if self.target.name.startswith("b_") and self.kind == "prob":
                os.kill(os.getpid(), signal.SIGKILL)

        sinks.OutputWriter.band = killed_mid_b
    """
    run = cli_process(arguments, prelude)
    run.communicate(timeout=300)
    assert run.returncode == -signal.SIGKILL
    visible = sorted(path.name for path in out.iterdir() if not path.name.startswith("."))
    assert visible == ["a_labels.tif", "a_prob.tif"]  # b's half-written outputs are not under their names
    assert any(path.name.startswith(".") for path in out.iterdir())  # its temporaries are, hidden
    done = {name: (out / name).read_bytes() for name in visible}
    assert predict_cli.main(arguments) == 0
    assert "2 done, 1 skipped" in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == [f"{n}_{k}.tif" for n in "abc" for k in ("labels", "prob")]
    assert all((out / name).read_bytes() == data for name, data in done.items())  # a was not predicted again
    assert tifffile.imread(out / "b_prob.tif").shape == (96, 96)
