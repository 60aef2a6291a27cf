"""The from-scratch UNet and the SMP baseline: shapes, gradients, skip ablation, nested skips,
blocks per level, 3-D volumes, pooling schedules, old checkpoints and argument checks."""

import hashlib
import inspect
import itertools

import pytest
import torch

from unetseg.models import SMPUnet, UNet, build_net, net_state_dict
from unetseg.models.unet import BLOCKS, NORMS, SKIPS, UPSAMPLES, pad_to_multiple, pool_schedule
from unetseg.weights import model_path

TINY = dict(depth=2, width=4)
CONVS = (torch.nn.Conv2d, torch.nn.Conv3d)


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def first_conv(net: UNet) -> torch.nn.Module:
    """The convolution that sees the image first."""
    return next(m for m in net.stem.modules() if isinstance(m, CONVS))


@pytest.mark.parametrize("skip, block", list(itertools.product(SKIPS, BLOCKS)))
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_every_skip_block_upsample_gives_input_size_logits(skip, block, upsample):
    torch.manual_seed(0)
    net = UNet(in_channels=2, classes=3, skip=skip, block=block, upsample=upsample, **TINY)
    for height, width in [(37, 53), (5, 7), (64, 64)]:
        logits = net(torch.randn(2, 2, height, width))
        assert logits.shape == (2, 3, height, width)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("skip, block, blocks_per_level", list(itertools.product(SKIPS, BLOCKS, (1, 2))))
def test_gradient_reaches_the_stem(skip, block, blocks_per_level):
    torch.manual_seed(0)
    net = UNet(skip=skip, block=block, blocks_per_level=blocks_per_level, **TINY)
    logits = net(torch.randn(2, 1, 37, 53))
    assert logits.shape == (2, 1, 37, 53)
    logits.square().mean().backward()
    assert first_conv(net).weight.grad is not None
    assert first_conv(net).weight.grad.norm() > 0


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
        # A convolution followed by a norm has no bias; only the head and upsampling keep theirs.
        assert not all(m.bias is not None for m in net.modules() if isinstance(m, torch.nn.Conv2d))


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
    handles = [up.block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1])) for up in net.up]
    net(image)
    for handle in handles:
        handle.remove()
    return seen


def test_skip_none_ignores_encoder_features():
    torch.manual_seed(0)
    nets = {skip: UNet(skip=skip, **TINY) for skip in ("concat", "add", "none")}
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
            handles = [
                up.register_forward_pre_hook(lambda module, args: (args[0], 50 * torch.randn_like(args[1])))
                for up in net.up
            ]
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
        (dict(skip="sum"), ["skip='sum'", "'concat'", "'add'", "'none'", "'nested'"]),
        (dict(block="bottleneck"), ["block='bottleneck'", "'plain'", "'residual'", "'dense'"]),
        (dict(spatial_dims=1), ["spatial_dims=1", "2", "3"]),
        (dict(blocks_per_level=0), ["blocks_per_level", "positive integer", "0"]),
        (dict(layers=0, block="dense"), ["layers", "positive integer"]),
        (dict(growth=0, block="dense"), ["growth", "positive integer"]),
        (dict(deep_supervision=True), ["deep_supervision", "skip='nested'", "skip='concat'"]),
        (dict(pool=[2]), ["pool", "one kernel per level", "depth=2"]),
        (dict(pool=[2, [1, 2, 2]]), ["pool", "one per axis (2)"]),
        (dict(pool=[2, 0]), ["pool", "positive integers"]),
        (dict(pool=[2, 2], spacing=[1, 1]), ["pool or spacing"]),
        (dict(spacing=[5, 1, 1]), ["spacing", "one value per axis (2)"]),
        (dict(spacing=[0, 1]), ["spacing", "positive"]),
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


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(skip="add", block="residual", norm="group", upsample="bilinear", dropout=0.1),
        dict(skip="nested", block="dense", growth=3, layers=2, blocks_per_level=2, deep_supervision=True),
        dict(spatial_dims=3, pool=[[1, 2, 2], 2], block="dense", norm="instance"),
        dict(spatial_dims=3, spacing=[4.0, 1.0, 1.0], skip="nested"),
    ],
)
def test_config_rebuilds_the_same_architecture(kwargs):
    net = UNet(in_channels=3, classes=2, depth=2, width=4, **kwargs)
    assert set(net.config) == set(inspect.signature(UNet).parameters)  # every argument is recorded
    clone = UNet(**net.config)
    assert clone.config == net.config
    clone.load_state_dict(net.state_dict())  # same parameter names and shapes


def test_default_state_dict_keys_are_those_of_old_checkpoints():
    # sha256 of "key shape" lines of UNet() before dense blocks, nested skips, blocks_per_level and 3-D.
    lines = "\n".join(f"{key} {tuple(value.shape)}" for key, value in UNet().state_dict().items())
    assert len(UNet().state_dict()) == 118
    assert hashlib.sha256(lines.encode()).hexdigest() == (
        "9c64b21f69bd57a5bce115141470564a2617920cf2aa2e6d832c355fc7106534"
    )
    assert {
        "stem.body.0.weight",
        "down.3.1.body.4.weight",
        "up.0.up.weight",
        "up.3.block.body.5.running_var",
        "head.weight",
    } <= set(UNet().state_dict())


def test_shipped_checkpoint_from_before_the_new_arguments_loads_strictly():
    checkpoint = torch.load(model_path("nuclei"), map_location="cpu", weights_only=True)
    description = checkpoint["hyper_parameters"]["net"]
    # The description as checkpoints written before blocks_per_level & co. existed hold it (e9aad8b's
    # nuclei.ckpt; today's shipped one was trained after): the defaults must rebuild the same network.
    old_arguments = ("in_channels", "classes", "depth", "width", "skip", "block", "norm", "upsample", "dropout")
    description = {**description, "init_args": {key: description["init_args"][key] for key in old_arguments}}
    net = build_net(description)
    net.load_state_dict(net_state_dict(checkpoint["state_dict"]), strict=True)


def test_pad_to_multiple_pads_bottom_right_only():
    x = torch.arange(5 * 7, dtype=torch.float32).reshape(1, 1, 5, 7)
    padded = pad_to_multiple(x, 4)
    assert padded.shape == (1, 1, 8, 8)
    torch.testing.assert_close(padded[..., :5, :7], x)
    square = x[..., :4, :4]
    assert pad_to_multiple(square, 4) is square  # already a multiple: untouched
    assert pad_to_multiple(torch.ones(1, 1, 1, 1), 8).shape == (1, 1, 8, 8)
    assert pad_to_multiple(torch.ones(3, 5, 7), 4).shape == (3, 8, 8)  # (C, H, W): H and W, as before


def test_pad_to_multiple_per_axis_and_in_3d():
    x = torch.arange(3 * 5 * 7, dtype=torch.float32).reshape(1, 1, 3, 5, 7)
    padded = pad_to_multiple(x, (2, 4, 4))
    assert padded.shape == (1, 1, 4, 8, 8)
    torch.testing.assert_close(padded[..., :3, :5, :7], x)
    torch.testing.assert_close(padded[..., 3, :5, :7], x[..., 1, :, :])  # reflected, not zeros
    assert pad_to_multiple(x, 4).shape == (1, 1, 4, 8, 8)  # an int pads every spatial axis
    assert pad_to_multiple(x, (1, 1, 1), minimum=(1, 6, 1)).shape == (1, 1, 3, 6, 7)
    # Wider than the axis: replicate, as reflection cannot.
    assert pad_to_multiple(x, (1, 1, 1), minimum=(8, 1, 1)).shape == (1, 1, 8, 5, 7)
    assert pad_to_multiple(x[..., 0, :, :], (1, 8)).shape == (1, 1, 5, 8)  # a sequence: the last axes


def test_wrong_input_dimensions_are_named():
    with pytest.raises(ValueError, match=r"takes \(N, 1, D, H, W\); got \(1, 1, 8, 8\)"):
        UNet(spatial_dims=3, **TINY)(torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match=r"takes \(N, 1, H, W\); got \(1, 2, 8, 8\)"):
        UNet(**TINY)(torch.zeros(1, 2, 8, 8))


@pytest.mark.parametrize("blocks_per_level", [1, 3])
@pytest.mark.parametrize("block", BLOCKS)
def test_blocks_per_level_stacks_blocks_and_keeps_the_resolution_schedule(block, blocks_per_level):
    net = UNet(block=block, blocks_per_level=blocks_per_level, **TINY)
    levels = [net.stem, net.down[0][1], net.up[0].block]  # down[i] is (pool, level's blocks)
    for level in levels:
        assert len(level_blocks(level)) == blocks_per_level
    # The first block of a level changes the channels, the others keep them: 4 -> 8 at down[0].
    first, *rest = level_blocks(net.down[0][1])
    assert first_conv_of(first).in_channels == 4
    assert all(first_conv_of(b).in_channels == 8 for b in rest)
    bottleneck = []
    net.down[-1].register_forward_hook(lambda module, args, output: bottleneck.append(output.shape))
    net(torch.zeros(1, 1, 32, 32))
    assert bottleneck == [(1, 16, 8, 8)]  # depth 2: two halvings whatever the blocks per level
    deeper = UNet(block=block, blocks_per_level=blocks_per_level + 1, **TINY)
    assert count_parameters(deeper) > count_parameters(net)


def level_blocks(level: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of one level: a Sequential of several, or a single bare block."""
    return list(level) if isinstance(level, torch.nn.Sequential) else [level]


def first_conv_of(module: torch.nn.Module) -> torch.nn.Module:
    return next(m for m in module.modules() if isinstance(m, CONVS))


def block_inputs(blocks: list[torch.nn.Module], run) -> list[int]:
    """Channels entering each of `blocks` during `run()`, recorded with forward pre-hooks."""
    seen = {}

    def recorder(index: int):
        def hook(module, args):
            seen[index] = args[0].shape[1]

        return hook

    handles = [b.register_forward_pre_hook(recorder(i)) for i, b in enumerate(blocks)]
    run()
    for handle in handles:
        handle.remove()
    return [seen[i] for i in range(len(blocks))]


def test_nested_nodes_see_every_earlier_node_of_their_level():
    net = UNet(skip="nested", **TINY)  # levels of 4, 8, 16 channels
    # net.up[j - 1][i] is X(i, j): it sees X(i, 0..j-1) and the upsampled X(i+1, j-1), c_i channels each.
    nodes = {(i, j): net.up[j - 1][i] for j in (1, 2) for i in range(3 - j)}
    seen = block_inputs([node.block for node in nodes.values()], lambda: net(torch.zeros(1, 1, 16, 16)))
    assert dict(zip(nodes, seen)) == {(0, 1): 4 + 4, (1, 1): 8 + 8, (0, 2): 4 + 4 + 4}
    concat = UNet(skip="concat", **TINY)
    assert count_parameters(net) > count_parameters(concat)


@pytest.mark.parametrize("block", BLOCKS)
def test_nested_deep_supervision_gives_depth_outputs_in_training_one_in_eval(block):
    torch.manual_seed(0)
    net = UNet(classes=2, skip="nested", deep_supervision=True, block=block, norm="group", depth=3, width=4)
    image = torch.randn(2, 1, 37, 53)
    outputs = net.train()(image)
    assert isinstance(outputs, list) and len(outputs) == 3
    assert all(output.shape == (2, 2, 37, 53) for output in outputs)
    sum(output.square().mean() for output in outputs).backward()
    assert all(head.weight.grad.norm() > 0 for head in [*net.deep_heads, net.head])
    with torch.no_grad():
        logits = net.eval()(image)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 2, 37, 53)
    torch.testing.assert_close(logits, outputs[-1].detach())  # eval: the last output, X(0, depth)
    assert isinstance(UNet(skip="nested", **TINY).train()(image[:, :1]), torch.Tensor)  # off by default


@pytest.mark.parametrize("skip, block", list(itertools.product(SKIPS, BLOCKS)))
def test_3d_every_skip_and_block_gives_volume_logits_and_gradients(skip, block):
    torch.manual_seed(0)
    net = UNet(in_channels=2, classes=3, spatial_dims=3, skip=skip, block=block, **TINY)
    volume = torch.randn(2, 2, 9, 37, 21)
    logits = net(volume)
    assert logits.shape == (2, 3, 9, 37, 21)
    logits.square().mean().backward()
    assert first_conv(net).weight.grad.norm() > 0
    assert isinstance(first_conv(net), torch.nn.Conv3d)
    assert not any(isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) for m in net.modules())
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 2, 1, 3, 2)).shape == (1, 3, 1, 3, 2)  # tiny volumes too


@pytest.mark.parametrize(
    "norm, norm_type",
    [("batch", torch.nn.BatchNorm3d), ("instance", torch.nn.InstanceNorm3d), ("group", torch.nn.GroupNorm)],
)
@pytest.mark.parametrize("upsample", UPSAMPLES)
def test_3d_norms_and_upsampling(norm, norm_type, upsample):
    net = UNet(spatial_dims=3, norm=norm, upsample=upsample, blocks_per_level=2, **TINY)
    assert norm_type in {type(m) for m in net.modules()}
    if upsample == "bilinear":
        assert {m.mode for m in net.modules() if isinstance(m, torch.nn.Upsample)} == {"trilinear"}
    else:
        assert any(isinstance(m, torch.nn.ConvTranspose3d) for m in net.modules())
    assert net(torch.randn(2, 1, 5, 9, 11)).shape == (2, 1, 5, 9, 11)


def test_anisotropic_pool_gives_the_expected_bottleneck():
    net = UNet(spatial_dims=3, pool=[[1, 2, 2], [2, 2, 2]], **TINY)
    assert net.spatial_dims == 3 and net.size_multiple == (2, 4, 4)
    assert [m.kernel_size for m in net.modules() if isinstance(m, torch.nn.MaxPool3d)] == [(1, 2, 2), (2, 2, 2)]
    assert [up.up.kernel_size for up in net.up] == [(2, 2, 2), (1, 2, 2)]  # bottom to top
    bottleneck = []
    net.down[-1].register_forward_hook(lambda module, args, output: bottleneck.append(output.shape))
    assert net(torch.randn(1, 1, 9, 37, 21)).shape == (1, 1, 9, 37, 21)
    # Padded to (10, 40, 24), multiples of (2, 4, 4); then z halved once, y and x twice.
    assert bottleneck == [(1, 16, 5, 10, 6)]


@pytest.mark.parametrize(
    "spacing, depth, expected",
    [
        # (5, 1, 1): z is coarser than 2x the finest (1) until y, x reach 4 after two poolings.
        ((5, 1, 1), 4, [[1, 2, 2], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),  # spacings (5,2,2) (5,4,4) (10,8,8) (20,16,16)
        ((3, 1, 1), 3, [[1, 2, 2], [2, 2, 2], [2, 2, 2]]),  # (3,2,2): 3 <= 4, so z joins at the second level
        ((2, 1, 1), 2, [[2, 2, 2], [2, 2, 2]]),  # 2 <= 2 * 1: isotropic enough from the start
        ((1, 1, 1), 2, [[2, 2, 2], [2, 2, 2]]),
        ((1, 3), 3, [[2, 1], [2, 2], [2, 2]]),  # 2-D: (2, 3), then 3 <= 4
        ((0.5, 0.5, 2.5), 3, [[2, 2, 1], [2, 2, 1], [2, 2, 2]]),  # (1, 1, 2.5): 2.5 > 2; (2, 2, 2.5): 2.5 <= 4
    ],
)
def test_pool_schedule_by_hand(spacing, depth, expected):
    assert pool_schedule(spacing, depth) == expected


def test_spacing_derives_the_pool_and_size_multiple():
    net = UNet(spatial_dims=3, depth=4, width=4, spacing=(5.0, 1.0, 1.0))
    assert net.pool == [(1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2)]
    assert net.size_multiple == (4, 16, 16) and net.min_size == (8, 32, 32)
    assert UNet().size_multiple == (16, 16) and UNet().spatial_dims == 2
    assert UNet(**TINY).pool == [(2, 2), (2, 2)]


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
