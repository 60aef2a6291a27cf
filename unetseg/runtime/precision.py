"""Which precision and memory layout a device runs a U-Net fastest in without losing accuracy.

bfloat16 keeps float32's exponent range, so autocast to it needs no loss scaling and costs
about 1e-3 in logits; it is only faster where the hardware computes it natively: CPUs with
AVX512-BF16 or AMX (oneDNN kernels), Arm CPUs with BF16, and CUDA GPUs. Elsewhere it is
emulated and slower than float32, so `amp=None` keeps float32 there.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

__all__ = [
    "autocast_dtype",
    "channels_last",
    "cpu_flags",
    "cpu_has_native_bf16",
    "detect_native_bf16",
    "native_bf16",
    "trainer_precision",
]

log = logging.getLogger(__name__)

# /proc/cpuinfo flags of native bfloat16 arithmetic: x86 AVX512-BF16 and AMX, Arm BF16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})

# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA) that leave out its bfloat16 dot-product kernels: with one of
# these set, oneDNN emulates bfloat16 whatever the CPU has (`benchmarks/speed_goals.sh --isa avx2` uses this to
# measure an AVX2 machine on a newer CPU).
ONEDNN_ISAS_WITHOUT_BF16 = frozenset(
    {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
)


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (x86 "flags", Arm "Features"); empty where it is unreadable."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16, AMX or Arm BF16); asked once per process."""
    return detect_native_bf16()


def onednn_isa_cap() -> str | None:
    """The instruction-set cap this process set for oneDNN (ONEDNN_MAX_CPU_ISA, or its older name), upper-cased."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return cap.strip().upper() if cap else None


def detect_native_bf16() -> bool:
    """`cpu_has_native_bf16` uncached: torch's CPU capability names AMX where it is present; AVX512-BF16 is only
    visible in the kernel's CPU flags. A oneDNN ISA cap below AVX512_CORE_BF16 makes bfloat16 emulated."""
    capability = torch.backends.cpu.get_cpu_capability().upper()
    native = "AMX" in capability or "BF16" in capability or bool(cpu_flags() & BF16_CPU_FLAGS)
    if native and onednn_isa_cap() in ONEDNN_ISAS_WITHOUT_BF16:
        native = False
    log.debug("CPU capability %s, oneDNN cap %s, native bfloat16: %s", capability, onednn_isa_cap(), native)
    return native


def native_bf16(device: torch.device) -> bool:
    """True when `device` runs bfloat16 faster than float32: a CUDA GPU with bfloat16 or a CPU with it natively."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def autocast_dtype(device: torch.device, amp: bool | None = None) -> torch.dtype | None:
    """The autocast dtype for `device`, or None for plain float32.

    amp=None turns mixed precision on where it is fast: on CUDA GPUs, and on CPUs with native
    bfloat16 (see `native_bf16`). On CUDA it is bfloat16 where the GPU supports it (no
    overflow, no scaling needed), else float16; elsewhere bfloat16, the type CPU autocast supports.
    """
    if amp is None:
        amp = device.type == "cuda" or native_bf16(device)
    if not amp:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16


def channels_last(device: torch.device) -> bool:
    """True where convolutions run faster on NHWC tensors: CUDA (tensor cores) and CPUs (oneDNN)."""
    return device.type in ("cuda", "cpu")


def trainer_precision(accelerator: str = "auto") -> str:
    """Lightning's `trainer.precision` for an accelerator: "bf16-mixed" where bfloat16 is native, else "32-true"."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if native_bf16(torch.device("cuda")) else "32-true"
    if accelerator in ("auto", "cpu"):
        return "bf16-mixed" if cpu_has_native_bf16() else "32-true"
    return "32-true"
