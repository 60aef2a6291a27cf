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
import importlib
import inspect
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from unetseg.export.onnx import OPSET, export_net, load_checkpoint_net, min_size, size_multiple
from unetseg.export.package_reader import PACKAGE_SUFFIX, is_package, load_package  # the reading side
from unetseg.models import describe_net
from unetseg.models.ensemble import Ensemble
from unetseg.models.unet import UNet
from unetseg.spec import InputSpec

__all__ = ["PACKAGE_SUFFIX", "export_bioimageio", "is_package", "load_package", "test_package"]

log = logging.getLogger(__name__)

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
