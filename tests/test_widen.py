"""scripts/widen.py: a U-Net widened to twice its width computes what the narrow one did."""

import importlib.util
from pathlib import Path

import pytest
import torch

from unetseg.checkpoint import load_predictor, read_checkpoint
from unetseg.models import UNet

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
    old, generator = narrow.state_dict(), torch.Generator()
    wide.load_state_dict({k: widen.widen_tensor(k, old[k], v.shape, generator) for k, v in wide.state_dict().items()})
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert (narrow(x) - wide(x)).abs().max() < 1e-5


def test_dense_blocks_whose_growth_does_not_double_are_refused_by_name():
    narrow, wide = UNet(block="dense", width=4).state_dict(), UNet(block="dense", width=8).state_dict()
    with pytest.raises(SystemExit, match=r"stem\.layers\.1\.0\.weight: .* is not a doubling"):
        for name, template in wide.items():
            widen.widen_tensor(name, narrow[name], template.shape, torch.Generator())
