"""scripts/widen.py: a U-Net widened to twice its width computes what the narrow one did."""

import importlib.util
from pathlib import Path

import pytest
import torch

from unetseg.inference.loading import load_predictor
from unetseg.models import UNet
from unetseg.models.checkpoint import read_checkpoint

spec = importlib.util.spec_from_file_location("widen", Path(__file__).parents[1] / "scripts" / "widen.py")
widen = importlib.util.module_from_spec(spec)
spec.loader.exec_module(widen)


@pytest.mark.parametrize("noise", [0.0, widen.NOISE])
def test_the_wide_network_gives_the_narrow_ones_probabilities(checkpoint, tmp_path, monkeypatch, noise):
    monkeypatch.setattr(widen, "NOISE", noise)
    target = tmp_path / "wide.ckpt"
    widen.main(str(checkpoint), str(target))

    narrow, _ = load_predictor(checkpoint, "cpu")
    wide, _ = load_predictor(target, "cpu")
    assert wide.config["width"] == 2 * narrow.config["width"]
    assert sum(p.numel() for p in wide.parameters()) > 3 * sum(p.numel() for p in narrow.parameters())
    x = torch.rand(2, narrow.config["in_channels"], 64, 64)
    with torch.no_grad():
        before, after = narrow(x).softmax(1), wide(x).softmax(1)
    assert before.shape == after.shape
    assert (before - after).abs().max() < (1e-4 if noise == 0 else 0.05)  # the noise only breaks the symmetry


def test_the_copies_differ_so_that_they_train_apart(checkpoint, tmp_path):
    target = tmp_path / "wide.ckpt"
    widen.main(str(checkpoint), str(target))
    wide = read_checkpoint(target)
    assert "optimizer_states" in read_checkpoint(checkpoint) and "optimizer_states" not in wide  # weights only
    stem = wide["state_dict"]["net.stem.body.0.weight"]
    assert stem.shape[0] % 2 == 0
    assert torch.allclose(stem[0::2], stem[1::2], atol=0.05)
    assert not torch.equal(stem[0::2], stem[1::2])


def test_a_shape_that_is_not_a_doubling_is_refused():
    with pytest.raises(SystemExit, match="is not a doubling"):
        widen.widen_tensor("stem.weight", torch.zeros(4, 3), torch.Size([12, 3]), torch.Generator())


@pytest.mark.parametrize("shape", [dict(block="plain"), dict(block="residual"), dict(skip="add")])
def test_every_block_and_skip_kind_is_widened_exactly(shape, monkeypatch):
    monkeypatch.setattr(widen, "NOISE", 0.0)
    narrow = UNet(in_channels=3, classes=3, depth=3, width=4, **shape).eval()
    for module in narrow.modules():  # statistics unlike the fresh ones, so that copying them matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    wide = UNet(in_channels=3, classes=3, depth=3, width=8, **shape).eval()
    wide.load_state_dict(widen.widen_weights(narrow.state_dict(), wide, torch.Generator()))
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert (narrow(x) - wide(x)).abs().max() < 1e-5


def test_dense_blocks_whose_growth_does_not_double_are_refused_by_name():
    narrow, wide = UNet(block="dense", width=4), UNet(block="dense", width=8)
    with pytest.raises(SystemExit, match=r"stem\.layers\.1\.0\.weight: .* is not a doubling"):
        widen.widen_weights(narrow.state_dict(), wide, torch.Generator())


def test_the_input_dimension_of_a_transposed_convolution_is_its_first(monkeypatch):
    monkeypatch.setattr(widen, "NOISE", 0.0)
    narrow = torch.nn.ConvTranspose2d(2, 3, 2, stride=2)  # weight (in 2, out 3, 2, 2)
    wide = torch.nn.ConvTranspose2d(4, 3, 2, stride=2)  # only the input doubles
    weights = widen.widen_weights(narrow.state_dict(), wide, torch.Generator())
    assert torch.equal(weights["weight"], narrow.weight.detach().repeat_interleave(2, dim=0) / 2)
    wide.load_state_dict(weights)
    x = torch.rand(1, 2, 5, 5)
    with torch.no_grad():
        assert torch.allclose(narrow(x), wide(x.repeat_interleave(2, dim=1)), atol=1e-6)


def test_only_unetseg_unets_are_widened(tmp_path):
    source = tmp_path / "smp.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {"class_path": "unetseg.models.SMPUnet"}}}, source)
    with pytest.raises(SystemExit, match=r"smp\.ckpt: a unetseg\.models\.baseline\.SMPUnet network; only"):
        widen.main(str(source), str(tmp_path / "wide.ckpt"))
    assert not (tmp_path / "wide.ckpt").exists()
