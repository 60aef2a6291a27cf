"""Exporting trained networks for other runtimes: ONNX (`unetseg.export.onnx`)."""

from unetseg.export.onnx import (
    FORMATS,
    OPSET,
    OnnxPredictor,
    check_format,
    check_sizes,
    export_checkpoint,
    export_net,
    load_checkpoint_net,
    load_onnx,
    max_abs_difference,
    min_size,
    size_multiple,
)

__all__ = [
    "FORMATS",
    "OPSET",
    "OnnxPredictor",
    "check_format",
    "check_sizes",
    "export_checkpoint",
    "export_net",
    "load_checkpoint_net",
    "load_onnx",
    "max_abs_difference",
    "min_size",
    "size_multiple",
]
