"""The segmentation-models-pytorch U-Net baseline behind the same contract as our UNet."""

from __future__ import annotations

import segmentation_models_pytorch as smp
import torch
from torch import nn

from unetseg.models.unet import pad_to_multiple


class SMPUnet(nn.Module):
    """`segmentation_models_pytorch.Unet` with a ResNet (or any SMP) encoder, for comparison.

    Args:
        in_channels: image channels.
        classes: output channels (logits).
        encoder_name: any SMP encoder, "resnet34" by default.
        encoder_weights: None (random init, the default: nothing is downloaded) or a weight
            name such as "imagenet" for users who can fetch or already cached them.
        encoder_depth: number of encoder stages (3 to 5); inputs are padded to 2**encoder_depth.

    Like `UNet`, any input height and width is accepted: it is padded to a multiple of
    2**encoder_depth and the logits are cropped back to (N, classes, H, W).
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 1,
        encoder_name: str = "resnet34",
        encoder_weights: str | None = None,
        encoder_depth: int = 5,
    ):
        super().__init__()
        self.config = dict(
            in_channels=in_channels,
            classes=classes,
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            encoder_depth=encoder_depth,
        )  # rebuilds it from a checkpoint
        if not 3 <= encoder_depth <= 5:
            raise ValueError(f"encoder_depth must be 3, 4 or 5, got {encoder_depth!r}")
        if encoder_name not in smp.encoders.get_encoder_names():
            raise ValueError(
                f"encoder_name={encoder_name!r} is not an SMP encoder; see smp.encoders.get_encoder_names()"
            )
        self.in_channels, self.classes, self.multiple = in_channels, classes, 2**encoder_depth
        decoder_channels = (256, 128, 64, 32, 16)[-encoder_depth:]
        self.net = smp.Unet(
            encoder_name=encoder_name,
            encoder_weights=encoder_weights,
            in_channels=in_channels,
            classes=classes,
            encoder_depth=encoder_depth,
            decoder_channels=decoder_channels,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        return self.net(pad_to_multiple(x, self.multiple))[..., :height, :width]  # (N, classes, H, W)
