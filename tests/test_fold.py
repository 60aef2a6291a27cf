import numpy as np
import pytest
import torch
from torch import nn

from unetseg.inference import predict_tiled
from unetseg.inference.engine import pinned_transfer, to_host
from unetseg.inference.fold import fold_batchnorm, inference_copy, instance_as_group_norm, memory_format_of
from unetseg.models import UNet


def trained_statistics(net: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters, then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.randn(size, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(size, generator=generator))
                module.bias.copy_(torch.randn(size, generator=generator))
    return net.eval()


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_folded_unet_equals_the_unfolded_one(block):
    torch.manual_seed(0)  # initial weights and image from a fixed seed: the result must not depend on test order
    net = trained_statistics(UNet(in_channels=2, classes=3, depth=2, width=4, block=block))
    image = torch.randn(2, 2, 40, 36)
    folded = inference_copy(net)
    assert not any(isinstance(module, nn.BatchNorm2d) for module in folded.modules())
    assert sum(isinstance(module, nn.BatchNorm2d) for module in net.modules()) > 0  # the original keeps its own
    fresh = UNet(in_channels=2, classes=3, depth=2, width=4, block=block).eval()
    fresh.load_state_dict({key: value for key, value in net.state_dict().items() if "running" not in key}, strict=False)
    with torch.no_grad():
        expected, got, unfolded_default = net(image), folded(image), fresh(image)
    assert (expected - unfolded_default).abs().max() > 0.1  # the statistics that were folded matter
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_folding_needs_eval_mode_and_counts_what_it_folds():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net)
    assert fold_batchnorm(net.eval()) == 1  # the lone BatchNorm after the ReLU stays
    assert isinstance(net[1], nn.Identity) and isinstance(net[3], nn.BatchNorm2d)


def test_the_prediction_copy_is_cached_and_rebuilt_when_weights_change():
    net = trained_statistics(UNet(in_channels=1, classes=1, depth=2, width=4))
    first = inference_copy(net, channels_last=True)
    assert inference_copy(net, channels_last=True) is first
    assert first.head.weight.is_contiguous(memory_format=torch.channels_last)
    assert inference_copy(net) is not first  # another layout, another copy
    with torch.no_grad():
        net.head.bias.add_(1.0)  # an in-place update, as an optimiser step
    second = inference_copy(net)
    torch.testing.assert_close(second.head.bias, net.head.bias)
    net.train()
    inference_copy(net)
    assert net.training  # never switched to eval


def test_networks_without_conv_weights_run_unchanged():
    identity = nn.Identity().train()
    assert inference_copy(identity) is identity and not identity.training


@pytest.mark.parametrize("amp", [False, True])
def test_predict_tiled_matches_the_unfolded_network(amp):
    net = trained_statistics(UNet(in_channels=1, classes=1, depth=2, width=4))
    image = np.random.default_rng(0).normal(size=(1, 64, 64)).astype(np.float32)
    probs = predict_tiled(net, image, tile_size=64, overlap=16, amp=amp)  # one tile: the whole image
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        expected = torch.sigmoid(net(torch.from_numpy(image)[None]).float())[0].numpy()
    np.testing.assert_allclose(probs, expected, rtol=0, atol=2e-2 if amp else 1e-5)


def test_band_transform_runs_on_the_device_and_yields_its_type():
    net = trained_statistics(UNet(in_channels=1, classes=1, depth=2, width=4))
    image = np.random.default_rng(0).normal(size=(1, 70, 50)).astype(np.float32)
    probs = predict_tiled(net, image, tile_size=32, overlap=8, amp=False)
    from unetseg.inference import iter_predict_bands

    bands = iter_predict_bands(
        net, image, tile_size=32, overlap=8, amp=False, band_transform=lambda p: (p[0] > 0.5).to(torch.uint8)
    )
    mask = np.concatenate([band for _, _, band in bands])
    assert mask.dtype == np.uint8 and mask.shape == (70, 50)
    np.testing.assert_array_equal(mask, (probs[0] > 0.5).astype(np.uint8))


def test_pinned_transfer_is_chosen_for_cuda_and_its_path_runs_on_the_cpu():
    assert pinned_transfer(torch.device("cuda", 0)) and not pinned_transfer(torch.device("cpu"))
    tensor = torch.arange(12.0).reshape(3, 4)
    copied = to_host(tensor[:, 1:], pinned=True)  # the CUDA path: a fresh host buffer, filled by copy_
    np.testing.assert_array_equal(copied, tensor[:, 1:].numpy())
    tensor += 1
    assert copied[0, 0] == 1.0  # a copy, not a view
    view = to_host(tensor, pinned=False)
    assert np.shares_memory(view, tensor.numpy())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bands_come_back_through_pinned_memory_in_bf16():
    from unetseg.runtime.precision import autocast_dtype

    tensor = torch.arange(12.0, device="cuda").reshape(3, 4)
    np.testing.assert_array_equal(to_host(tensor, pinned=True), tensor.cpu().numpy())
    assert autocast_dtype(torch.device("cuda")) is (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    net = trained_statistics(UNet(in_channels=1, classes=1, depth=2, width=4))
    image = np.random.default_rng(0).normal(size=(1, 150, 130)).astype(np.float32)
    expected = predict_tiled(net, image, tile_size=64, overlap=16, amp=False)
    probs = predict_tiled(net.cuda(), image, tile_size=64, overlap=16)  # auto: bf16, channels-last, folded
    np.testing.assert_allclose(probs, expected, atol=3e-2)


@pytest.mark.parametrize("dims,affine", [(2, True), (3, False), (3, True)])
def test_instance_norms_become_equal_group_norms_that_keep_channels_last(dims, affine):
    torch.manual_seed(0)
    norm = (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(6, affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.copy_(torch.randn(6))
            norm.bias.copy_(torch.randn(6))
    conv = (nn.Conv2d if dims == 2 else nn.Conv3d)(3, 6, 3, padding=1)
    net = nn.Sequential(conv, norm, nn.ReLU()).eval()
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    inputs = torch.randn(2, 3, *(12,) * dims).contiguous(memory_format=layout)
    copy = inference_copy(net, channels_last=True)
    assert isinstance(copy[1], nn.GroupNorm) and copy[1].num_groups == 6 and isinstance(net[1], type(norm))
    assert copy[0].weight.is_contiguous(memory_format=layout)
    with torch.no_grad():
        expected, got = net(inputs), copy(inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert got.is_contiguous(memory_format=layout)  # the instance norm itself returns the standard layout
    assert not expected.is_contiguous(memory_format=layout)


def test_instance_norms_with_running_statistics_are_left_alone():
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2, track_running_stats=True)).eval()
    assert instance_as_group_norm(net) == 0 and isinstance(net[1], nn.InstanceNorm3d)


def test_a_3d_unet_predicts_in_channels_last_3d_as_it_did_in_the_standard_layout():
    torch.manual_seed(0)
    net = UNet(in_channels=1, classes=2, depth=2, width=4, norm="instance", spatial_dims=3).eval()
    volume = torch.randn(1, 20, 24, 24).numpy()
    copy = inference_copy(net, channels_last=True)
    assert memory_format_of(copy) == torch.channels_last_3d
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in copy.parameters() if p.ndim == 5)
    with torch.no_grad():
        whole = torch.softmax(net(torch.from_numpy(volume)[None]), 1)[0].numpy()
    tiled = predict_tiled(net, volume, tile_size=(20, 24, 24), overlap=0, amp=False)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)
