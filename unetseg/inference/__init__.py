"""Prediction of whole images and volumes: tiling geometry (`tiling`), the tiled engine (`engine`; `volume`
for (C, Z, Y, X) in 3-D tiles) and post-processing of probabilities into masks and instance labels (`postprocess`)."""

from unetseg.inference.engine import autocast_dtype, iter_predict_bands, select_device
from unetseg.inference.tiling import BLENDS, PAD_MODES, TilingConfig
from unetseg.inference.volume import predict_tiled

__all__ = [
    "BLENDS",
    "PAD_MODES",
    "TilingConfig",
    "autocast_dtype",
    "iter_predict_bands",
    "predict_tiled",
    "select_device",
]
