"""Building blocks of the from-scratch U-Net, in 2-D or 3-D: the layers by name, and the three
level blocks (plain, residual, dense) that share one signature so any of them fills any level."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORMS = ("batch", "group", "instance", "none")
SPATIAL_DIMS = (2, 3)


def check_choice(name: str, value, choices: tuple) -> None:
    """Raise a ValueError naming the option and its valid values."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def conv_type(spatial_dims: int) -> type[nn.Module]:
    """nn.Conv2d or nn.Conv3d."""
    return {2: nn.Conv2d, 3: nn.Conv3d}[spatial_dims]


def make_norm(norm: str, channels: int, spatial_dims: int = 2) -> nn.Module:
    """Normalisation layer by name."""
    if norm == "batch":
        return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels)
    if norm == "group":
        groups = min(8, channels)
        return nn.GroupNorm(groups if channels % groups == 0 else 1, channels)
    if norm == "instance":
        return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial_dims](channels, affine=True)
    return nn.Identity()


def make_dropout(dropout: float, spatial_dims: int = 2) -> nn.Module:
    """Channel dropout, or nothing when `dropout` is 0."""
    if dropout <= 0:
        return nn.Identity()
    return {2: nn.Dropout2d, 3: nn.Dropout3d}[spatial_dims](dropout)


def conv3x3(in_channels: int, out_channels: int, norm: str, spatial_dims: int = 2) -> nn.Module:
    """3x3 (or 3x3x3) convolution, with a bias only when no normalisation follows."""
    return conv_type(spatial_dims)(in_channels, out_channels, 3, padding=1, bias=norm == "none")


def conv1x1(in_channels: int, out_channels: int, norm: str, spatial_dims: int = 2) -> nn.Module:
    """1x1 (or 1x1x1) convolution, with a bias only when no normalisation follows."""
    return conv_type(spatial_dims)(in_channels, out_channels, 1, bias=norm == "none")


def conv_pair(
    in_channels: int, out_channels: int, norm: str, dropout: float, spatial_dims: int, final_relu: bool
) -> nn.Sequential:
    """conv 3x3 -> norm -> ReLU -> dropout -> conv 3x3 -> norm [-> ReLU]: the body of the plain block (with the
    last ReLU) and the residual branch F of the residual block (without: the ReLU comes after the sum)."""
    layers = [
        conv3x3(in_channels, out_channels, norm, spatial_dims),
        make_norm(norm, out_channels, spatial_dims),
        nn.ReLU(inplace=True),
        make_dropout(dropout, spatial_dims),
        conv3x3(out_channels, out_channels, norm, spatial_dims),
        make_norm(norm, out_channels, spatial_dims),
    ]
    return nn.Sequential(*layers, *([nn.ReLU(inplace=True)] if final_relu else []))


class PlainBlock(nn.Module):
    """(conv 3x3 -> norm -> ReLU) x 2, the original U-Net block."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str = "batch", dropout: float = 0.0, spatial_dims: int = 2
    ):
        super().__init__()
        self.body = conv_pair(in_channels, out_channels, norm, dropout, spatial_dims, final_relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResidualBlock(nn.Module):
    """The ResNet basic block: y = ReLU(F(x) + shortcut(x)), a 1x1 projection where channels change."""

    def __init__(
        self, in_channels: int, out_channels: int, norm: str = "batch", dropout: float = 0.0, spatial_dims: int = 2
    ):
        super().__init__()
        self.residual = conv_pair(in_channels, out_channels, norm, dropout, spatial_dims, final_relu=False)
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                conv1x1(in_channels, out_channels, norm, spatial_dims), make_norm(norm, out_channels, spatial_dims)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


class DenseBlock(nn.Module):
    """A DenseNet block closed by a 1x1 transition that sets the output channels.

    Layer k is norm -> ReLU -> conv 3x3 producing `growth` channels from the concatenation of
    the block input and the outputs of layers 0..k-1 (so it sees in_channels + k * growth).
    The transition is conv 1x1 -> norm -> ReLU, so a dense level hands on activations as the
    plain and residual blocks do, and the channel ladder of the U-Net stays the same.

    Args:
        in_channels, out_channels: channels entering and leaving the block.
        norm: "batch", "group", "instance" or "none".
        dropout: channel dropout after each layer's convolution, 0 to disable.
        spatial_dims: 2 or 3.
        growth: channels each layer adds.
        layers: number of norm-ReLU-conv layers.
        keep_input: whether the transition sees the block input as well as the new maps
            (in_channels + layers * growth channels) or only the new maps (layers * growth).
            The U-Net's decoder uses only the new maps, as FC-DenseNet's upsampling path does,
            which bounds the transition's width however wide the merged skips are.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm: str = "batch",
        dropout: float = 0.0,
        spatial_dims: int = 2,
        growth: int = 12,
        layers: int = 4,
        keep_input: bool = True,
    ):
        super().__init__()
        self.keep_input = keep_input
        self.layers = nn.ModuleList(
            nn.Sequential(
                make_norm(norm, in_channels + k * growth, spatial_dims),
                nn.ReLU(),
                conv3x3(in_channels + k * growth, growth, norm, spatial_dims),
                make_dropout(dropout, spatial_dims),
            )
            for k in range(layers)
        )
        self.transition_channels = (in_channels if keep_input else 0) + layers * growth
        self.transition = nn.Sequential(
            conv1x1(self.transition_channels, out_channels, norm, spatial_dims),
            make_norm(norm, out_channels, spatial_dims),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.layers:
            features.append(layer(torch.cat(features, dim=1)))  # (N, growth, ...)
        return self.transition(torch.cat(features if self.keep_input else features[1:], dim=1))


BLOCK_TYPES = {"plain": PlainBlock, "residual": ResidualBlock, "dense": DenseBlock}
BLOCKS = tuple(BLOCK_TYPES)
