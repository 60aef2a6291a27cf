"""Widen a trained U-Net to twice its width, computing the same function (Net2Net's Net2WiderNet):

python scripts/widen.py SMALL.ckpt WIDE.ckpt
python scripts/train.py ... --model.pretrained WIDE.ckpt --model.net.init_args.width 32

Every doubled channel is a copy of its original (channel j of the wide net is channel j // 2 of
the narrow one, which also maps concatenated skips correctly), and the weights that read doubled
inputs are halved, so the sum over both copies is the original. A little noise (0.1% of each
tensor's spread) breaks the symmetry between the copies, which would otherwise train identically.
"""

import sys

import torch
from torch import nn

from unetseg.models import UNet
from unetseg.models.checkpoint import (
    CheckpointError,
    checked_net_description,
    net_state_dict,
    read_checkpoint,
    save_checkpoint,
)

NOISE = 0.001  # of each weight tensor's standard deviation


def widen_tensor(
    name: str, old: torch.Tensor, shape: torch.Size, generator: torch.Generator, input_dim: int = 1
) -> torch.Tensor:
    """`old` grown to `shape` (each dimension equal or doubled) by copying channel j // 2 into j.

    input_dim: the dimension of a weight that reads the layer's input, halved when it doubles:
    1 for convolutions (out, in, ...), 0 for transposed ones (in, out, ...).
    """
    new = old
    for dim, (was, now) in enumerate(zip(old.shape, shape)):
        if now == was:
            continue
        if now != 2 * was:
            raise SystemExit(f"{name}: {tuple(old.shape)} -> {tuple(shape)} is not a doubling")
        new = new.repeat_interleave(2, dim=dim)
        if old.dim() > 1 and dim == input_dim:
            new = new * 0.5
    if new.is_floating_point() and old.dim() > 1:
        new = new + torch.randn(new.shape, generator=generator) * NOISE * float(old.float().std())
    return new.to(old.dtype)


def widen_weights(weights: dict, wide: nn.Module, generator: torch.Generator) -> dict:
    """The state dict of `wide` (a network at twice the width of the one `weights` come from)."""
    transposed = {
        f"{name}.weight" if name else "weight"
        for name, module in wide.named_modules()
        if isinstance(module, nn.ConvTranspose2d | nn.ConvTranspose3d)
    }
    return {
        name: widen_tensor(name, weights[name], template.shape, generator, 0 if name in transposed else 1)
        for name, template in wide.state_dict().items()
    }


def main(source: str, target: str) -> None:
    """Write the checkpoint `source`'s network at twice its width to `target`."""
    try:
        checkpoint = read_checkpoint(source)
        description = checked_net_description(checkpoint.get("hyper_parameters", {}).get("net"), source)
    except CheckpointError as error:
        raise SystemExit(str(error)) from None
    if description["class_path"] != "unetseg.models.unet.UNet":
        raise SystemExit(f"{source}: a {description['class_path']} network; only unetseg's own UNet is widened")
    weights = net_state_dict(checkpoint["state_dict"])
    init = description["init_args"]
    init["width"] = 2 * init["width"]
    wide = widen_weights(weights, UNet(**init), torch.Generator().manual_seed(0))
    checkpoint["hyper_parameters"]["net"]["init_args"] = init
    # Weights only: the narrow run's optimiser state fits no wide network (start with --model.pretrained).
    kept = {key: checkpoint[key] for key in ("pytorch-lightning_version", "hyper_parameters") if key in checkpoint}
    save_checkpoint(kept | {"state_dict": {"net." + name: value for name, value in wide.items()}}, target)
    print(f"{target}: width {init['width'] // 2} -> {init['width']}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
