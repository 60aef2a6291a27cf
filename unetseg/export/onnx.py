"""Export a trained network to ONNX, and load exported files back as predictors.

Exported graphs take float32 images (N, C, H, W), N, H and W dynamic, and return logits
(N, classes, H, W) like the PyTorch network. Inside the graph H and W are padded (reflect) up
to a multiple of the network's `size_multiple` and the logits cropped back: 2**depth for
`UNet`, 2**encoder_depth for `SMPUnet`; multiples skip the padding. The graph matches PyTorch
for every H and W of at least `min_size` (2**(depth + 1) for UNet, which pads smaller images
further, and size_multiple for SMPUnet). `load_onnx` pads smaller
inputs first, exactly as the PyTorch network does, so through them every size matches.

The exported file carries, as JSON, the checkpoint's `input_spec` (how images were read and
normalised), `size_multiple`, `min_size` and the `net` description, in ONNX `metadata_props`.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.models import describe_net
from unetseg.models.checkpoint import load_net
from unetseg.models.ensemble import Ensemble
from unetseg.models.unet import UNet, pad_to_multiple
from unetseg.spec import InputSpec

__all__ = [
    "FORMATS",
    "OnnxPredictor",
    "check_sizes",
    "export_checkpoint",
    "export_net",
    "load_checkpoint_net",
    "load_onnx",
    "max_abs_difference",
    "min_size",
    "size_multiple",
]

# format -> the file suffix it is saved under; not .pt, which unetseg-predict reads as a Lightning checkpoint
FORMATS = {"onnx": ".onnx"}
OPSET = 17  # the lowest opset with every operator these networks use; ONNX Runtime >= 1.14 runs it
METADATA_KEYS = ("input_spec", "size_multiple", "min_size", "net")
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")
INPUT_NAME, OUTPUT_NAME = "image", "logits"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 2: "height", 3: "width"}}
# torch deprecates the legacy (TorchScript-based) ONNX exporter, the one here that exports dynamic H and W: silenced.
_DEPRECATED = r".*(legacy TorchScript-based ONNX export|`torch\.jit\.\w+` is deprecated)"


def size_multiple(net: nn.Module) -> int:
    """The multiple of H and W that `net` runs on unpadded: 2**depth (UNet), 2**encoder_depth (SMPUnet), the
    least common multiple of its members' (an ensemble), else 1."""
    if isinstance(net, Ensemble):
        return math.lcm(*(size_multiple(member) for member in net.members))
    if isinstance(net, UNet):
        return 2**net.depth
    if hasattr(net, "multiple"):  # SMPUnet, without importing SMP here
        return int(net.multiple)
    return 1


def min_size(net: nn.Module) -> int:
    """The smallest H and W that `net` pads to a multiple only: 2**(depth + 1) for UNet (2x2 at the bottleneck)."""
    if isinstance(net, Ensemble):
        return max(max(min_size(member) for member in net.members), size_multiple(net))
    if isinstance(net, UNet):
        return 2 ** (net.depth + 1)
    return size_multiple(net)


class _DynamicPad(nn.Module):
    """Pads H and W up to a multiple (reflect) and crops the logits back, by amounts computed from the input shape.

    The networks decide whether to pad with a Python `if`, which tracing freezes at the example's
    size; padding here by a computed, possibly zero, amount keeps the traced graph right for every
    H and W, and the network inside always sees multiples.
    """

    def __init__(self, net: nn.Module, multiple: int):
        super().__init__()
        self.net, self.multiple = net, multiple

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        pad_h = (self.multiple - height % self.multiple) % self.multiple
        pad_w = (self.multiple - width % self.multiple) % self.multiple
        padded = F.pad(image, (0, pad_w, 0, pad_h), mode="reflect")
        return self.net(padded)[..., :height, :width]  # (N, classes, H, W)


def check_format(format: str | None, out: Path) -> str:
    """The export format: `format`, or the one `out`'s suffix names; ValueError if they disagree or neither is known."""
    by_suffix = {suffix: name for name, suffix in FORMATS.items()}
    if format is None:
        if out.suffix not in by_suffix:
            raise ValueError(
                f"{out}: cannot tell the format from the suffix {out.suffix!r}; name the file "
                f"{' or '.join(f'*{suffix}' for suffix in by_suffix)} or give the format"
            )
        return by_suffix[out.suffix]
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not valid; choose one of {', '.join(map(repr, FORMATS))}")
    if out.suffix != FORMATS[format]:
        raise ValueError(f"{out}: a {format} file must end in {FORMATS[format]} (the suffix predictors dispatch on)")
    return format


def _in_channels(net: nn.Module) -> int:
    """The channels `net` takes: its `in_channels`, else those of its first convolution."""
    channels = getattr(net, "in_channels", None)
    if isinstance(channels, int):
        return channels
    weight = next((p for p in net.parameters() if p.ndim == 4), None)
    if weight is None:
        raise ValueError(f"cannot tell the input channels of {type(net).__name__}: no `in_channels`, no convolution")
    return weight.shape[1]


def _example_side(net: nn.Module) -> int:
    """Side of the square example traced: a multiple of size_multiple, at least 64 and min_size."""
    multiple = size_multiple(net)
    return multiple * max(2, -(-max(64, min_size(net)) // multiple))


def check_sizes(net: nn.Module) -> list[tuple[int, int]]:
    """Two (H, W) to compare an export with PyTorch on: the traced example's size and one not a multiple."""
    side, multiple = _example_side(net), size_multiple(net)
    return [(side, side), (side + multiple, side + multiple // 2 + 1)]


def export_metadata(net: nn.Module, input_spec: InputSpec | None) -> dict[str, str]:
    """The JSON strings stored with an exported network, by key (see METADATA_KEYS)."""
    return {
        "input_spec": json.dumps(input_spec.to_dict() if input_spec is not None else None),
        "size_multiple": json.dumps(size_multiple(net)),
        "min_size": json.dumps(min_size(net)),
        "net": json.dumps(describe_net(net)),
    }


def export_net(
    net: nn.Module,
    out: str | Path,
    format: str | None = None,
    *,
    input_spec: InputSpec | None = None,
    opset: int = OPSET,
) -> Path:
    """Export `net` (in eval mode, on the CPU; the caller's copy is untouched) to `out` and return its path.

    Args:
        net: a network mapping (N, C, H, W) images to (N, classes, H, W) logits.
        out: the file to write, `*.onnx`; missing parent folders are created.
        format: "onnx" (the only format); None picks it from the suffix of `out`.
        input_spec: the checkpoint's input_spec, stored with the network for prediction.
        opset: ONNX opset, 17 or more.

    ONNX uses the TorchScript-based exporter (`dynamo=False`) with `dynamic_axes`: the
    torch.export-based one needs the onnxscript package (not a dependency) and would specialise
    on the padding branch anyway.
    """
    out = Path(out)
    format = check_format(format, out)
    if format == "onnx" and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 17):
        raise ValueError(f"opset must be an integer >= 17, got {opset!r}")
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a file name such as {out / ('model' + FORMATS[format])}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot create the output folder {out.parent}: {error.strerror or error}") from error

    net = copy.deepcopy(net).cpu().eval()
    multiple = size_multiple(net)
    model = _DynamicPad(net, multiple) if multiple > 1 else net
    side = _example_side(net)
    example = torch.randn(2, _in_channels(net), side, side)  # batch 2: nothing may specialise on a batch of 1
    metadata = export_metadata(net, input_spec)
    partial = out.with_name(out.name + ".partial")  # a failed export leaves no half-written file under `out`
    try:
        with warnings.catch_warnings():
            # Expected: the legacy exporter is deprecated, and tracing freezes the nets' padding `if` (see _DynamicPad).
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=_DEPRECATED)
            _save_onnx(model, example, partial, metadata, opset)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return out


def _save_onnx(model: nn.Module, example: torch.Tensor, path: Path, metadata: dict[str, str], opset: int) -> None:
    """torch.onnx.export with dynamic batch, height and width, then the metadata added."""
    onnx = _require("onnx")
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_axes=DYNAMIC_AXES,
        opset_version=opset,
    )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def export_checkpoint(
    checkpoint: str | Path, out: str | Path, format: str | None = None, *, opset: int = OPSET
) -> Path:
    """Export the network of a training checkpoint (`SegmentationModule`) with its input_spec; see `export_net`."""
    check_format(format, Path(out))  # before the slow load
    net, input_spec = load_checkpoint_net(checkpoint)
    return export_net(net, out, format, input_spec=input_spec, opset=opset)


def load_checkpoint_net(checkpoint: str | Path) -> tuple[nn.Module, InputSpec | None]:
    """(network on the CPU in eval mode, input spec) of a training checkpoint; errors name the file."""
    net, spec, _ = load_net(checkpoint)
    return net.eval(), spec


def _require(name: str):
    """Import onnx or onnxruntime, or say how to install them."""
    try:
        return __import__(name)
    except ImportError as error:
        message = f"{name} is not installed; ONNX export and inference need pip install 'unetseg[onnx]'"
        raise ImportError(message) from error


def _read_metadata(path: Path, found: dict[str, str]) -> tuple[dict | None, int, int]:
    """(input_spec, size_multiple, min_size) from a file's metadata; ValueError if unetseg-export didn't write it."""
    missing = [key for key in METADATA_KEYS if not found.get(key)]
    if missing:
        raise ValueError(f"{path}: no {', '.join(missing)} in its metadata; export it with unetseg-export")
    values = {key: json.loads(found[key]) for key in METADATA_KEYS}
    return values["input_spec"], int(values["size_multiple"]), int(values["min_size"])


class OnnxPredictor(nn.Module):
    """An ONNX model run by ONNX Runtime, called like the PyTorch network: logits (N, classes, H, W) for (N, C, H, W).

    It has no parameters, so `predict_tiled` runs and stitches tiles on the CPU (or on the device
    it is given); tiles go to ONNX Runtime as float32 arrays and come back as tensors on their
    device. `eval()` and `train()` change nothing: the graph is the network in eval mode.
    Inputs are padded exactly as the PyTorch network pads them, so every H and W matches it.

    Args:
        path: an .onnx file written by `export_net` / unetseg-export.
        providers: ONNX Runtime execution providers, best first; None takes CUDA where
            onnxruntime-gpu offers it, then the CPU.
    """

    def __init__(self, path: str | Path, providers: Sequence[str] | None = None):
        super().__init__()
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"ONNX model {self.path}: no such file")
        available = ort.get_available_providers()
        if providers is None:
            providers = [provider for provider in DEFAULT_PROVIDERS if provider in available]
        unknown = [provider for provider in providers if provider not in available]
        if unknown or not providers:
            raise ValueError(f"providers {list(providers)!r}: ONNX Runtime here offers {', '.join(available)}")
        try:
            self.session = ort.InferenceSession(str(self.path), providers=list(providers))
        except Exception as error:  # onnxruntime raises its own exception types, not exported by name
            raise ValueError(f"{self.path}: not a readable ONNX model ({error})") from error
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.input_spec, self.size_multiple, self.min_size = _read_metadata(self.path, metadata)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.in_channels = model_input.shape[1] if isinstance(model_input.shape[1], int) else None

    def extra_repr(self) -> str:
        return f"{self.path}, providers={self.session.get_providers()}"

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if image.ndim != 4 or (self.in_channels is not None and image.shape[1] != self.in_channels):
            raise ValueError(f"{self.path} takes images (N, {self.in_channels}, H, W); got {tuple(image.shape)}")
        height, width = image.shape[-2:]
        padded = pad_to_multiple(image.detach().float(), self.size_multiple, self.min_size).cpu().contiguous()
        (logits,) = self.session.run([OUTPUT_NAME], {self.input_name: padded.numpy()})
        return torch.from_numpy(logits)[..., :height, :width].to(image.device)


def load_onnx(path: str | Path, providers: Sequence[str] | None = None) -> tuple[OnnxPredictor, InputSpec | None]:
    """(predictor, input spec) of an .onnx file written by unetseg-export; see `OnnxPredictor` for `providers`."""
    predictor = OnnxPredictor(path, providers)
    spec = predictor.input_spec
    return predictor, InputSpec.from_dict(spec) if spec is not None else None


def max_abs_difference(
    path: str | Path, net: nn.Module, sizes: Iterable[tuple[int, int]], batch_size: int = 2, seed: int = 0
) -> float:
    """Largest |exported - PyTorch| logit over random (batch_size, C, H, W) inputs of the given (H, W) sizes."""
    exported, _ = load_onnx(path)
    net = copy.deepcopy(net).cpu().eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.inference_mode():
        for height, width in sizes:
            image = torch.randn(batch_size, _in_channels(net), height, width, generator=generator)
            # NaN counts as an infinite difference: max(0.0, nan) would be 0.0 and pass the check.
            worst = max(worst, (exported(image) - net(image)).abs().nan_to_num(nan=float("inf")).max().item())
    return worst
