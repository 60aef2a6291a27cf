"""GPU throughput: predict_tiled in Mpx/s and a bare training step in steps/s, as fractions of the bf16 peak.

    python benchmarks/bench_gpu.py            # run by benchmarks/gpu_check.sh

The peak is measured, not looked up: the best rate of large bfloat16 matmuls on this GPU (dense
tensor-core rate). The U-Net's FLOPs come from torch's FLOP counter; the fraction is the
network's achieved FLOP rate over that peak. Every configuration is timed after a warm-up, with
the device synchronised around it.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from unetseg.inference import predict_tiled
from unetseg.inference.tiling import tile_starts
from unetseg.models import UNet
from unetseg.training.losses import SegmentationLoss


def synchronized_seconds(function, repeats: int = 3) -> float:
    """Best wall time of `function` over `repeats` calls, the GPU synchronised before and after each."""
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def bf16_peak(size: int = 8192) -> float:
    """Measured dense bfloat16 matmul FLOP/s: the peak the fractions refer to."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    a @ b  # warm-up (cuBLAS heuristics)
    seconds = synchronized_seconds(lambda: [a @ b for _ in range(10)])
    return 10 * 2 * size**3 / seconds


def count_flops(function) -> int:
    """FLOPs of one call of `function`, by torch's FLOP counter."""
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def inference(peak: float, size: int, batch_size: int) -> None:
    """predict_tiled of a size x size image: float32, automatic (bf16 + channels-last + folded BN), and compiled."""
    net = UNet(in_channels=1, classes=1, depth=4, width=32).cuda().eval()
    image = torch.rand(1, size, size, device="cuda")
    tile = torch.rand(batch_size, 1, 256, 256, device="cuda")
    with torch.inference_mode():
        flops_per_tile = count_flops(lambda: net(tile)) / batch_size
    tiles = len(tile_starts(size, 256, 64)) ** 2  # the grid predict_tiled cuts
    print(f"predict_tiled UNet(depth 4, width 32), {size}x{size}, tile 256, overlap 64, batch {batch_size}:")
    print(f"{'precision':<22}{'seconds':>9}{'Mpx/s':>9}{'of bf16 peak':>14}{'peak memory MiB':>17}")
    for name, options in (
        ("fp32", dict(amp=False)),
        ("auto (bf16)", dict(amp=None)),
        ("auto + torch.compile", dict(amp=None, compile=True)),
    ):

        def run():
            return predict_tiled(net, image, tile_size=256, overlap=64, batch_size=batch_size, **options)

        run()  # warm-up: the prepared copy, cuDNN autotuning, compilation
        torch.cuda.reset_peak_memory_stats()
        seconds = synchronized_seconds(run)
        rate = tiles * flops_per_tile / seconds
        print(
            f"{name:<22}{seconds:>9.3f}{size * size / 1e6 / seconds:>9.1f}{rate / peak:>14.1%}"
            f"{torch.cuda.max_memory_allocated() / 2**20:>17.0f}"
        )


def training(peak: float, batch_size: int, tile: int, steps: int) -> None:
    """A bare training step (forward, loss, backward, AdamW) of the nuclei network in float32 and bf16 autocast."""
    print(f"training step UNet(3 -> 3, depth 4, width 16), batch {batch_size} x {tile}x{tile}:")
    print(f"{'precision':<22}{'steps/s':>9}{'Mpx/s':>9}{'of bf16 peak':>14}")
    for name, bf16, channels_last, compiled in (
        ("fp32", False, False, False),
        ("bf16 + channels-last", True, True, False),
        ("bf16 + CL + compile", True, True, True),
    ):
        torch.manual_seed(0)
        net = UNet(in_channels=3, classes=3, depth=4, width=16).cuda()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        net = net.to(memory_format=memory_format)
        model: nn.Module = torch.compile(net) if compiled else net
        loss_fn = SegmentationLoss(3)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, fused=True)
        images = torch.rand(batch_size, 3, tile, tile, device="cuda").contiguous(memory_format=memory_format)
        targets = torch.randint(0, 3, (batch_size, tile, tile), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
                loss = loss_fn(model(images), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            step()  # warm-up
        flops = count_flops(step)
        seconds = synchronized_seconds(lambda: [step() for _ in range(steps)], repeats=2) / steps
        print(
            f"{name:<22}{1 / seconds:>9.2f}{batch_size * tile * tile / 1e6 / seconds:>9.1f}"
            f"{flops / seconds / peak:>14.1%}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--train-tile", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: no CUDA device")
    torch.backends.cudnn.benchmark = True
    peak = bf16_peak()
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}: "
        f"measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s"
    )
    inference(peak, args.size, args.batch_size)
    training(peak, args.train_batch, args.train_tile, args.steps)


if __name__ == "__main__":
    main()
