"""3-D tiled prediction against MONAI's sliding_window_inference: a 3-D U-Net on a 64 x 256 x 256 volume, 64^3 patches.

    .venv/bin/pip install monai   # for this benchmark only
    .venv/bin/python benchmarks/bench_volume.py          # ~3 min on 2 cores

The network is the package's 3-D U-Net as configs/unet3d.yaml builds it (depth 3, width 16,
residual blocks, instance norm, first level pooled in-plane only), with random weights:
prediction time does not depend on them. Both predict the same volume with the same network
object, patches of 64^3, 16 voxels of overlap (MONAI: overlap=0.25), gaussian blending
(sigma = patch / 8), batch 4:

- unetseg: `predict_volume_tiled` at its defaults (automatic precision: bfloat16 where the CPU
  computes it natively), and in float32;
- MONAI: `sliding_window_inference` in float32 as a user calls it, and under bfloat16 autocast.

The runs take turns in one process after a warm-up round; best of `--rounds`. Errors are mean
|probabilities - a whole-volume forward pass in float32| beyond 8 voxels of the border. The
forward rate (torch's FLOP counter) of one batch is given as a fraction of this machine's matmul
peak measured in the same run (benchmarks/peak.py).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from peak import machine_line, matmul_peak, measured_dtypes  # benchmarks/ is the script's folder
from torch import nn

from unetseg.inference import autocast_dtype
from unetseg.inference.fold import inference_copy, memory_format_of
from unetseg.inference.volume import predict_volume_tiled
from unetseg.models.unet import UNet

PATCH = 64
OVERLAP = 16
BATCH = 4
NET = dict(
    in_channels=1,
    classes=3,
    depth=3,
    width=16,
    skip="concat",
    block="residual",
    norm="instance",
    spatial_dims=3,
    pool=[[1, 2, 2], [2, 2, 2], [2, 2, 2]],
)


def unet3d() -> nn.Module:
    torch.manual_seed(0)
    return UNet(**NET).eval()


def nuclei_volume(shape: tuple[int, int, int]) -> np.ndarray:
    """A normalised (1, Z, Y, X) float32 volume: bright ellipsoids on noise."""
    rng = np.random.default_rng(0)
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    blobs = np.sin(z / 5.0) * np.sin(y / 9.0) * np.sin(x / 9.0) > 0.3
    return (blobs + 0.3 * rng.normal(size=shape)).astype(np.float32)[None]


def softmax_forward(model: nn.Module, volume: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return torch.softmax(model(torch.from_numpy(volume)[None]).float(), 1)[0].numpy()


def forward_rate(model: nn.Module, dtype: torch.dtype | None, rounds: int) -> tuple[float, float]:
    """(GFLOP of one batch of patches, best GFLOP/s of the network's prediction copy on it)."""
    from torch.utils.flop_counter import FlopCounterMode

    network = inference_copy(model, channels_last=True)  # as the engine runs it
    patches = torch.randn(BATCH, 1, PATCH, PATCH, PATCH).contiguous(memory_format=memory_format_of(network))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        network(patches)
    flops = counter.get_total_flops()
    best = 0.0
    for _ in range(rounds):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            start = time.perf_counter()
            network(patches)
            best = max(best, flops / (time.perf_counter() - start))
    return flops / 1e9, best / 1e9


def main() -> None:
    from monai.inferers import sliding_window_inference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(machine_line())
    model = unet3d()
    volume = nuclei_volume(tuple(args.shape))

    def monai(bf16: bool) -> np.ndarray:
        def predictor(patches: torch.Tensor) -> torch.Tensor:
            return torch.softmax(model(patches).float(), 1)

        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return sliding_window_inference(
                torch.from_numpy(volume)[None],
                (PATCH,) * 3,
                BATCH,
                predictor,
                overlap=OVERLAP / PATCH,
                mode="gaussian",
                sigma_scale=0.125,
                padding_mode="reflect",
            )[0].numpy()

    def ours(amp: bool | None) -> np.ndarray:
        return predict_volume_tiled(
            model, volume, tile_size=PATCH, overlap=OVERLAP, batch_size=BATCH, blend="gaussian", amp=amp
        )

    runs = {
        "unetseg auto": lambda: ours(None),
        "unetseg fp32": lambda: ours(False),
        "MONAI fp32": lambda: monai(False),
        "MONAI bf16": lambda: monai(True),
    }
    if torch.bfloat16 not in measured_dtypes():  # emulated bfloat16 takes minutes a run and no default uses it
        del runs["MONAI bf16"]
    reference = softmax_forward(model, volume)
    inside = (slice(None), *(slice(OVERLAP // 2, -OVERLAP // 2),) * 3)
    times, errors = {name: [] for name in runs}, {}
    for round_index in range(args.rounds + 1):  # round 0 warms up and measures errors
        for name, run in runs.items():
            start = time.perf_counter()
            probs = run()
            seconds = time.perf_counter() - start
            if round_index == 0:
                errors[name] = float(np.abs(probs - reference)[inside].mean())
            else:
                times[name].append(seconds)
    best = {name: min(values) for name, values in times.items()}
    default = autocast_dtype(torch.device("cpu"))
    voxels = int(np.prod(args.shape))
    print(
        f"3-D UNet {NET['depth']} levels, width {NET['width']}, {NET['block']} blocks, {NET['norm']} norm; volume "
        f"{' x '.join(map(str, args.shape))}; patch {PATCH}^3, overlap {OVERLAP}, batch {BATCH}, gaussian; best of "
        f"{args.rounds} alternated rounds; unetseg auto = {'bf16' if default else 'fp32'} here"
    )
    print(f"{'run':<14}{'seconds':>9}{'Mvoxel/s':>10}{'error vs fp32 forward':>23}")
    for name in runs:
        print(f"{name:<14}{best[name]:>9.2f}{voxels / 1e6 / best[name]:>10.2f}{errors[name]:>23.2e}")
    pairs = (("unetseg auto", "MONAI fp32"), ("unetseg fp32", "MONAI fp32"), ("unetseg auto", "MONAI bf16"))
    for ours_name, peer in pairs:
        if peer not in runs:
            continue
        print(f"{ours_name} vs {peer}: {best[peer] / best[ours_name]:.2f}x faster")
    for dtype in measured_dtypes():
        bf16 = dtype == torch.bfloat16
        gflop, rate = forward_rate(model, dtype if bf16 else None, args.rounds + 1)
        peak = matmul_peak(dtype) / 1e9
        name = "bf16" if bf16 else "fp32"
        print(
            f"forward of {BATCH} patches ({gflop:.1f} GFLOP) in {name}: {rate:.1f} GFLOP/s, {rate / peak:.1%} of the "
            f"{name} matmul peak ({peak:.1f} GFLOP/s)"
        )


if __name__ == "__main__":
    main()
