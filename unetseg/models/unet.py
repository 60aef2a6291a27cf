"""A from-scratch U-Net, 2-D or 3-D, whose long skips (encoder -> decoder: concat, add, none or
UNet++ nested) and blocks (plain, residual, dense; several per level) are configurable, so that
what each is worth can be measured."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from unetseg.models.blocks import BLOCK_TYPES, BLOCKS, NORMS, SPATIAL_DIMS, check_choice, conv_type

SKIPS = ("concat", "add", "none", "nested")
UPSAMPLES = ("transpose", "bilinear")

__all__ = ["BLOCKS", "NORMS", "SKIPS", "SPATIAL_DIMS", "UPSAMPLES", "UNet", "pad_to_multiple", "pool_schedule"]


def pool_schedule(spacing: Sequence[float], depth: int) -> list[list[int]]:
    """Pooling kernel per level and axis from the voxel spacing, the nnU-Net way.

    At each level an axis is pooled by 2 only while its current spacing is at most twice the
    finest current spacing; pooling doubles that axis's spacing. Thick slices are thus kept
    until the in-plane resolution has caught up: spacing (5, 1, 1), depth 4 gives
    [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]].

    Args:
        spacing: physical size of a voxel along each axis, e.g. (z, y, x); all positive.
        depth: number of downsamplings.
    """
    if len(spacing) == 0 or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not s > 0 for s in spacing):
        raise ValueError(f"spacing must be positive numbers, one per axis, got {spacing!r}")
    current = [float(s) for s in spacing]
    schedule = []
    for _ in range(depth):
        finest = min(current)
        kernel = [2 if s <= 2 * finest else 1 for s in current]
        current = [s * k for s, k in zip(current, kernel)]
        schedule.append(kernel)
    return schedule


def resolve_pool(
    pool: Sequence | None, spacing: Sequence[float] | None, depth: int, spatial_dims: int
) -> list[tuple[int, ...]]:
    """Per-level pooling kernels (one int per axis) from `pool`, `spacing`, or 2 everywhere."""
    if pool is not None and spacing is not None:
        raise ValueError("give pool or spacing, not both (spacing derives the pool schedule)")
    if spacing is not None:
        if len(spacing) != spatial_dims:
            raise ValueError(f"spacing needs one value per axis ({spatial_dims}), got {spacing!r}")
        return [tuple(kernel) for kernel in pool_schedule(spacing, depth)]
    if pool is None:
        return [(2,) * spatial_dims] * depth
    if isinstance(pool, (str, int)) or len(pool) != depth:
        raise ValueError(f"pool needs one kernel per level (depth={depth}), got {pool!r}")
    kernels = []
    for kernel in pool:
        kernel = (kernel,) * spatial_dims if isinstance(kernel, int) else tuple(kernel)
        if len(kernel) != spatial_dims or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in kernel):
            raise ValueError(f"pool kernels must be positive integers, one per axis ({spatial_dims}), got {pool!r}")
        kernels.append(kernel)
    return kernels


def stack_blocks(
    block: str,
    in_channels: int,
    out_channels: int,
    count: int,
    norm: str,
    dropout: float,
    spatial_dims: int,
    growth: int,
    layers: int,
    keep_input: bool,
) -> nn.Module:
    """`count` blocks of one kind, the first changing the channels; a single block is returned bare,
    which keeps the state_dict keys of one-block levels as they always were."""
    dense = dict(growth=growth, layers=layers, keep_input=keep_input) if block == "dense" else {}
    blocks = [
        BLOCK_TYPES[block](in_channels if k == 0 else out_channels, out_channels, norm, dropout, spatial_dims, **dense)
        for k in range(count)
    ]
    return blocks[0] if count == 1 else nn.Sequential(*blocks)


class Up(nn.Module):
    """Upsample by the level's pooling factor, merge the long skip(s), then the level's blocks.

    concat: [up(x), skip] -> block (U-Net, DenseNet style).
    add:    up(x) + skip -> block, the upsampling projects to the skip's channels (LinkNet, ResNet style).
    none:   up(x) -> block; the skip is ignored (the ablation).
    nested: [up(x), *skips] -> block, every earlier node of the level (UNet++).
    """

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        skip: str,
        upsample: str,
        scale: Sequence[int],
        make_block: Callable[[int], nn.Module],
        spatial_dims: int = 2,
    ):
        super().__init__()
        self.skip = skip
        up_channels = skip_channels if skip == "add" else in_channels // 2
        if upsample == "transpose":
            transpose = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[spatial_dims]
            self.up = transpose(in_channels, up_channels, kernel_size=tuple(scale), stride=tuple(scale))
        else:
            self.up = nn.Sequential(
                nn.Upsample(
                    scale_factor=tuple(float(s) for s in scale),
                    mode={2: "bilinear", 3: "trilinear"}[spatial_dims],
                    align_corners=False,
                ),
                conv_type(spatial_dims)(in_channels, up_channels, 1),
            )
        merged = up_channels + skip_channels if skip in ("concat", "nested") else up_channels
        self.block = make_block(merged)

    def forward(self, x: torch.Tensor, *skips: torch.Tensor) -> torch.Tensor:
        x = self.up(x)  # (N, up_channels, *skip's spatial size)
        if self.skip in ("concat", "nested"):
            x = torch.cat([x, *skips], dim=1)
        elif self.skip == "add":
            x = x + skips[0]
        return self.block(x)


class UNet(nn.Module):
    """A U-Net, 2-D or 3-D, with configurable long skips and blocks.

    Args:
        in_channels: image channels (1 grey, 3 RGB).
        classes: output channels; logits, 1 for binary segmentation.
        depth: number of downsamplings; the encoder has depth + 1 levels.
        width: channels of the first level; doubled at each level down.
        skip: how long skips merge into the decoder: "concat", "add", "none" or "nested".
            "nested" is UNet++: node X(i, j) (level i, j >= 1) is a block over the concatenation
            of X(i, 0..j-1) and the upsampled X(i+1, j-1); the logits come from X(0, depth).
            Its extra inner nodes cost parameters and FLOPs, measured in reports/degradation.md
            (at depth 4, width 32, 256x256: 1.17x the parameters and 2.5x the FLOPs of concat).
        block: "plain" (conv-norm-ReLU x2), "residual" (the ResNet basic block, short skips) or
            "dense" (DenseNet block + 1x1 transition to the level's channels; see
            `blocks.DenseBlock`). Decoder dense blocks pass only their new feature maps to the
            transition, as FC-DenseNet's upsampling path does, so the merged skips do not widen it.
        norm: "batch", "group", "instance" or "none".
        upsample: "transpose" (learned, kernel = stride = the level's pooling) or "bilinear"
            (trilinear in 3-D; + 1x1 conv).
        dropout: channel dropout inside every block, 0 to disable.
        blocks_per_level: blocks stacked at each level (and node); the first changes the channels,
            the rest keep them, so depth grows without changing the resolution schedule.
        growth: dense blocks only: channels each dense layer adds at the first level, doubled at
            each level down like the width; None means width // 2.
        layers: dense blocks only: norm-ReLU-conv layers per dense block.
        deep_supervision: with skip="nested", in training mode return a list of depth logits, from
            X(0, 1) ... X(0, depth), each through its own 1x1 head; in eval mode return only the
            last (that of X(0, depth)), so the deployed net is the one trained with the main loss.
        spatial_dims: 2 for images (N, C, H, W), 3 for volumes (N, C, D, H, W).
        pool: pooling kernel (= stride) per level, each an int or one int per axis, e.g.
            [[1, 2, 2], [2, 2, 2]] for thick slices; None pools by 2 along every axis.
        spacing: voxel spacing, one per axis, from which `pool_schedule` derives `pool`.

    Any input size is accepted: the input is padded (reflect where it fits, else replicate) to a
    multiple of `size_multiple` along each axis (and at least twice it, so instance norm sees
    more than one value at the bottleneck), and the logits are cropped back to
    (N, classes, *spatial size).
    """

    def __init__(
        self,
        in_channels: int = 1,
        classes: int = 1,
        depth: int = 4,
        width: int = 32,
        skip: str = "concat",
        block: str = "plain",
        norm: str = "batch",
        upsample: str = "transpose",
        dropout: float = 0.0,
        blocks_per_level: int = 1,
        growth: int | None = None,
        layers: int = 4,
        deep_supervision: bool = False,
        spatial_dims: int = 2,
        pool: list | None = None,
        spacing: list[float] | None = None,
    ):
        super().__init__()
        self.config = dict(
            in_channels=in_channels,
            classes=classes,
            depth=depth,
            width=width,
            skip=skip,
            block=block,
            norm=norm,
            upsample=upsample,
            dropout=dropout,
            blocks_per_level=blocks_per_level,
            growth=growth,
            layers=layers,
            deep_supervision=deep_supervision,
            spatial_dims=spatial_dims,
            pool=pool,
            spacing=spacing,
        )  # rebuilds this net from a checkpoint
        check_choice("skip", skip, SKIPS)
        check_choice("block", block, BLOCKS)
        check_choice("norm", norm, NORMS)
        check_choice("upsample", upsample, UPSAMPLES)
        check_choice("spatial_dims", spatial_dims, SPATIAL_DIMS)
        for name, value in (
            ("in_channels", in_channels),
            ("classes", classes),
            ("depth", depth),
            ("width", width),
            ("blocks_per_level", blocks_per_level),
            ("layers", layers),
            ("growth", max(1, width // 2) if growth is None else growth),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if deep_supervision and skip != "nested":
            raise ValueError(f"deep_supervision needs skip='nested', got skip={skip!r}")
        self.in_channels, self.classes, self.depth, self.spatial_dims = in_channels, classes, depth, spatial_dims
        self.skip, self.deep_supervision = skip, deep_supervision
        self.pool = resolve_pool(pool, spacing, depth, spatial_dims)  # kernel per level, one int per axis
        self.size_multiple = tuple(math.prod(axis) for axis in zip(*self.pool))  # per axis
        self.min_size = tuple(2 * multiple for multiple in self.size_multiple)  # >= 2 voxels at the bottleneck

        channels = [width * 2**level for level in range(depth + 1)]  # encoder levels, top to bottom
        growths = [(max(1, width // 2) if growth is None else growth) * 2**level for level in range(depth + 1)]

        def level(in_channels: int, level: int, encoder: bool) -> nn.Module:
            return stack_blocks(
                block,
                in_channels,
                channels[level],
                blocks_per_level,
                norm,
                dropout,
                spatial_dims,
                growths[level],
                layers,
                keep_input=encoder,
            )

        max_pool = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[spatial_dims]
        self.stem = level(in_channels, 0, encoder=True)
        self.down = nn.ModuleList(
            nn.Sequential(max_pool(kernel, kernel), level(channels[i], i + 1, encoder=True))
            for i, kernel in enumerate(self.pool)
        )

        def up(i: int, skip_channels: int, skip: str) -> Up:
            return Up(
                channels[i + 1],
                skip_channels,
                skip,
                upsample,
                self.pool[i],
                lambda merged: level(merged, i, encoder=False),
                spatial_dims,
            )

        if skip == "nested":
            # self.up[j - 1][i] is node X(i, j): column j has nodes at levels 0 .. depth - j.
            self.up = nn.ModuleList(
                nn.ModuleList(up(i, j * channels[i], skip) for i in range(depth - j + 1)) for j in range(1, depth + 1)
            )
        else:
            self.up = nn.ModuleList(up(i, channels[i], skip) for i in reversed(range(depth)))  # bottom to top
        self.head = conv_type(spatial_dims)(channels[0], classes, 1)
        if deep_supervision:
            self.deep_heads = nn.ModuleList(conv_type(spatial_dims)(channels[0], classes, 1) for _ in range(depth - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            axes = "H, W" if self.spatial_dims == 2 else "D, H, W"
            raise ValueError(f"UNet takes (N, {self.in_channels}, {axes}); got {tuple(x.shape)}")
        crop = (..., *(slice(0, size) for size in x.shape[2:]))
        x = pad_to_multiple(x, self.size_multiple, minimum=self.min_size)
        features = [self.stem(x)]  # (N, width, *size)
        for down in self.down:
            features.append(down(features[-1]))  # (N, width * 2**level, *size / cumulative pool)
        if self.skip == "nested":
            outputs = self.nested_decoder(features)
        else:
            x = features.pop()
            for up in self.up:
                x = up(x, features.pop())
            outputs = [x]
        if self.deep_supervision and self.training:
            return [head(output)[crop] for head, output in zip([*self.deep_heads, self.head], outputs)]
        return self.head(outputs[-1])[crop]  # (N, classes, *size)

    def nested_decoder(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """UNet++ nodes column by column; returns X(0, 1) ... X(0, depth)."""
        grid = [[feature] for feature in features]  # grid[i][j] is X(i, j)
        for j, column in enumerate(self.up, start=1):
            for i, node in enumerate(column):
                grid[i].append(node(grid[i + 1][j - 1], *grid[i][:j]))
        return grid[0][1:]


def pad_to_multiple(x: torch.Tensor, multiple: int | Sequence[int], minimum: int | Sequence[int] = 0) -> torch.Tensor:
    """Pad the end of each spatial axis of (N, C, *spatial) to a multiple of `multiple` (and at least
    `minimum`), by reflection where it fits, else by replication.

    An int applies to every spatial axis (the axes after N and C, at least the last two); a
    sequence gives one value per axis for the last len(multiple) axes.
    """
    count = len(multiple) if isinstance(multiple, Sequence) else max(2, x.ndim - 2)
    multiples = tuple(multiple) if isinstance(multiple, Sequence) else (multiple,) * count
    minimums = tuple(minimum) if isinstance(minimum, Sequence) else (minimum,) * count
    sizes = x.shape[x.ndim - count :]
    pads = [max(-size % step, low - size) for size, step, low in zip(sizes, multiples, minimums)]
    if not any(pads):
        return x
    mode = "reflect" if all(pad < size for pad, size in zip(pads, sizes)) else "replicate"
    return F.pad(x, [amount for pad in reversed(pads) for amount in (0, pad)], mode=mode)
