"""Hostile bioimage.io packages (issue 25): a model zip from a stranger never writes outside a private
temporary folder, never runs code, never exhausts memory, and every other defect is one line naming the file.

Packages are built here by hand (an rdf.yaml as unetseg-export writes it, ONNX weights of a tiny U-Net),
so no bioimageio library is needed; each test asserts the message and that nothing else changed on disk.
"""

import copy
import hashlib
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from skimage import io as skio

from unetseg.cli import predict as predict_cli
from unetseg.inference.loading import load_predictor
from unetseg.models import UNet
from unetseg.models.checkpoint import CheckpointError
from unetseg.spec import InputSpec

pytest.importorskip("onnxruntime", reason="pip install 'unetseg[onnx]'")


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file and folder under root, with its content: what a test compares before and after."""
    return {str(path.relative_to(root)): path.read_bytes() if path.is_file() else None for path in root.rglob("*")}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[int, bytes]:
    """ONNX weights (as unetseg-export writes them) of tiny grey and RGB U-Nets, by input channels."""
    from unetseg.export import export_net

    folder = tmp_path_factory.mktemp("onnx")
    out = {}
    for channels in (1, 3):
        net = UNet(in_channels=channels, classes=1, depth=2, width=4).eval()
        path = export_net(net, folder / f"c{channels}.onnx", "onnx", input_spec=InputSpec(channels))
        out[channels] = path.read_bytes()
    return out


def rdf_of(onnx: bytes, channels: int = 1) -> dict:
    """An rdf.yaml of a grey (or RGB) foreground model, as unetseg-export writes its parts unetseg reads."""
    space = {"min": 8, "step": 4}
    names = ["grey"] if channels == 1 else ["red", "green", "blue"]
    return {
        "format_version": "0.5.4",
        "type": "model",
        "name": "tiny",
        "inputs": [
            {
                "id": "raw",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": names},
                    {"type": "space", "id": "y", "size": dict(space)},
                    {"type": "space", "id": "x", "size": dict(space)},
                ],
            }
        ],
        "outputs": [
            {
                "id": "probabilities",
                "axes": [
                    {"type": "batch"},
                    {"type": "channel", "channel_names": ["foreground"]},
                    {"type": "space", "id": "y", "size": {"tensor_id": "raw", "axis_id": "y"}},
                    {"type": "space", "id": "x", "size": {"tensor_id": "raw", "axis_id": "x"}},
                ],
            }
        ],
        "weights": {
            "onnx": {"source": "weights.onnx", "sha256": hashlib.sha256(onnx).hexdigest(), "opset_version": 17}
        },
        "config": {
            "unetseg": {"input_spec": InputSpec(channels).to_dict(), "size_multiple": 4, "min_size": 8},
        },
    }


def write_package(path: Path, rdf: dict | str, entries: dict[str, bytes]) -> Path:
    """A zip with rdf.yaml (a dict dumped as YAML, or text as it is) and the given entries."""
    text = rdf if isinstance(rdf, str) else yaml.safe_dump(rdf)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("rdf.yaml", text)
        for name, data in entries.items():
            archive.writestr(zipfile.ZipInfo(name), data, zipfile.ZIP_DEFLATED)
    return path


@pytest.fixture
def private_temp(tmp_path, monkeypatch) -> Path:
    """The system temporary folder, redirected to an empty folder of this test: it must be empty afterwards."""
    folder = tmp_path / "systemp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def refused(path: Path, match: str) -> str:
    """Load `path` as a model; assert a CheckpointError naming the file, on one line, matching `match`."""
    with pytest.raises(CheckpointError, match=match) as error:
        load_predictor(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    return message


def test_a_well_formed_package_loads(weights, tmp_path, private_temp):
    path = write_package(tmp_path / "good.zip", rdf_of(weights[1]), {"weights.onnx": weights[1]})
    model, spec = load_predictor(path)
    assert spec == InputSpec(1) and model.path == path
    assert list(private_temp.iterdir()) == []  # the weights' temporary copy is gone


@pytest.mark.parametrize(
    "entry", ["../escaped.txt", "../../escaped.txt", "/tmp/escaped_abs.txt", "sub/../../escaped.txt", "C:/escaped.txt"]
)
def test_entries_outside_the_package_are_refused_and_nothing_is_written(weights, tmp_path, private_temp, entry):
    folder = tmp_path / "models"
    folder.mkdir()
    path = write_package(folder / "evil.zip", rdf_of(weights[1]), {"weights.onnx": weights[1], entry: b"x"})
    before = tree(tmp_path)
    refused(path, f"entry {entry!r} would be written outside the package")
    assert tree(tmp_path) == before and not Path("/tmp/escaped_abs.txt").exists()


def test_weights_source_outside_the_package_is_refused(weights, tmp_path, private_temp):
    rdf = rdf_of(weights[1])
    rdf["weights"]["onnx"]["source"] = "../weights.onnx"
    path = write_package(tmp_path / "evil.zip", rdf, {"weights.onnx": weights[1]})
    before = tree(tmp_path)
    refused(path, "weights source '../weights.onnx' is not a file inside the package")
    assert tree(tmp_path) == before


def test_yaml_tags_never_run_code(weights, tmp_path, private_temp):
    marker = tmp_path / "ran"
    text = f"!!python/object/apply:os.system [touch {marker}]\n"
    path = write_package(tmp_path / "evil.zip", text, {"weights.onnx": weights[1]})
    before = tree(tmp_path)
    refused(path, r"rdf.yaml is not plain YAML data .*python/object")
    assert not marker.exists() and tree(tmp_path) == before
    nested = yaml.safe_dump(rdf_of(weights[1])).replace("type: model", "type: !!python/name:os.system ''")
    refused(write_package(tmp_path / "nested.zip", nested, {"weights.onnx": weights[1]}), "not plain YAML data")


def patch_declared_size(path: Path, name: str, size: int) -> None:
    """Overwrite the uncompressed size the zip declares for entry `name`, in its local and central headers."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(name)
    data[info.header_offset + 22 : info.header_offset + 26] = struct.pack("<I", size)  # local header
    offset = 0
    while True:  # the central directory entry of `name`
        offset = data.find(b"PK\x01\x02", offset)
        length = struct.unpack("<H", data[offset + 28 : offset + 30])[0]
        if data[offset + 46 : offset + 46 + length].decode() == name:
            break
        offset += 4
    data[offset + 24 : offset + 28] = struct.pack("<I", size)
    path.write_bytes(bytes(data))


def test_zip_bombs_are_refused_from_the_declared_size_before_reading(weights, tmp_path, private_temp, monkeypatch):
    big_rdf = yaml.safe_dump(rdf_of(weights[1])) + "#" + " " * (5 << 20) + "\n"  # 5 MiB of spaces: ~5 kB deflated
    path = write_package(tmp_path / "rdf_bomb.zip", big_rdf, {"weights.onnx": weights[1]})
    bomb = write_package(tmp_path / "weights_bomb.zip", rdf_of(weights[1]), {"weights.onnx": bytes(64 << 20)})
    assert path.stat().st_size < 100_000 and bomb.stat().st_size < 200_000
    reads = []
    real_open = zipfile.ZipFile.open

    def open_entry(self, name, *args, **kwargs):
        reads.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", open_entry)
    refused(path, r"rdf.yaml declares 5,\d{3},\d{3} bytes uncompressed, more than the limit of 1,048,576")
    assert reads == []  # refused from the zip's directory: nothing decompressed
    refused(bomb, r"weights.onnx expands \d+ times \(67,108,864 bytes\): refused as a zip bomb")
    assert reads == ["rdf.yaml"] and list(private_temp.iterdir()) == []


def test_an_entry_larger_than_it_declares_is_never_read_past_its_declared_size(weights, tmp_path, private_temp):
    path = write_package(tmp_path / "liar.zip", rdf_of(weights[1]), {"weights.onnx": weights[1]})
    patch_declared_size(path, "weights.onnx", 1000)  # the stream holds 40 kB
    refused(path, "not a readable bioimage.io package .Bad CRC-32 for file 'weights.onnx'")
    assert list(private_temp.iterdir()) == []


def test_a_sha256_that_does_not_match_is_refused(weights, tmp_path, private_temp):
    rdf = rdf_of(weights[1])
    rdf["weights"]["onnx"]["sha256"] = "0" * 64
    path = write_package(tmp_path / "tampered.zip", rdf, {"weights.onnx": weights[1]})
    refused(path, r"weights.onnx: sha256 [0-9a-f]{64} is not the 0{64} rdf.yaml states; refused")
    assert list(private_temp.iterdir()) == []


def test_a_missing_weights_file_is_named(weights, tmp_path, private_temp):
    path = write_package(tmp_path / "empty.zip", rdf_of(weights[1]), {})
    refused(path, "rdf.yaml names weights.onnx, which is not in the package")
    rdf = rdf_of(weights[1])
    del rdf["weights"]["onnx"]["source"]
    refused(write_package(tmp_path / "nosource.zip", rdf, {"weights.onnx": weights[1]}), "no ONNX weights")


def test_mismatched_or_broken_weights_are_refused(weights, tmp_path, private_temp):
    rgb = rdf_of(weights[3])
    rgb["config"]["unetseg"]["input_spec"] = InputSpec(1).to_dict()  # a grey spec over RGB weights
    rgb["inputs"][0]["axes"][1]["channel_names"] = ["grey"]
    path = write_package(tmp_path / "mixed.zip", rgb, {"weights.onnx": weights[3]})
    refused(path, "weights.onnx takes 3 channel.s. but rdf.yaml's input spec says 1")
    garbage = np.random.default_rng(0).bytes(5000)
    path = write_package(tmp_path / "garbage.zip", rdf_of(garbage), {"weights.onnx": garbage})
    refused(path, "not a readable ONNX model")
    assert list(private_temp.iterdir()) == []


def mutate(rdf: dict, where: str, value) -> dict:
    """A copy of rdf with the value at a dotted path replaced (None: deleted)."""
    rdf = copy.deepcopy(rdf)
    *parents, last = where.split(".")
    node = rdf
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is None:
        del node[int(last) if isinstance(node, list) else last]
    else:
        node[int(last) if isinstance(node, list) else last] = value
    return rdf


@pytest.mark.parametrize(
    "where, value, message",
    [
        ("config.unetseg.input_spec.in_channels", 10**12, "in_channels must be 1 or 3"),
        ("config.unetseg.input_spec.classes", -1, "targets 'foreground' with -1 classes"),
        ("config.unetseg.input_spec.normalization.high", 1e308, "percentiles must satisfy"),
        ("config.unetseg.input_spec.postprocess", {"min_size": float("inf")}, "post-processing"),
        ("config.unetseg.input_spec.postprocess", {"threshold": 7}, "threshold must be between 0 and 1"),
        ("config.unetseg.size_multiple", 0, "size_multiple 0 is outside 1..256"),
        ("config.unetseg.min_size", 10**9, "min_size 1000000000 is outside 1..8192"),
        ("config.unetseg", "text", "config.unetseg is not a mapping"),
    ],
)
def test_absurd_numbers_are_refused(weights, tmp_path, private_temp, where, value, message):
    path = write_package(
        tmp_path / "absurd.zip", mutate(rdf_of(weights[1]), where, value), {"weights.onnx": weights[1]}
    )
    refused(path, message)
    assert list(private_temp.iterdir()) == []


@pytest.mark.parametrize(
    "where, value",
    [
        ("inputs.0.axes", None),
        (
            "inputs.0.axes",
            [{"type": "batch"}, {"type": "channel", "channel_names": ["grey"]}, {"type": "space", "id": "x"}],
        ),
        ("inputs.0.axes.2.id", "z"),
        ("inputs.0.axes.1.channel_names", ["red", "green", "blue"]),
        ("outputs.0.axes.1.channel_names", ["background", "interior", "edge"]),
        ("inputs", None),
        ("inputs", "raw"),
    ],
)
def test_wrong_or_missing_axes_are_refused(weights, tmp_path, private_temp, where, value):
    path = write_package(tmp_path / "axes.zip", mutate(rdf_of(weights[1]), where, value), {"weights.onnx": weights[1]})
    refused(path, r"rdf.yaml: (input|output) axes .* expected \(batch, channel, y, x\)")


def test_predict_refuses_a_hostile_package_before_writing_anything(weights, tmp_path, private_temp, capsys):
    image = tmp_path / "in" / "x.png"
    image.parent.mkdir()
    skio.imsave(image, np.zeros((40, 40), np.uint8), check_contrast=False)
    path = write_package(tmp_path / "evil.zip", rdf_of(weights[1]), {"weights.onnx": weights[1], "../x.txt": b"x"})
    before = tree(tmp_path)
    status = predict_cli.main([str(image.parent), str(tmp_path / "out"), "--checkpoint", str(path), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and str(path) in err[0] and "outside the package" in err[0]
    assert tree(tmp_path) == before


def test_model_takes_only_a_shipped_name_never_a_package_path(tmp_path, capsys):
    skio.imsave(tmp_path / "x.png", np.zeros((40, 40), np.uint8), check_contrast=False)
    status = predict_cli.main([str(tmp_path / "x.png"), str(tmp_path / "out"), "--model", "../evil.zip"])
    assert status == 2 and "--model takes a shipped model's name" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
