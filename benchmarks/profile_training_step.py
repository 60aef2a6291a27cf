"""Where a training step's time goes, per operator: the nuclei network's forward, loss and backward on 8 tiles of
256², in the standard layout (a bare loop) and channels-last (as unetseg-train runs it), under torch.profiler.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_training_step.py
    ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 \
        .venv/bin/python benchmarks/profile_training_step.py

(the second as on an AVX2 machine; float32 in both, the precision of an AVX2 machine).
"""

import torch
from bench_training import NET, TILE  # benchmarks/ is the script's folder
from peak import machine_line
from torch.profiler import ProfilerActivity, profile

from unetseg.models import UNet
from unetseg.training.losses import SegmentationLoss


def main() -> None:
    print(machine_line())
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = UNet(**NET).train()
        images = torch.rand(8, NET["in_channels"], TILE, TILE)
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        targets = torch.randint(0, NET["classes"], (8, TILE, TILE))
        weights = 1 + torch.rand(8, TILE, TILE)
        loss_fn = SegmentationLoss(NET["classes"])
        for _ in range(2):  # warm-up: oneDNN builds its kernels on the first calls
            loss_fn(net(images), targets, weights).backward()
        with profile(activities=[ProfilerActivity.CPU]) as profiled:
            loss_fn(net(images), targets, weights).backward()
        print("channels-last (unetseg-train)" if channels_last else "standard layout (a bare loop)")
        print(profiled.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
