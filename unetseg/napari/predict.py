"""Prediction of a napari image layer, as `unetseg-predict` predicts a file: the layer's array (numpy, dask, the
finest level of a multiscale pyramid) is wrapped, never loaded whole, as an `InputImage`, and predicted band by
band (slab by slab) through `Prediction.blocks`, its labels made block by block by the same writer."""

from __future__ import annotations

from collections.abc import Generator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np

from unetseg.inference.pipeline import Prediction, PredictSettings
from unetseg.inference.sinks import open_writers
from unetseg.io.source import InputImage
from unetseg.napari.models import LoadedModel
from unetseg.spec import foreground_probability

__all__ = ["KINDS", "LayerInput", "arrange", "iter_layer_prediction"]

KINDS = ("labels", "prob")  # the layers the Segment widget makes: instance labels, foreground probability


@dataclass(frozen=True)
class LayerInput:
    """What a prediction needs of an image layer.

    Args:
        name: the layer's name (outputs are named after it).
        data: its array, or a multiscale layer's finest level; sliced lazily, never loaded whole.
        rgb: the last axis holds colour channels.
        scale, translate: per spatial axis (the layer's), given to the output layers.
    """

    name: str
    data: Any
    rgb: bool = False
    scale: tuple[float, ...] = ()
    translate: tuple[float, ...] = ()

    @classmethod
    def of(cls, layer: Any) -> LayerInput:
        """The input of a napari Image (or Labels) layer."""
        data = layer.data[0] if layer.multiscale else layer.data
        scale, translate = (tuple(float(value) for value in values) for values in (layer.scale, layer.translate))
        return cls(layer.name, data, bool(getattr(layer, "rgb", False)), scale, translate)  # Labels: no rgb

    @property
    def shape(self) -> tuple[int, ...]:
        """The spatial shape: the layer's axes, an RGB layer's colour axis left out."""
        return tuple(int(n) for n in self.data.shape[: len(self.data.shape) - self.rgb])


def lazy(data: Any) -> Any:
    """numpy arrays as they are; anything else (dask, zarr, a pyramid level) as a dask array, read on slicing."""
    if isinstance(data, np.ndarray):
        return data
    import dask.array as da

    return da.asarray(data)


def arrange(source: LayerInput, dims: int) -> InputImage:
    """The `InputImage` of a layer for a model of `dims` spatial axes, as the file readers arrange files.

    A 2-D model predicts a 2-D or RGB layer as one plane and the planes of any layer with more axes
    (Z, T, ...) one by one; a 3-D model predicts a 3-D layer as a volume whose voxel size is the layer's
    scale (a 2-D layer as a volume of one plane). ValueError names the layer when its axes do not fit.
    """
    shape, data = source.shape, lazy(source.data)
    channels = tuple(int(n) for n in data.shape[len(shape) :])  # (C,) for RGB layers
    if len(shape) < 2:
        raise ValueError(f"layer {source.name!r}: has {len(shape)} axis; images have 2 or more")
    if channels and channels[0] not in (3, 4):
        raise ValueError(f"layer {source.name!r}: colour axis of {channels[0]}; RGB layers have 3 or 4 channels")
    if dims == 3:
        if len(shape) > 3:
            raise ValueError(f"layer {source.name!r}: a 3-D model predicts 2-D or 3-D layers; this one is {shape}")
        spacing = ((1.0, 1.0, 1.0) + tuple(source.scale))[-3:]
        volume = data if len(shape) == 3 else data[None]
        return InputImage(volume, stack=True, stated_spacing=spacing)
    if len(shape) == 2:
        return InputImage(data[None])
    return InputImage(data.reshape((-1, *shape[-2:], *channels)), stack=True)


def iter_layer_prediction(
    model: LoadedModel, source: LayerInput, settings: PredictSettings
) -> Generator[tuple[int, int], None, dict[str, np.ndarray]]:
    """Predict an image layer as `predict_image` predicts an array, one band (slab) at a time.

    Args:
        model: the model to predict with.
        source: the layer's array and geometry.
        settings: the output kinds ("labels" and/or "prob"), post-processing, tiling and TTA.

    Yields (done, total) after every band: rows of planes for a 2-D model, planes for a 3-D model; stopping
    the generator stops the prediction there. Returns {kind: array of the layer's spatial shape}: "labels"
    (uint16/uint32 instances, made block by block as unetseg-predict makes them) and "prob" (the
    foreground probability, float32, `foreground_probability` of the model's classes).
    """
    unknown = [kind for kind in settings.kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"outputs {unknown}: the layers made are {', '.join(KINDS)}")
    spec, dims = model.spec, model.dims
    settings.check(spec)
    image = arrange(source, dims)
    total = len(image.planes) * (1 if dims == 3 else image.height)
    prob = np.zeros(image.shape, np.float32) if "prob" in settings.kinds else None  # (Z, Y, X)
    with ExitStack() as stack:
        labels = "labels" in settings.kinds
        options = settings.label_options(spec)
        writers = open_writers(("labels",), {"labels": None}, spec, image, options, stack, dims=dims) if labels else []
        done = 0
        yield done, total
        for item, blocks in Prediction(model.net, spec, settings).blocks(image, source.name):
            for writer in writers:
                writer.start(item)
            for start, stop, probs in blocks:
                for writer in writers:
                    writer.band(item, start, stop, probs)
                if prob is not None:
                    prob[(slice(start, stop),) if dims == 3 else (item, slice(start, stop))] = foreground_probability(
                        probs, spec.targets
                    )
                done += stop - start
                yield done, total
            for writer in writers:
                writer.end(item)
        outputs = {writer.kind: writer.close() for writer in writers}
    if prob is not None:
        outputs["prob"] = prob
    return {kind: np.asarray(value).reshape(source.shape) for kind, value in outputs.items()}
