"""What the machine can do: bf16 support, the autocast dtype to use, bf16 linear layers through float32
where bf16 is emulated, measured matmul peak FLOP/s, and weights placed on huge pages for decoding."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import mmap
import os
import time
import weakref
from pathlib import Path
from typing import Any

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


class _Bf16LinearsInFloat(torch.overrides.TorchFunctionMode):
    """F.linear on bf16 CPU tensors of at least MIN_ROWS rows as float32 products rounded back to bf16.

    Without native bf16, torch's bf16 matrix products run far below fp32 BLAS and their time grows with
    every row (GPT-2's 768 x 3072 layer: 9 ms for 32 rows, 60 ms for 256), where widening the weights to
    float32 for BLAS costs a fixed ~1 ms. Both sum the same bf16 inputs in float32 and round the result to
    bf16, so results agree to bf16 rounding (summation order aside). A whole GPT-2 124M forward of 32
    rows: 274 ms against 534 op by op in bf16, of 8 rows: 174 against 127 (hence MIN_ROWS), of 256 rows
    (a batch of 8 prompts of 32 tokens): 0.43 s against 2.4. Thread-local, like every torch function
    mode."""

    MIN_ROWS = 16  # fewer rows: the bf16 product is faster
    CHUNK = 1 << 21  # weights widened at a time: 8 MB of float32, which malloc reuses (no fresh pages)

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear and len(args) >= 2:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            bf16 = x.dtype == w.dtype == torch.bfloat16 and x.device.type == w.device.type == "cpu"
            if bf16 and x.dim() >= 1 and x.numel() >= self.MIN_ROWS * max(x.shape[-1], 1):
                x = x.float()
                step = max(1, self.CHUNK // max(w.shape[-1], 1))
                parts = [
                    torch.nn.functional.linear(
                        x, w[i : i + step].float(), None if bias is None else bias[i : i + step].float()
                    ).to(torch.bfloat16)
                    for i in range(0, w.shape[0], step)
                ]
                return parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return func(*args, **kwargs)


def bf16_linears_in_float(model: torch.nn.Module) -> contextlib.AbstractContextManager[object]:
    """For a bf16 model on a CPU without native bf16: a context in which its linear layers of 16 or more
    rows (prompts, evaluation) compute through float32 BLAS (`_Bf16LinearsInFloat`); elsewhere, nothing."""
    weight = next(model.parameters(), None)
    if weight is None or weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or cpu_has_bf16():
        return contextlib.nullcontext()
    return _Bf16LinearsInFloat()


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


HUGE_PAGE = 2 << 20  # bytes: a transparent huge page on x86-64 and most arm64 Linux kernels
_regions: list[tuple[weakref.ref[mmap.mmap], int, int]] = []  # the regions made below: (region, start, end)


def switched_off(variable: str) -> bool:
    """Whether the environment turns a fast path off: `variable` set to 0, false, no or off (any case).
    The switches: BIGMODEL_HUGE_PAGES (below), BIGMODEL_COMPILED_STEP (generation.compiled_decoder)."""
    return os.environ.get(variable, "").lower() in ("0", "false", "no", "off")


def huge_pages_available() -> bool:
    """Linux transparent huge pages that a program may ask for (`madvise` or `always` mode), unless
    BIGMODEL_HUGE_PAGES switches them off (see `switched_off`)."""
    if switched_off("BIGMODEL_HUGE_PAGES"):
        return False
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def weights_on_huge_pages(module: torch.nn.Module, min_bytes: int = 1 << 16) -> int:
    """Copy the module's contiguous CPU parameters and buffers of at least `min_bytes` into one memory
    region that Linux backs with 2 MB pages, in place; returns the bytes moved (0 where huge pages are
    unavailable).

    A decoding step reads every weight once. On 4 KB pages that is a TLB miss every 4 KB, and the CPU's
    prefetchers stop at every page boundary: on 2 MB pages, batch-1 decoding of GPT-2 124M here was 4-6%
    faster in fp32 and 0-7% in int8 (interleaved runs). Parameters keep their identity (they get new
    `.data`: optimisers and ties still see them); a buffer is replaced by its copy in every module that
    holds it. Values and dtypes are unchanged, and each tensor gets its own storage inside the region, so
    saving and copying behave as before. Left where they are: tensors that share storage with another
    one, views that are not contiguous, and tensors already in such a region (a second call moves
    nothing). The region lives as long as any tensor in it, views kept elsewhere included.
    """
    if not huge_pages_available():
        return 0
    _regions[:] = [r for r in _regions if r[0]() is not None]  # forget the regions whose tensors are all gone
    # tensor -> (its storage's address, its bytes, where the module holds it)
    found: dict[int, tuple[int, int, list[tuple[torch.nn.Module, str, str]]]] = {}
    owners: dict[int, set[int]] = {}  # storage address -> the tensors using it
    for mod in module.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(mod, kind).items():
                if t is None or t.device.type != "cpu" or t.numel() == 0:
                    continue
                storage = t.untyped_storage().data_ptr()
                owners.setdefault(storage, set()).add(id(t))
                moved_before = any(start <= t.data_ptr() < end for _, start, end in _regions)
                if t.nbytes >= min_bytes and t.is_contiguous() and not moved_before:
                    found.setdefault(id(t), (storage, t.nbytes, []))[2].append((mod, kind, name))
    moving = [(nbytes, places) for storage, nbytes, places in found.values() if len(owners[storage]) == 1]
    if not moving:
        return 0
    padded = [nbytes + (-nbytes) % 64 for nbytes, _ in moving]  # each tensor starts on a cache line
    region = mmap.mmap(-1, sum(padded) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)  # before the first write: the pages are allocated as huge ones
    except OSError:  # a kernel that refuses: the weights stay where they are
        return 0
    start = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    _regions.append((weakref.ref(region), start, start + len(region)))
    offset = (-start) % HUGE_PAGE
    for (_, places), size in zip(moving, padded, strict=True):
        holder, kind, name = places[0]
        old = getattr(holder, kind)[name]
        new = torch.frombuffer(region, dtype=old.dtype, count=old.numel(), offset=offset).view(old.shape)
        new.copy_(old.detach())
        for mod, kind, name in places:
            if kind == "_parameters":
                mod._parameters[name].data = new  # type: ignore[union-attr]
            else:
                mod._buffers[name] = new
        offset += size
        del old  # the old copy is freed here (unless held elsewhere), not after the whole model
    _return_freed_memory()
    return sum(nbytes for nbytes, _ in moving)


def _return_freed_memory() -> None:
    """Hand the heap memory that freed tensors held back to the system. glibc keeps freed blocks for
    reuse: after quantize_int8 and the move above, a GPT-2 124M process held ~700 MB more than it used."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: its allocator decides
        pass
