"""unetseg: U-Net segmentation for microscopy and biomedical images."""

from unetseg.data import SegmentationDataModule
from unetseg.inference import predict_tiled
from unetseg.models import SMPUnet, UNet
from unetseg.module import SegmentationModule

__all__ = ["SMPUnet", "SegmentationDataModule", "SegmentationModule", "UNet", "predict_tiled"]
__version__ = "0.1.0"
