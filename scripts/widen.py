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

from unetseg.checkpoint import net_state_dict, read_checkpoint, save_checkpoint
from unetseg.models import UNet

NOISE = 0.001  # of each weight tensor's standard deviation


def widen_tensor(name: str, old: torch.Tensor, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """`old` grown to `shape` (each dimension equal or doubled) by copying channel j // 2 into j."""
    new = old
    halve = 1.0
    for dim, (was, now) in enumerate(zip(old.shape, shape)):
        if now == was:
            continue
        if now != 2 * was:
            raise SystemExit(f"{name}: {tuple(old.shape)} -> {tuple(shape)} is not a doubling")
        new = new.repeat_interleave(2, dim=dim)
        # The input dimension of a weight: 1 for Conv (out, in, ...), 0 for ConvTranspose (in, out, ...).
        reads_input = old.dim() > 1 and dim == (0 if "up.weight" in name else 1)
        halve *= 0.5 if reads_input else 1.0
    new = new * halve
    if new.is_floating_point() and old.dim() > 1:
        new = new + torch.randn(new.shape, generator=generator) * NOISE * float(old.float().std())
    return new.to(old.dtype)


def main(source: str, target: str) -> None:
    """Write the checkpoint `source`'s network at twice its width to `target`."""
    checkpoint = read_checkpoint(source)
    weights = net_state_dict(checkpoint["state_dict"])
    init = dict(checkpoint["hyper_parameters"]["net"]["init_args"])
    init["width"] = 2 * init["width"]
    wide = UNet(**init).state_dict()
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, template in wide.items():
        state["net." + name] = widen_tensor(name, weights[name], template.shape, generator)
    checkpoint["hyper_parameters"]["net"]["init_args"] = init
    # Weights only: the narrow run's optimiser state fits no wide network (start with --model.pretrained).
    kept = {key: checkpoint[key] for key in ("pytorch-lightning_version", "hyper_parameters") if key in checkpoint}
    save_checkpoint(kept | {"state_dict": state}, target)
    print(f"{target}: width {init['width'] // 2} -> {init['width']}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
