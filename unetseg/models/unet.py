"""A from-scratch symmetric U-Net whose long skips (encoder -> decoder) and short skips
(residual blocks) are both configurable, so that what each is worth can be measured."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SKIPS = ("concat", "add", "none")
BLOCKS = ("plain", "residual")
NORMS = ("batch", "group", "instance", "none")
UPSAMPLES = ("transpose", "bilinear")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """Raise a ValueError naming the option and its valid values."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(map(repr, choices))}")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer by name."""
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(min(8, channels), channels) if channels % min(8, channels) == 0 else nn.GroupNorm(1, channels)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    return nn.Identity()


def conv3x3(in_channels: int, out_channels: int, norm: str) -> nn.Conv2d:
    """3x3 convolution, with a bias only when no normalisation follows."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm == "none")


class PlainBlock(nn.Module):
    """(conv 3x3 -> norm -> ReLU) x 2, the original U-Net block."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            conv3x3(in_channels, out_channels, norm),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            conv3x3(out_channels, out_channels, norm),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ResidualBlock(nn.Module):
    """The ResNet basic block: y = ReLU(F(x) + shortcut(x)), a 1x1 projection where channels change."""

    def __init__(self, in_channels: int, out_channels: int, norm: str = "batch", dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            conv3x3(in_channels, out_channels, norm),
            make_norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            conv3x3(out_channels, out_channels, norm),
            make_norm(norm, out_channels),
        )
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=norm == "none"), make_norm(norm, out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.residual(x) + self.shortcut(x))


BLOCK_TYPES = {"plain": PlainBlock, "residual": ResidualBlock}


class Up(nn.Module):
    """Upsample by 2, merge the long skip (concat, add or none), then a block.

    concat: [up(x), skip] -> block (U-Net, DenseNet style).
    add:    up(x) + skip -> block, the upsampling projects to the skip's channels (LinkNet, ResNet style).
    none:   up(x) -> block; the skip is ignored (the ablation).
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, skip: str, block: str, norm: str,
                 upsample: str, dropout: float):
        super().__init__()
        self.skip = skip
        up_channels = skip_channels if skip == "add" else in_channels // 2
        if upsample == "transpose":
            self.up = nn.ConvTranspose2d(in_channels, up_channels, kernel_size=2, stride=2)
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(in_channels, up_channels, 1),
            )
        merged = up_channels + skip_channels if skip == "concat" else up_channels
        self.block = BLOCK_TYPES[block](merged, out_channels, norm, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (N, up_channels, 2h, 2w)
        if self.skip == "concat":
            x = torch.cat([x, skip], dim=1)
        elif self.skip == "add":
            x = x + skip
        return self.block(x)


class UNet(nn.Module):
    """A symmetric U-Net with a long skip from every encoder level to its mirror decoder level.

    Args:
        in_channels: image channels (1 grey, 3 RGB).
        classes: output channels; logits, 1 for binary segmentation.
        depth: number of downsamplings; the encoder has depth + 1 levels.
        width: channels of the first level; doubled at each level down.
        skip: how long skips merge into the decoder: "concat", "add" or "none".
        block: "plain" (conv-norm-ReLU x2) or "residual" (the ResNet basic block, short skips).
        norm: "batch", "group", "instance" or "none".
        upsample: "transpose" (learned 2x2) or "bilinear" (+1x1 conv).
        dropout: channel dropout inside every block, 0 to disable.

    Any input height and width is accepted: the input is padded (reflect) to a multiple of
    2**depth and the logits are cropped back, so the output is (N, classes, H, W).
    """

    def __init__(self, in_channels: int = 1, classes: int = 1, depth: int = 4, width: int = 32,
                 skip: str = "concat", block: str = "plain", norm: str = "batch", upsample: str = "transpose",
                 dropout: float = 0.0):
        super().__init__()
        self.config = dict(in_channels=in_channels, classes=classes, depth=depth, width=width, skip=skip, block=block,
                           norm=norm, upsample=upsample, dropout=dropout)  # rebuilds this net from a checkpoint
        check_choice("skip", skip, SKIPS)
        check_choice("block", block, BLOCKS)
        check_choice("norm", norm, NORMS)
        check_choice("upsample", upsample, UPSAMPLES)
        for name, value in (("in_channels", in_channels), ("classes", classes), ("depth", depth), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_channels, self.classes, self.depth = in_channels, classes, depth

        channels = [width * 2**level for level in range(depth + 1)]  # encoder levels, top to bottom
        block_type = BLOCK_TYPES[block]
        self.stem = block_type(in_channels, channels[0], norm, dropout)
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), block_type(c_in, c_out, norm, dropout))
            for c_in, c_out in zip(channels[:-1], channels[1:])
        )
        self.up = nn.ModuleList(
            Up(c_in, c_skip, c_skip, skip, block, norm, upsample, dropout)
            for c_in, c_skip in zip(channels[:0:-1], channels[-2::-1])
        )
        self.head = nn.Conv2d(channels[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # At least 2x2 at the bottleneck: instance norm needs more than one value per channel.
        x = pad_to_multiple(x, 2**self.depth, minimum=2 ** (self.depth + 1))
        features = [self.stem(x)]  # (N, width, H, W)
        for down in self.down:
            features.append(down(features[-1]))  # (N, width * 2**level, H / 2**level, W / 2**level)
        x = features.pop()
        for up in self.up:
            x = up(x, features.pop())
        return self.head(x)[..., :height, :width]  # (N, classes, H, W)


def pad_to_multiple(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    """Pad the bottom and right of (N, C, H, W) to multiples of `multiple` (and at least `minimum`),
    by reflection where it fits."""
    pad_h = max(-x.shape[-2] % multiple, minimum - x.shape[-2])
    pad_w = max(-x.shape[-1] % multiple, minimum - x.shape[-1])
    if not pad_h and not pad_w:
        return x
    mode = "reflect" if pad_h < x.shape[-2] and pad_w < x.shape[-1] else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
