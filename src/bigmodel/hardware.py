"""What the machine can do: bf16 support, the autocast dtype to use, and measured matmul peak FLOP/s."""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch

from bigmodel.errors import UserError


@functools.cache
def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AVX512-BF16 or AMX), where bf16 autocast is the fast path."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def native_bf16(device: torch.device) -> bool:
    """bf16 matmul in hardware: GPUs that support it, CPUs with AVX512-BF16 or AMX."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `train.precision` (auto | bf16 | fp32); None means plain fp32."""
    if precision == "fp32":
        return None
    supported = native_bf16(device)
    if precision == "bf16" and not supported and device.type == "cuda":
        raise UserError("train.precision=bf16 is not supported by this GPU; use fp32")
    if precision == "bf16":
        return torch.bfloat16  # forced: on CPUs without native bf16 it is emulated (slow but correct)
    return torch.bfloat16 if supported else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[object]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@functools.cache
def matmul_peak_flops(
    dtype: torch.dtype = torch.bfloat16, device: str = "cpu", n: int = 1024, seconds: float = 0.3
) -> float:
    """Measured FLOP/s of a square matmul in `dtype`: the peak that MFU is reported against."""
    g = torch.Generator(device=device).manual_seed(0)  # never touch the global RNG: resume must stay exact
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        a @ b
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 4 * 2 * n**3 / (time.perf_counter() - t0))
    return best
