import pytest
import torch

from unetseg.runtime import precision
from unetseg.runtime.precision import autocast_dtype, channels_last, cpu_flags, native_bf16, trainer_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("flags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile", True),  # AVX512-BF16 (this project's CPU)
        ("flags\t\t: fpu avx2 amx_bf16 amx_tile", True),  # AMX
        ("Features\t: fp asimd bf16 i8mm", True),  # Arm
        ("flags\t\t: fpu avx2 avx512f avx512bw", False),  # AVX512 without BF16: emulated, slower
    ],
)
def test_cpu_flags_from_cpuinfo_tell_native_bf16(tmp_path, monkeypatch, line, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\n{line}\n\nprocessor\t: 1\n{line}\n")
    flags = cpu_flags(cpuinfo)
    assert bool(flags & precision.BF16_CPU_FLAGS) is expected
    assert cpu_flags(tmp_path / "missing") == set()
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert precision.detect_native_bf16() is expected


@pytest.mark.parametrize(
    "variable, cap, expected",
    [
        ("ONEDNN_MAX_CPU_ISA", "AVX2", False),  # an AVX2 machine emulated on a newer CPU: bf16 is emulated
        ("ONEDNN_MAX_CPU_ISA", "avx512_core", False),
        ("DNNL_MAX_CPU_ISA", "AVX2_VNNI", False),
        ("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16", True),
        ("ONEDNN_MAX_CPU_ISA", "ALL", True),
    ],
)
def test_a_onednn_isa_cap_below_bf16_makes_bf16_not_native(monkeypatch, variable, cap, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    assert precision.detect_native_bf16() is True
    monkeypatch.setenv(variable, cap)
    assert precision.detect_native_bf16() is expected


def test_amx_capability_counts_as_native_without_cpuinfo(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: set())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AMX")
    assert precision.detect_native_bf16() is True


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_cpu_is_bf16_only_where_native(monkeypatch, native, expected):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    assert native_bf16(CPU) is native
    assert autocast_dtype(CPU) is expected
    assert autocast_dtype(CPU, amp=True) is torch.bfloat16  # forced: emulated where not native
    assert autocast_dtype(CPU, amp=False) is None
    assert trainer_precision("cpu") == ("bf16-mixed" if native else "32-true")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_precision_on_cuda_is_on_and_prefers_bf16(monkeypatch, bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert autocast_dtype(CUDA) is expected
    assert autocast_dtype(torch.device("cuda", 0), amp=True) is expected
    assert autocast_dtype(CUDA, amp=False) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert trainer_precision("auto") == ("bf16-mixed" if bf16 else "32-true")
    assert trainer_precision("gpu") == ("bf16-mixed" if bf16 else "32-true")


def test_other_devices_stay_float32_and_contiguous(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    mps = torch.device("mps")
    assert native_bf16(mps) is False and autocast_dtype(mps) is None
    assert trainer_precision("mps") == "32-true"
    assert channels_last(CPU) and channels_last(CUDA) and not channels_last(mps)
