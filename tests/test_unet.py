"""The from-scratch UNet and the SMP baseline: shapes, gradients, skip ablation and argument checks."""

import inspect
import itertools

import pytest
import torch

from unetseg.models import SMPUnet, UNet
from unetseg.models.unet import BLOCKS, NORMS, SKIPS, UPSAMPLES, pad_to_multiple

TINY = dict(depth=2, width=4)


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("skip, block", list(itertools.product(SKIPS, BLOCKS)))
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_every_skip_block_upsample_gives_input_size_logits(skip, block, upsample):
    torch.manual_seed(0)
    net = UNet(in_channels=2, classes=3, skip=skip, block=block, upsample=upsample, **TINY)
    for height, width in [(37, 53), (5, 7), (64, 64)]:
        logits = net(torch.randn(2, 2, height, width))
        assert logits.shape == (2, 3, height, width)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("skip, block", list(itertools.product(SKIPS, BLOCKS)))
def test_gradient_reaches_the_stem(skip, block):
    torch.manual_seed(0)
    net = UNet(skip=skip, block=block, **TINY)
    net(torch.randn(2, 1, 37, 53)).square().mean().backward()
    stem_conv = next(m for m in net.stem.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem_conv.weight.grad is not None
    assert stem_conv.weight.grad.norm() > 0


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("block", BLOCKS)
def test_every_norm_gives_input_size_logits_and_gradients(norm, block):
    torch.manual_seed(0)
    net = UNet(in_channels=3, classes=2, norm=norm, block=block, **TINY)
    image = torch.randn(2, 3, 37, 53, requires_grad=True)
    logits = net(image)
    assert logits.shape == (2, 2, 37, 53)
    logits.sum().backward()
    assert image.grad.abs().sum() > 0
    norm_types = {"batch": torch.nn.BatchNorm2d, "group": torch.nn.GroupNorm, "instance": torch.nn.InstanceNorm2d}
    found = {type(m) for m in net.modules()}
    if norm == "none":
        assert not found & set(norm_types.values())
        assert all(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    else:
        assert norm_types[norm] in found


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_tiny_inputs_in_eval_mode(norm):
    net = UNet(norm=norm, **TINY).eval()
    for height, width in [(1, 1), (2, 3), (5, 7), (4, 4)]:
        with torch.no_grad():
            assert net(torch.randn(1, 1, height, width)).shape == (1, 1, height, width)


def test_instance_norm_accepts_inputs_up_to_two_to_the_depth():
    net = UNet(norm="instance", **TINY).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 1, 4, 4)).shape == (1, 1, 4, 4)


def test_depth_and_width_set_the_channel_ladder():
    net = UNet(in_channels=1, classes=1, depth=3, width=4)
    assert len(net.down) == 3 and len(net.up) == 3
    bottom_conv = [m for m in net.down[-1].modules() if isinstance(m, torch.nn.Conv2d)][-1]
    assert bottom_conv.out_channels == 4 * 2**3
    assert net.head.in_channels == 4 and net.head.out_channels == 1


def decoder_block_inputs(net: UNet, image: torch.Tensor) -> list[int]:
    """Channels entering each decoder block, recorded with forward pre-hooks."""
    seen = []
    handles = [up.block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
               for up in net.up]
    net(image)
    for handle in handles:
        handle.remove()
    return seen


def test_skip_none_ignores_encoder_features():
    torch.manual_seed(0)
    nets = {skip: UNet(skip=skip, **TINY) for skip in SKIPS}
    image = torch.randn(1, 1, 32, 32)
    # Decoder levels: 16 -> 8 channels, then 8 -> 4; upsampling halves, concat adds the skip.
    assert decoder_block_inputs(nets["concat"], image) == [8 + 8, 4 + 4]
    assert decoder_block_inputs(nets["add"], image) == [8, 4]
    assert decoder_block_inputs(nets["none"], image) == [8, 4]
    assert count_parameters(nets["none"]) < count_parameters(nets["concat"])

    # Replacing every encoder skip with noise changes the output for concat/add, never for none.
    for skip, net in nets.items():
        net.eval()
        with torch.no_grad():
            plain = net(image)
            handles = [up.register_forward_pre_hook(lambda module, args: (args[0], 50 * torch.randn_like(args[1])))
                       for up in net.up]
            perturbed = net(image)
            for handle in handles:
                handle.remove()
        if skip == "none":
            torch.testing.assert_close(plain, perturbed)
        else:
            assert (plain - perturbed).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(skip="sum"), ["skip='sum'", "'concat'", "'add'", "'none'"]),
        (dict(block="dense"), ["block='dense'", "'plain'", "'residual'"]),
        (dict(norm="layer"), ["norm='layer'", "'batch'", "'group'", "'instance'", "'none'"]),
        (dict(upsample="nearest"), ["upsample='nearest'", "'transpose'", "'bilinear'"]),
        (dict(depth=0), ["depth", "positive integer", "0"]),
        (dict(width=-4), ["width", "positive integer", "-4"]),
        (dict(in_channels=0), ["in_channels", "positive integer"]),
        (dict(classes=0), ["classes", "positive integer"]),
        (dict(width=4.0), ["width", "positive integer", "4.0"]),
        (dict(dropout=1.0), ["dropout", "[0, 1)"]),
    ],
)
def test_bad_arguments_name_option_and_choices(kwargs, words):
    with pytest.raises(ValueError) as error:
        UNet(**{**TINY, **kwargs})
    for word in words:
        assert word in str(error.value)


def test_config_rebuilds_the_same_architecture():
    net = UNet(in_channels=3, classes=2, depth=2, width=4, skip="add", block="residual", norm="group",
               upsample="bilinear", dropout=0.1)
    clone = UNet(**net.config)
    assert clone.config == net.config
    clone.load_state_dict(net.state_dict())  # same parameter names and shapes


def test_pad_to_multiple_pads_bottom_right_only():
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 1, 8, 8)
    torch.testing.assert_close(padded[..., :5, :7], x)
    square = x[..., :4, :4]
    assert pad_to_multiple(square, 4) is square  # already a multiple: untouched
    assert pad_to_multiple(torch.ones(1, 1, 1, 1), 8).shape == (1, 1, 8, 8)


def test_smp_unet_output_shape_and_defaults():
    torch.manual_seed(0)
    net = SMPUnet(in_channels=1, classes=2, encoder_name="resnet18")  # depth 5: padded to 96x64
    assert net.config["encoder_weights"] is None
    logits = net(torch.randn(2, 1, 70, 45))
    assert logits.shape == (2, 2, 70, 45)
    # Nothing is downloaded by default.
    assert inspect.signature(SMPUnet).parameters["encoder_weights"].default is None


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(encoder_name="resnet-unknown"), ["encoder_name='resnet-unknown'", "get_encoder_names"]),
        (dict(encoder_depth=2), ["encoder_depth", "2"]),
        (dict(encoder_depth=6), ["encoder_depth", "6"]),
    ],
)
def test_smp_unet_bad_arguments(kwargs, words):
    with pytest.raises(ValueError) as error:
        SMPUnet(**kwargs)
    for word in words:
        assert word in str(error.value)
