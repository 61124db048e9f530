"""Which dtype a model loads in: bf16 only where the hardware computes it natively."""

from __future__ import annotations

import pytest

from serve import devices


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse2 avx2 fma", False),
    ("fpu avx2 avx512f avx512_bf16", True),
    ("fpu avx2 amx_tile amx_bf16", True),
])
def test_native_bf16_is_read_from_the_cpu_flags(flags, native):
    cpuinfo = f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n"
    assert devices.native_bf16_in(cpuinfo) is native


@pytest.mark.parametrize(("native", "device", "expected"), [
    (False, "cpu", "float32"), (True, "cpu", "bfloat16"),
    (False, "cuda", "bfloat16"), (False, "cuda:1", "bfloat16"),
])
def test_auto_picks_bf16_on_cuda_and_native_cpus_only(monkeypatch, native, device, expected):
    monkeypatch.setattr(devices, "cpu_has_native_bf16", lambda: native)
    assert devices.resolve_dtype("auto", device) == expected
    assert devices.resolve_dtype("float32", device) == "float32"  # an explicit choice wins
