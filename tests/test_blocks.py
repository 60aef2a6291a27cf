"""The U-Net's blocks: dense block channel arithmetic and parameter counts worked out by hand,
and every block in 2-D and 3-D."""

import pytest
import torch

from unetseg.models.blocks import BLOCK_TYPES, DenseBlock, make_norm
from unetseg.models.unet import UNet


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layer_inputs(block: DenseBlock, x: torch.Tensor) -> list[int]:
    """Channels entering each dense layer and the transition, recorded with forward pre-hooks."""
    seen = []
    modules = [*block.layers, block.transition]
    handles = [m.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1])) for m in modules]
    block(x)
    for handle in handles:
        handle.remove()
    return seen


def test_dense_block_channel_arithmetic():
    block = DenseBlock(4, 8, growth=2, layers=3)
    x = torch.randn(2, 4, 9, 11)
    assert block(x).shape == (2, 8, 9, 11)  # the transition sets the output channels
    assert layer_inputs(block, x) == [4, 4 + 2, 4 + 2 + 2, 4 + 3 * 2]  # each layer sees the input and all before
    decoder = DenseBlock(4, 8, growth=2, layers=3, keep_input=False)
    assert layer_inputs(decoder, x) == [4, 6, 8, 3 * 2]  # the transition sees only the new maps
    assert decoder(x).shape == (2, 8, 9, 11)


@pytest.mark.parametrize(
    "norm, keep_input, expected",
    [
        # Layer 0: BN(4) 2*4 + conv 3x3 4->2 4*2*9;  layer 1: BN(6) 2*6 + conv 3x3 6->2 6*2*9;
        # transition: conv 1x1 (4 + 2*2 = 8)->8 8*8 + BN(8) 2*8.
        ("batch", True, 8 + 72 + 12 + 108 + 64 + 16),  # 280
        ("batch", False, 8 + 72 + 12 + 108 + 4 * 8 + 16),  # transition 4->8: 248
        # No norm: no norm parameters, every convolution has a bias: 72+2, 108+2, 64+8.
        ("none", True, 74 + 110 + 72),  # 256
    ],
)
def test_dense_block_parameter_count_by_hand(norm, keep_input, expected):
    block = DenseBlock(4, 8, norm=norm, growth=2, layers=2, keep_input=keep_input)
    assert count_parameters(block) == expected


def test_dense_unet_growth_doubles_per_level_and_decoder_uses_new_maps_only():
    net = UNet(block="dense", depth=2, width=4, layers=3)  # growth None: width // 2 = 2 at the first level
    growths = [level.layers[0][2].out_channels for level in (net.stem, net.down[0][1], net.down[1][1])]
    assert growths == [2, 4, 8]
    assert all(level.keep_input for level in (net.stem, net.down[0][1], net.down[1][1]))
    # Decoder: level 1 then level 0, transitions see layers * growth = 3 * 4 and 3 * 2 channels.
    assert [up.block.keep_input for up in net.up] == [False, False]
    assert [up.block.transition[0].in_channels for up in net.up] == [12, 6]
    assert [up.block.transition[0].out_channels for up in net.up] == [8, 4]
    assert UNet(block="dense", depth=2, width=4, growth=5).stem.layers[0][2].out_channels == 5


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("block", BLOCK_TYPES)
@pytest.mark.parametrize("norm", ["batch", "group", "instance", "none"])
def test_every_block_in_2d_and_3d(block, norm, spatial_dims):
    torch.manual_seed(0)
    module = BLOCK_TYPES[block](3, 6, norm, 0.1, spatial_dims)
    x = torch.randn(2, 3, *(5,) * spatial_dims, requires_grad=True)
    y = module(x)
    assert y.shape == (2, 6, *(5,) * spatial_dims)
    assert (y >= 0).all()  # every block hands on ReLU activations
    y.sum().backward()
    assert x.grad.abs().sum() > 0
    conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
    assert any(isinstance(m, conv) for m in module.modules())
    assert all(m.bias is None for m in module.modules() if isinstance(m, conv)) == (norm != "none")


def test_make_norm_by_dimension():
    assert isinstance(make_norm("batch", 8, 3), torch.nn.BatchNorm3d)
    assert isinstance(make_norm("instance", 8, 3), torch.nn.InstanceNorm3d)
    assert isinstance(make_norm("batch", 8), torch.nn.BatchNorm2d)
    assert make_norm("group", 12).num_groups == 1 and make_norm("group", 16).num_groups == 8
