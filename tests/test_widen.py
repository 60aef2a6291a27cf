"""scripts/widen.py: a U-Net widened to twice its width computes what the narrow one did."""

import importlib.util
from pathlib import Path

import pytest
import torch

from unetseg.checkpoint import load_predictor, read_checkpoint

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
    stem = read_checkpoint(target)["state_dict"]["net.stem.body.0.weight"]
    assert stem.shape[0] % 2 == 0
    assert torch.allclose(stem[0::2], stem[1::2], atol=0.05)
    assert not torch.equal(stem[0::2], stem[1::2])


def test_a_shape_that_is_not_a_doubling_is_refused():
    with pytest.raises(SystemExit, match="is not a doubling"):
        widen.widen_tensor("stem.weight", torch.zeros(4, 3), torch.Size([12, 3]), torch.Generator())
