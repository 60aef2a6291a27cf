"""bioimage.io model packages: export a checkpoint as a model-zoo zip, and predict with one unetseg exported.

A package holds `rdf.yaml` (model RDF format 0.5), ONNX weights (`export_net`) and PyTorch
state-dict weights with the source of `unetseg.models.unet.UNet` (its unetseg imports inlined) as
their architecture, test
input and output tensors (.npy), a cover image and a README. The model's input normalisation
is written as the spec's preprocessing: `scale_range` over all channels of a sample (the
percentiles of `Normalization`) followed by `clip` to [0, 1]; its output postprocessing is a
sigmoid (one class) or a softmax over the channels. bioimage.io tools (bioimageio.core,
deepImageJ, ilastik, QuPath, napari plugins) can run it; `unetseg-predict --checkpoint
model.zip` runs it through its ONNX weights with the input spec stored under
`config.unetseg`, with no bioimageio library needed. A fold ensemble ships its ONNX weights
only: one graph of every member, averaging their probabilities. Exporting needs `pip install
'unetseg[bioimageio]'`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import logging
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from unetseg.export.onnx import OPSET, OnnxPredictor, export_net, load_checkpoint_net, min_size, size_multiple
from unetseg.models import describe_net
from unetseg.models.ensemble import Ensemble
from unetseg.models.unet import UNet
from unetseg.spec import InputSpec, label_settings

__all__ = ["PACKAGE_SUFFIX", "export_bioimageio", "is_package", "load_package", "test_package"]

log = logging.getLogger(__name__)

PACKAGE_SUFFIX = ".zip"
INPUT_ID, OUTPUT_ID = "raw", "probabilities"
TEST_SIDE = 128  # side of the test tensors, rounded up to the network's size multiple
LICENSE = "MIT"
AUTHORS = [{"name": "unetseg developers"}]
CITE = [
    {
        "text": "Ronneberger, Fischer & Brox. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
        "MICCAI 2015",
        "doi": "10.1007/978-3-319-24574-4_28",
    }
]
NUCLEI_CITE = {
    "text": "Caicedo et al. Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. "
    "Nature Methods 2019",
    "doi": "10.1038/s41592-019-0612-7",
}
CHANNEL_NAMES = {"foreground": ["foreground"], "boundary": ["background", "interior", "edge"]}


def _require_spec():
    """bioimageio.spec, or an ImportError saying how to install it."""
    try:
        import bioimageio.spec  # noqa: F401
        from bioimageio.spec.model import v0_5
    except ImportError as error:
        raise ImportError(
            "bioimageio.spec is not installed; bioimage.io export needs pip install 'unetseg[bioimageio]'"
        ) from error
    return v0_5


def _test_image(spec: InputSpec, side: int, seed: int = 0) -> np.ndarray:
    """A synthetic nuclei image (1, in_channels, side, side), float32 holding whole numbers 0..255.

    Whole numbers make the percentiles exact: bioimage.io tools interpolate between ranks
    (numpy "linear") where unetseg takes the lower rank, and with ties the two agree.
    """
    from unetseg.synthetic import nuclei_image

    image, _ = nuclei_image(np.random.default_rng(seed), (side, side))
    grey = np.round(image * 255).astype(np.float32)
    return np.repeat(grey[None, None], spec.in_channels, axis=1)  # (1, C, H, W)


def _reference_output(net: nn.Module, spec: InputSpec, image: np.ndarray) -> np.ndarray:
    """Probabilities (1, classes, H, W) of `image` as unetseg predicts them: normalised, logits, sigmoid/softmax."""
    normalization = spec.normalization
    value_range = normalization.range(image[0])
    linear = np.percentile(image[0], [normalization.low, normalization.high])  # what bioimage.io tools compute
    if not np.allclose(linear, value_range):
        log.warning("test image percentiles differ between rank rules: %s vs %s", tuple(linear), value_range)
    normalized = torch.from_numpy(normalization.apply(image, value_range))
    with torch.inference_mode():
        logits = net.eval()(normalized).float()
    probs = logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)
    return probs.numpy().astype(np.float32)


def _write_cover(path: Path, image: np.ndarray, probs: np.ndarray) -> Path:
    """A 2:1 PNG: the test input (first channel) beside its foreground probability."""
    from skimage import io as skio

    from unetseg.spec import foreground_probability

    grey = image[0, 0]
    grey = (grey - grey.min()) / max(float(grey.max() - grey.min()), 1e-6)
    targets = "boundary" if probs.shape[1] == 3 else "foreground"
    foreground = np.clip(foreground_probability(probs[0], targets), 0, 1)
    cover = np.concatenate([grey, foreground], axis=1)
    skio.imsave(path, (cover * 255).round().astype(np.uint8), check_contrast=False)
    return path


def _documentation(name: str, spec: InputSpec, checkpoint: Path) -> str:
    """README.md of the package: what goes in, what comes out, how it was made."""
    norm = spec.normalization
    kind = "grey" if spec.in_channels == 1 else "RGB"
    channels = ", ".join(CHANNEL_NAMES.get(spec.targets, [f"class{i}" for i in range(spec.classes)]))
    return f"""# {name}

A U-Net trained with [unetseg](https://github.com/unetseg/unetseg) (exported from `{checkpoint.name}`).

- **Input** `{INPUT_ID}`: float32 (batch, channel, y, x), {spec.in_channels} channel(s) ({kind}); any y
  and x of at least the minimum size in `rdf.yaml`.
- **Preprocessing**: percentile normalisation over all channels of each image, percentiles
  {norm.low} and {norm.high} mapped to 0 and 1{", clipped to [0, 1]" if norm.clip else ""}. Take
  the percentiles over the whole image, not tile by tile.
- **Output** `{OUTPUT_ID}`: float32 (batch, channel, y, x) probabilities of {channels}
  (targets `{spec.targets}`: {"a sigmoid" if spec.classes == 1 else "a softmax over the channels"}).
- Instance labels: `unetseg-predict --checkpoint THIS.zip --output labels` (threshold, then a
  watershed; see unetseg's `postprocess.to_labels`).{_tta_note(spec)}

Weights: ONNX (opset in `rdf.yaml`) and a PyTorch state dict for `unet.py:UNet`.
"""


def _tta_note(spec: InputSpec) -> str:
    """A line for models whose post-processing was tuned on test-time-augmented probabilities."""
    if not spec.tta:
        return ""
    return """
- Test-time augmentation: the post-processing was tuned on probabilities averaged over the 8
  flips and quarter turns of each tile; unetseg-predict does that by default. Tools that run the
  network once per tile get slightly lower scores."""


def standalone_source(cls: type) -> str:
    """The source of `cls`'s module with the unetseg modules it imports inlined before it: a file that needs torch only.

    bioimage.io tools build the network from this file, without unetseg installed.
    """
    parts: list[str] = []
    seen: set[str] = set()

    def add(module) -> None:
        if module.__name__ in seen:
            return
        seen.add(module.__name__)
        source = inspect.getsource(module)
        dropped: set[int] = set()
        aliases = []
        for node in ast.parse(source).body:
            if isinstance(node, ast.Import) and any(alias.name.startswith("unetseg") for alias in node.names):
                raise ValueError(f"{module.__name__}: `import unetseg...` cannot be inlined; use `from ... import`")
            if not isinstance(node, ast.ImportFrom) or not (
                node.module == "__future__" or (node.module or "").startswith("unetseg")
            ):
                continue
            dropped.update(range(node.lineno, node.end_lineno + 1))
            if node.module != "__future__":
                add(importlib.import_module(node.module))
                aliases += [f"{alias.asname} = {alias.name}" for alias in node.names if alias.asname]
        kept = [line for number, line in enumerate(source.splitlines(), start=1) if number not in dropped]
        parts.append(f"# ---- {module.__name__} ----\n" + "\n".join(kept + aliases))

    add(inspect.getmodule(cls))
    return "from __future__ import annotations\n\n" + "\n\n\n".join(parts) + "\n"


def _check_standalone(source: str, net: nn.Module, init_args: dict) -> None:
    """Build the network from the shipped source alone and load the weights into it; ValueError if that fails."""
    namespace: dict = {"__name__": "unetseg_architecture"}
    try:
        exec(compile(source, "unet.py", "exec"), namespace)  # our own source, to check what ships
        rebuilt = namespace[type(net).__name__](**init_args)
        rebuilt.load_state_dict(net.state_dict())
    except Exception as error:
        raise ValueError(f"the shipped architecture source does not rebuild the network: {error}") from error


def _architecture(v0_5, net: nn.Module, folder: Path):
    """The architecture entry: UNet's standalone source shipped in the package, else the installed unetseg class."""
    init_args = describe_net(net)["init_args"]
    if isinstance(net, UNet):
        source = standalone_source(UNet)
        _check_standalone(source, net, init_args)
        (folder / "unet.py").write_text(source)
        return v0_5.ArchitectureFromFileDescr(source=folder / "unet.py", callable="UNet", kwargs=init_args)
    cls = type(net)
    return v0_5.ArchitectureFromLibraryDescr(import_from=cls.__module__, callable=cls.__name__, kwargs=init_args)


def export_bioimageio(
    checkpoint: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    description: str | None = None,
    opset: int = OPSET,
    nuclei: bool = False,
) -> Path:
    """Write a bioimage.io model package (zip) of a training checkpoint; returns its path.

    Args:
        checkpoint: a unetseg training checkpoint with an input spec.
        out: the zip to write (*.zip); missing folders are created.
        name, description: the model's name and one-line description (defaults from the checkpoint).
        opset: ONNX opset of the ONNX weights.
        nuclei: tag and cite it as the nuclei model trained on DSB2018.

    Raises ValueError for a checkpoint without input spec or an OUT not ending in .zip,
    ImportError without bioimageio.spec.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix.lower() != PACKAGE_SUFFIX:
        raise ValueError(f"{out}: a bioimage.io package must end in {PACKAGE_SUFFIX}")
    v0_5 = _require_spec()
    from bioimageio.spec import save_bioimageio_package

    net, spec = load_checkpoint_net(checkpoint)
    if spec is None:
        raise ValueError(f"{checkpoint}: has no input_spec; bioimage.io packages need its normalisation")
    multiple, smallest = size_multiple(net), min_size(net)
    name = name or ("unetseg nuclei U-Net" if nuclei else f"unetseg U-Net {checkpoint.stem}")
    description = description or f"U-Net for {spec.targets} segmentation of microscopy images, trained with unetseg"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        export_net(net, folder / "weights.onnx", "onnx", input_spec=spec, opset=opset)
        torch.save({key: value.float() for key, value in net.state_dict().items()}, folder / "weights.pt")
        side = multiple * -(-max(TEST_SIDE, smallest) // multiple)
        image = _test_image(spec, side)
        probs = _reference_output(net, spec, image)
        np.save(folder / "test_input.npy", image)
        np.save(folder / "test_output.npy", probs)
        _write_cover(folder / "cover.png", image, probs)
        (folder / "README.md").write_text(_documentation(name, spec, checkpoint))

        norm = spec.normalization
        preprocessing = [
            v0_5.ScaleRangeDescr(
                kwargs=v0_5.ScaleRangeKwargs(
                    axes=[v0_5.AxisId("channel"), v0_5.AxisId("y"), v0_5.AxisId("x")],  # per sample, all channels
                    min_percentile=norm.low,
                    max_percentile=norm.high,
                )
            )
        ]
        if norm.clip:
            preprocessing.append(v0_5.ClipDescr(kwargs=v0_5.ClipKwargs(min=0.0, max=1.0)))
        if spec.classes == 1:
            postprocessing = [v0_5.SigmoidDescr()]
        else:
            postprocessing = [v0_5.SoftmaxDescr(kwargs=v0_5.SoftmaxKwargs(axis=v0_5.AxisId("channel")))]
        input_channels = ["grey"] if spec.in_channels == 1 else ["red", "green", "blue"]
        output_channels = CHANNEL_NAMES.get(spec.targets, [f"class{i}" for i in range(spec.classes)])
        space = v0_5.ParameterizedSize(min=smallest, step=multiple)
        inputs = v0_5.InputTensorDescr(
            id=v0_5.TensorId(INPUT_ID),
            axes=[
                v0_5.BatchAxis(),
                v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in input_channels]),
                v0_5.SpaceInputAxis(id=v0_5.AxisId("y"), size=space),
                v0_5.SpaceInputAxis(id=v0_5.AxisId("x"), size=space),
            ],
            test_tensor=v0_5.FileDescr(source=folder / "test_input.npy"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=preprocessing,
        )
        same = {axis: v0_5.SizeReference(tensor_id=v0_5.TensorId(INPUT_ID), axis_id=v0_5.AxisId(axis)) for axis in "yx"}
        outputs = v0_5.OutputTensorDescr(
            id=v0_5.TensorId(OUTPUT_ID),
            axes=[
                v0_5.BatchAxis(),
                v0_5.ChannelAxis(channel_names=[v0_5.Identifier(c) for c in output_channels]),
                v0_5.SpaceOutputAxis(id=v0_5.AxisId("y"), size=same["y"]),
                v0_5.SpaceOutputAxis(id=v0_5.AxisId("x"), size=same["x"]),
            ],
            test_tensor=v0_5.FileDescr(source=folder / "test_output.npy"),
            data=v0_5.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
            postprocessing=postprocessing,
        )
        if isinstance(net, Ensemble):  # one ONNX graph of every member; no single architecture to rebuild
            weights = v0_5.WeightsDescr(onnx=v0_5.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=opset))
        else:
            weights = v0_5.WeightsDescr(
                pytorch_state_dict=v0_5.PytorchStateDictWeightsDescr(
                    source=folder / "weights.pt",
                    architecture=_architecture(v0_5, net, folder),
                    pytorch_version=v0_5.Version(torch.__version__.split("+")[0]),
                ),
                onnx=v0_5.OnnxWeightsDescr(
                    source=folder / "weights.onnx", opset_version=opset, parent="pytorch_state_dict"
                ),
            )
        descr = v0_5.ModelDescr(
            name=name,
            description=description,
            authors=[v0_5.Author(**author) for author in AUTHORS],
            cite=[v0_5.CiteEntry(**entry) for entry in CITE + ([NUCLEI_CITE] if nuclei else [])],
            license=v0_5.LicenseId(LICENSE),
            tags=["unet", "segmentation", "2d", "fluorescence-light-microscopy"] + (["nuclei"] if nuclei else []),
            documentation=v0_5.FileDescr(source=folder / "README.md"),
            covers=[v0_5.FileDescr(source=folder / "cover.png")],
            inputs=[inputs],
            outputs=[outputs],
            weights=weights,
            config=v0_5.Config(
                unetseg={
                    "input_spec": spec.to_dict(),
                    "net": describe_net(net),
                    "size_multiple": multiple,
                    "min_size": smallest,
                }
            ),
        )
        partial = out.with_name(out.name + ".partial.zip")
        try:
            save_bioimageio_package(descr, output_path=partial)
            partial.replace(out)
        finally:
            partial.unlink(missing_ok=True)
    return out


def test_package(path: str | Path, devices: list[str] | None = None) -> tuple[bool, str]:
    """(passed, summary text) of `bioimageio.core.test_model` on a package: validation, test tensors, sizes."""
    try:
        from bioimageio.core import test_model
    except ImportError as error:
        raise ImportError("bioimageio.core is not installed; pip install 'unetseg[bioimageio]'") from error
    summary = test_model(Path(path), devices=devices or ["cpu"])
    return summary.status == "passed", summary.format()


test_package.__test__ = False  # a helper named test_*, not a pytest test


def is_package(path: str | Path) -> bool:
    """True for a zip holding an rdf.yaml (a bioimage.io package)."""
    path = Path(path)
    if path.suffix.lower() != PACKAGE_SUFFIX or not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return "rdf.yaml" in archive.namelist()


# Limits on what a package may hold before anything is decompressed (zip bombs): an rdf.yaml is a few kB;
# an ONNX file holds at most 2 GiB (protobuf's limit); deflate packs weights ~1.1x, zeros ~1000x.
MAX_RDF_BYTES = 1 << 20
MAX_WEIGHTS_BYTES = 2 << 30
MAX_RATIO, RATIO_FROM_BYTES = 100, 1 << 20  # entries over 1 MiB that expand more than 100 times are refused
MAX_SIZE_MULTIPLE, MAX_MIN_SIZE = 256, 8192  # 2 ** the deepest U-Net a checkpoint may hold; the largest tile
AXES = ("batch", "channel", "y", "x")  # of the input and output tensors of the 2-D models unetseg exports


def _outside(name: str) -> bool:
    """True for a zip entry name that an extractor would write outside its folder: absolute, a drive, or `..`."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts


def _entry(archive: zipfile.ZipFile, name: str, limit: int) -> zipfile.ZipInfo:
    """The directory entry `name`, refused (ValueError) when it declares more than `limit` bytes or expands
    like a zip bomb: checked before a byte of it is decompressed."""
    info = archive.getinfo(name)
    if info.file_size > limit:
        raise ValueError(f"{name} declares {info.file_size:,} bytes uncompressed, more than the limit of {limit:,}")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_FROM_BYTES and ratio > MAX_RATIO:
        raise ValueError(f"{name} expands {ratio:.0f} times ({info.file_size:,} bytes): refused as a zip bomb")
    return info


def _copy_entry(archive: zipfile.ZipFile, info: zipfile.ZipInfo, out, limit: int) -> str:
    """Decompress an entry into the open file `out`, chunk by chunk, never past `limit` bytes; its sha256."""
    digest, written = hashlib.sha256(), 0
    with archive.open(info) as entry:  # zipfile stops at the declared size and checks the CRC at its end
        while chunk := entry.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise ValueError(f"{info.filename} holds more than its declared {limit:,} bytes")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _axes(tensors) -> tuple[str, ...] | None:
    """The axes of the first input (output) tensor of an rdf as names: batch, channel, or a space axis's id."""
    first = tensors[0] if isinstance(tensors, list) and tensors and isinstance(tensors[0], dict) else {}
    axes = first.get("axes")
    if not isinstance(axes, list) or not all(isinstance(axis, dict) for axis in axes):
        return None
    return tuple(str(axis.get("id") if axis.get("type") in ("space", "index") else axis.get("type")) for axis in axes)


def _check_rdf(rdf: dict, spec: InputSpec) -> None:
    """ValueError when the rdf's tensors are not (batch, channel, y, x) with the spec's channels and classes."""
    for role, tensors, channels in (
        ("input", rdf.get("inputs"), spec.in_channels),
        ("output", rdf.get("outputs"), spec.classes),
    ):
        axes = _axes(tensors)
        names = None
        if axes == AXES:
            names = tensors[0]["axes"][1].get("channel_names")
        if axes != AXES or (names is not None and (not isinstance(names, list) or len(names) != channels)):
            found = "missing" if axes is None else f"({', '.join(axes)})"
            if axes == AXES:
                found += f" with {len(names) if isinstance(names, list) else names!r} channel(s)"
            raise ValueError(
                f"rdf.yaml: {role} axes {found}; expected (batch, channel, y, x) with {channels} channel(s), "
                "as unetseg-export writes them"
            )


def _unetseg_config(rdf) -> tuple[InputSpec, dict, str]:
    """(input spec, config.unetseg, ONNX weights source) of an rdf; ValueError for anything else."""
    config = (rdf.get("config") or {}) if isinstance(rdf, dict) else {}
    stored = config.get("unetseg") if isinstance(config, dict) else None
    if stored is not None and not isinstance(stored, dict):
        raise ValueError("rdf.yaml: config.unetseg is not a mapping")
    weights = rdf.get("weights") if isinstance(rdf, dict) else None
    onnx = weights.get("onnx") if isinstance(weights, dict) else None
    source = onnx.get("source") if isinstance(onnx, dict) else None
    if not stored or not stored.get("input_spec") or not source:
        raise ValueError(
            "not a package exported by unetseg (no config.unetseg.input_spec or no ONNX weights in rdf.yaml)"
        )
    if not isinstance(source, str) or _outside(source):
        raise ValueError(f"rdf.yaml: weights source {source!r} is not a file inside the package")
    try:
        spec = InputSpec.from_dict(stored["input_spec"])
    except (ValueError, TypeError) as error:
        raise ValueError(f"rdf.yaml: config.unetseg.input_spec: {error}") from None
    try:  # the tuned post-processing, checked now rather than on the first image
        label_settings(spec.postprocess)
    except (ValueError, TypeError, OverflowError) as error:
        raise ValueError(f"rdf.yaml: post-processing {spec.postprocess!r}: {error}") from None
    for key, limit in (("size_multiple", MAX_SIZE_MULTIPLE), ("min_size", MAX_MIN_SIZE)):
        value = stored.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= limit):
            raise ValueError(f"rdf.yaml: config.unetseg.{key} {value!r} is outside 1..{limit}")
    return spec, stored, source


def _check_weights(predictor: OnnxPredictor, spec: InputSpec, stored: dict, source: str) -> None:
    """ValueError when the ONNX weights are not the network rdf.yaml describes (channels, classes, sizes)."""
    outputs = predictor.session.get_outputs()[0].shape
    classes = outputs[1] if len(outputs) > 1 and isinstance(outputs[1], int) else None
    for what, found, stated in (
        ("takes", predictor.in_channels, spec.in_channels),
        ("outputs", classes, spec.classes),
    ):
        if found is not None and found != stated:
            noun = "in_channels" if what == "takes" else "classes"
            raise ValueError(f"{source} {what} {found} channel(s) but rdf.yaml's input spec says {stated} ({noun})")
    for key, limit in (("size_multiple", MAX_SIZE_MULTIPLE), ("min_size", MAX_MIN_SIZE)):
        value = getattr(predictor, key)
        if not 1 <= value <= limit:
            raise ValueError(f"{source}: its {key} {value} is outside 1..{limit}")
        if stored.get(key) is not None and stored[key] != value:
            raise ValueError(f"{source}: its {key} {value} is not rdf.yaml's {stored[key]}")


def load_package(path: str | Path) -> tuple[OnnxPredictor, InputSpec]:
    """(ONNX predictor, input spec) of a bioimage.io package exported by unetseg; ValueError naming the file otherwise.

    Reads the zip with the standard library: no bioimageio package is needed to predict. A
    package is data from a stranger, so nothing in it is trusted: entries named outside the
    package (absolute, a drive, `..`) refuse it; rdf.yaml is read as plain YAML data (no tags:
    `yaml.safe_load`); each entry's declared size and compression ratio are checked before it is
    decompressed, and reading stops at the declared size (zip bombs); the weights must match the
    sha256 rdf.yaml states, and the network rdf.yaml describes (axes (batch, channel, y, x), channels,
    classes, size multiple). Nothing is extracted but the ONNX weights, under a fixed name in a
    private temporary folder that is removed before this returns.
    """
    path = Path(path)
    try:
        predictor, spec = _read_package(path)
    except (ValueError, zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as error:
        # zipfile raises BadZipFile (a bad CRC too), zlib.error, EOFError (truncated), NotImplementedError
        # (an unknown compression) and RuntimeError (encrypted entries); one line whatever the library wrote
        message = " ".join(str(error).split())
        if not isinstance(error, ValueError) or isinstance(error, zipfile.BadZipFile):
            message = f"not a readable bioimage.io package ({message})"
        raise ValueError(f"{path}: {message}") from None
    predictor.path = path
    return predictor, spec


def _read_package(path: Path) -> tuple[OnnxPredictor, InputSpec]:
    """`load_package` without the file name in its errors."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        unsafe = next((name for name in names if _outside(name)), None)
        if unsafe is not None:
            raise ValueError(f"entry {unsafe!r} would be written outside the package (absolute or '..'); refused")
        if "rdf.yaml" not in names:
            raise ValueError("no rdf.yaml in the zip")
        with archive.open(_entry(archive, "rdf.yaml", MAX_RDF_BYTES)) as handle:
            text = handle.read(MAX_RDF_BYTES + 1)
        try:
            rdf = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(
                f"rdf.yaml is not plain YAML data (tags such as !!python/object are refused): {error}"
            ) from None
        spec, stored, source = _unetseg_config(rdf)
        _check_rdf(rdf, spec)
        if source not in names:
            raise ValueError(f"rdf.yaml names {source}, which is not in the package")
        info = _entry(archive, source, MAX_WEIGHTS_BYTES)
        with tempfile.TemporaryDirectory() as tmp:  # ONNX Runtime reads the file once, when the session is made
            onnx_path = Path(tmp) / "weights.onnx"
            with onnx_path.open("wb") as out:
                digest = _copy_entry(archive, info, out, info.file_size)
            stated = rdf["weights"]["onnx"].get("sha256")
            if stated is not None and str(stated).lower() != digest:
                raise ValueError(f"{source}: sha256 {digest} is not the {stated} rdf.yaml states; refused")
            try:
                predictor = OnnxPredictor(onnx_path)
            except ValueError as error:
                raise ValueError(str(error).replace(str(onnx_path), source)) from None
    _check_weights(predictor, spec, stored, source)
    return predictor, spec
