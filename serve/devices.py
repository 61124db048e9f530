"""Which device and dtype a model runs in, decided once for every stage.

bf16 halves the bytes a decode step reads and, on CPUs with native bf16 instructions
(``avx512_bf16`` or AMX), runs matmuls several times faster than fp32. Elsewhere a CPU
emulates bf16: on an AVX2-only EPYC a 2048x2048 bf16 matmul ran far slower than fp32 and
a SmolLM2 scoring pass took 4x as long, so ``auto`` picks bf16 only where it is native.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

Dtype = Literal["auto", "float32", "bfloat16", "float16"]

# /proc/cpuinfo flags of x86 CPUs that compute bf16 natively.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        return native_bf16_in(Path("/proc/cpuinfo").read_text())
    except OSError:  # not Linux: assume emulation, fp32 is the safe choice
        return False


def native_bf16_in(cpuinfo: str) -> bool:
    """Whether the first ``flags`` line of a /proc/cpuinfo text lists a native bf16 flag."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool(NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


def resolve_dtype(requested: Dtype, device: str) -> str:
    """The dtype name to load weights in: ``auto`` is bf16 on CUDA and on native-bf16 CPUs."""
    if requested != "auto":
        return requested
    if device.startswith("cuda") or cpu_has_native_bf16():
        return "bfloat16"
    return "float32"


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)
