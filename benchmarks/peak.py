"""The machine a speed benchmark runs on: its CPU, whether it computes bfloat16 natively, and its matmul peak.

Every speed benchmark prints `machine_line()` first and states its network's rate as a fraction
of `matmul_peak()`, measured in the same run: machines differ between sessions (AVX2 only,
AVX512-BF16, AMX), so a figure holds only beside the peak of the machine that made it.

    .venv/bin/python benchmarks/peak.py            # this machine and its fp32 / bf16 matmul peak
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from unetseg.runtime.precision import cpu_flags, cpu_has_native_bf16, onednn_isa_cap

PEAK_SIZE = 2048  # a square matmul this large runs at the BLAS kernels' full rate on one to many cores


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def vector_units() -> str:
    """The widest SIMD the CPU flags name (AMX, AVX512-BF16, AVX-512, AVX2 or neither), and the caps this process
    put on oneDNN, MKL and ATen where it emulates an older CPU (`speed_goals.sh --isa avx2`)."""
    flags = cpu_flags()
    widest = "no AVX2"
    for flag, name in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")):
        if flag in flags:
            widest = name
            break
    caps = {
        "oneDNN": onednn_isa_cap(),
        "MKL": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        "ATen": os.environ.get("ATEN_CPU_CAPABILITY"),
    }
    capped = ", ".join(f"{library} {cap}" for library, cap in caps.items() if cap)
    return f"{widest} capped to {capped} (emulated)" if capped else widest


def machine_line() -> str:
    """One line naming what the figures after it depend on: CPU, SIMD, bf16, cores, threads, torch, load."""
    return (
        f"machine: {cpu_model()}, {vector_units()}, bfloat16 native: {'yes' if cpu_has_native_bf16() else 'no'}, "
        f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} thread(s), "
        f"load average {os.getloadavg()[0]:.1f}"
    )


def matmul_peak(dtype: torch.dtype = torch.float32, rounds: int = 3, size: int = PEAK_SIZE) -> float:
    """FLOP/s of a size x size matmul in `dtype` on the CPU: the best of `rounds` after a warm-up."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(4):
            a @ b
        best = max(best, 4 * 2 * size**3 / (time.perf_counter() - start))
    return best


def measured_dtypes() -> tuple[torch.dtype, ...]:
    """The precisions worth timing here: float32, and bfloat16 where the CPU computes it natively (emulated, a
    2048^2 bfloat16 matmul takes minutes and no unetseg default uses it)."""
    return (torch.float32, torch.bfloat16) if cpu_has_native_bf16() else (torch.float32,)


def main() -> None:
    print(machine_line())
    for dtype in measured_dtypes():
        print(f"{str(dtype).removeprefix('torch.')} matmul {PEAK_SIZE}^2: {matmul_peak(dtype) / 1e9:.1f} GFLOP/s")
    if torch.bfloat16 not in measured_dtypes():
        print("bfloat16 matmul: not measured (emulated on this machine; unetseg runs float32 here)")


if __name__ == "__main__":
    main()
