"""GPT decoding steps on the CPU as compiled code (numba): one call per layer instead of ~15 torch ops.

A decoding step of a few rows reads every weight once and computes little else, so its speed should be
the rate at which weights stream from memory. Run op by op in PyTorch, a step also pays for dispatching
the small ops of every layer (norms, views, the KV-cache writes, attention, GELU, residual adds): at
batch 1 on 2 cores that costs about as long as streaming int8 weights. Here a layer is one compiled call:

    x (M, C) --LayerNorm--> h --c_attn--> qkv (M, 3C) --attention over the cache--> a (M, C)
      x += c_proj(a);  x += mlp.c_proj(gelu(mlp.c_fc(LayerNorm(x))))

and the head (final LayerNorm + output projection) another. Weights are read where they are (numpy
views of the model's tensors, no copies): float32 or bf16 Linear weights, or Int8Linear's int8 rows and
scales (with the activations rounded to int16, see `_matmul_int8`). Activations, norms and sums are
float32 whatever the weights: a bf16 model's weights and KV cache are widened to float32 as they are read
(`_widen`), and its new keys and values rounded to bf16 as they are stored (`_narrow`).

`matmul_rows` is also the kernel of Int8Linear's decoding path (compress/int8_kernels.py). Everything is
compiled on first use and cached on disk by numba; importing this module needs a working numba, so the
callers import it lazily and fall back to PyTorch when it fails.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.core import codegen as numba_codegen
from numba.extending import intrinsic, overload

from bigmodel import hardware
from bigmodel.models.gpt import LayerNorm

MAX_ROWS = 16  # decoding steps of more rows run op by op
# bf16 models on CPUs with native bf16 products (AVX512-BF16, AMX): beyond this many rows the op-by-op
# step, whose matmuls multiply in bf16 (oneDNN), outruns this step's float32 products of widened weights
# (GPT-2 124M shape on a 2-core Zen 5: 1.2x at 6 rows, even at 8, 0.85x at 10, 0.56x at 16).
NATIVE_BF16_MAX_ROWS = 8

# The fast-math flags let LLVM reassociate and vectorise the sums and fuse multiply-adds, but not assume
# that values are finite: NaN inputs come out as NaN (tested), and attention masks with -inf. error_model
# "numpy": a division by zero gives inf/NaN like numpy instead of a check in every loop.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp", "afn"}
_OPTIONS: dict[str, Any] = {"fastmath": _FASTMATH, "cache": True, "boundscheck": False, "nogil": True}
_jit = numba.njit(**_OPTIONS, error_model="numpy")
_pjit = numba.njit(**_OPTIONS, error_model="numpy", parallel=True)
# inlined into its callers at numba's level (their parallel loops), where a call per row costs
_ijit = numba.njit(**_OPTIONS, error_model="numpy", inline="always")


# --- bf16: numpy has no bfloat16, so bf16 tensors are read as their bits (uint16) ------------------------


def _bf16_to_f32_typing(typingctx: Any, bits: Any) -> Any:
    """_bf16_to_f32(bits): the float32 whose upper half is these bf16 bits (uint16), exactly."""
    if bits != types.uint16:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())

    return types.float32(bits), codegen


def _f32_to_bf16_typing(typingctx: Any, value: Any) -> Any:
    """_f32_to_bf16(value): the bf16 bits (uint16) of a float32, rounded to nearest even as torch rounds
    (NaN gives torch's 0x7FC0; values past bf16's largest round to inf)."""
    if value != types.float32:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i32 = ir.IntType(32)
        bits = builder.bitcast(args[0], i32)
        odd = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        rounded = builder.lshr(builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), odd), ir.Constant(i32, 16))
        nan = builder.fcmp_unordered("uno", args[0], args[0])  # (an IR compare: no fast-math flags on it)
        return builder.trunc(builder.select(nan, ir.Constant(i32, 0x7FC0), rounded), ir.IntType(16))

    return types.uint16(value), codegen


_bf16_to_f32: Any = intrinsic(_bf16_to_f32_typing)
_f32_to_bf16: Any = intrinsic(_f32_to_bf16_typing)


def _widen(value):  # (no annotations: numba compares the two signatures)
    """float32 of a weight or cache element: bf16 bits (uint16) widened, int8 or float32 converted."""
    raise NotImplementedError  # only called from compiled code


@overload(_widen, jit_options={"fastmath": _FASTMATH})
def _widen_overload(value):
    if value == types.uint16:
        return lambda value: _bf16_to_f32(value)
    return lambda value: np.float32(value)


def _narrow(value, like):  # (no annotations: numba compares the two signatures)
    """A float32 value as an element of the array `like`: bf16 bits for a bf16 (uint16) array."""
    raise NotImplementedError  # only called from compiled code


@overload(_narrow, jit_options={"fastmath": _FASTMATH})
def _narrow_overload(value, like):
    if like.dtype == types.uint16:
        return lambda value, like: _f32_to_bf16(value)
    return lambda value, like: value


@_pjit
def _matmul_float(x: Any, w: Any, scales: Any, bias: Any, out: Any) -> None:
    """matmul_rows in float32: each weight is widened to float32 in registers (int8 and bf16 bits; float32
    weights as they are). Parallel over output rows: each thread streams its share of the weight rows once,
    whatever M is."""
    M, K = x.shape
    N = w.shape[0]
    for n in prange(N):
        sn, bn = scales[n], bias[n]
        m = 0
        while m + 4 <= M:  # four activation rows share each widened weight: four independent sums
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(K):
                wk = _widen(w[n, k])
                a0 += x[m, k] * wk
                a1 += x[m + 1, k] * wk
                a2 += x[m + 2, k] * wk
                a3 += x[m + 3, k] * wk
            out[m, n], out[m + 1, n] = a0 * sn + bn, a1 * sn + bn
            out[m + 2, n], out[m + 3, n] = a2 * sn + bn, a3 * sn + bn
            m += 4
        while m < M:  # the rest, one row at a time (a decoding step of batch 1 is only this)
            acc = np.float32(0.0)
            for k in range(K):
                acc += x[m, k] * _widen(w[n, k])
            out[m, n] = acc * sn + bn
            m += 1


# --- int8 weights: activations rounded to int16, products summed in int32 -------------------------------
#
# Widening each int8 weight to float32 costs two instructions per 8 weights before the multiply-add; on
# a 2-core AVX2 CPU that, not memory, bounded the float kernel (~20 GB/s of int8 weights, against ~30 GB/s
# that plain loads reach). Rounding each activation row to int16 on its own scale (step max|x| / 32767)
# lets the CPU multiply 16 int8 weights by 16 int16 activations and add the pairs in one instruction
# (vpmaddwd on x86, written below as the generic LLVM vector code that compiles to it; with AVX-512 VNNI
# the accumulate too, vpdpwssd, 32 at a time): the matrix products then keep up with memory. The
# rounding error (at most 1/65534 of the row's largest value) is ~250x finer than the weights' own int8
# step; rows holding NaN or inf take the float kernel instead.

# Elements per call. A block of b elements adds 2 products to each of its b / 2 lanes, each product at most
# 32767 * 127 in magnitude: lanes of blocks of 16 add at most 512 products, and the 8 lanes summed from
# blocks of 128 add at most 8 * 64 (blocks of 64: 4 * 128) before their int64 sum: 512 * 32767 * 127 < 2**31.
_CHUNK = 4096


def _compiles_for_avx512() -> bool:
    """Whether numba compiles for a CPU with AVX-512 (32 vector registers of 16 int32 lanes, against
    AVX2's 16 of 8): NUMBA_CPU_FEATURES if set, else the host's features as numba itself reads them (it
    drops AVX for NUMBA_ENABLE_AVX=0 and for CPU names it distrusts). A CPU named by NUMBA_CPU_NAME
    alone is not looked at; a wrong answer costs speed, never results."""
    features = numba.config.CPU_FEATURES  # type: ignore[attr-defined]  # (NUMBA_CPU_FEATURES, else None)
    if features is None:
        features = numba_codegen.get_host_cpu_features()
    return "+avx512f" in features.split(",")


def _block(rows: int) -> int:
    """Elements per block of `_dot_codegen` for `rows` activation rows: each row's sums take block / 2
    int32 lanes.

    With AVX-512, 2-4 registers of sums per row (blocks of 128 elements up to 2 rows, 64 for 3 or 4; 4-8
    in all), so that several sums run at once: there the multiply, pair add and accumulate are one
    instruction (vpdpwssd, VNNI) with a latency of several cycles, and one register of sums per row left
    them waiting on each other (measured in docs/generation.md). With AVX2 the sums are added by a
    separate one-cycle instruction, and 16 registers hold no more than one register of sums per row for 4
    rows (more were spilled to memory, and 4 rows ran at half the speed)."""
    if not _compiles_for_avx512():
        return 16
    return 128 if rows <= 2 else 64


def _dot_codegen(rows: int) -> Any:
    """LLVM code for `rows` dot products of int16 rows with one int8 row, over `count` elements from
    `start` (count a multiple of 16, at most _CHUNK): sign-extend, multiply, add adjacent pairs, accumulate
    in int32 lanes, and add the lanes in int64.

    Blocks of `_block(rows)` elements go to block / 2 lanes per row, the last blocks of 16 to 8 lanes of
    their own."""
    block = _block(rows)

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        i8, i16, i32, i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
        arrays = zip(signature.args[: rows + 1], args[: rows + 1], strict=True)  # the x rows, then w
        data = [context.make_array(t)(context, builder, a).data for t, a in arrays]
        start, count = args[rows + 1], args[rows + 2]

        def constant(value: int) -> Any:
            return ir.Constant(count.type, value)

        def load(ptr: Any, kind: Any, at: Any, width: int) -> Any:
            """`width` elements of type `kind` from ptr[at], as one vector."""
            vector = ir.VectorType(kind, width)
            return builder.load(builder.bitcast(builder.gep(ptr, [at]), vector.as_pointer()), align=1)

        def accumulate(blocks: Any, first: Any, width: int) -> list[Any]:
            """Sums (width / 2 int32 lanes per row) over `blocks` blocks of `width` elements from `first`."""
            lanes = ir.VectorType(i32, width // 2)
            even = ir.Constant(lanes, [ir.Constant(i32, 2 * i) for i in range(width // 2)])
            odd = ir.Constant(lanes, [ir.Constant(i32, 2 * i + 1) for i in range(width // 2)])
            sums = [cgutils.alloca_once_value(builder, ir.Constant(lanes, None)) for _ in range(rows)]
            with cgutils.for_range(builder, blocks) as loop:
                at = builder.add(first, builder.mul(loop.index, constant(width)))
                w = builder.sext(load(data[rows], i8, at, width), ir.VectorType(i32, width))
                for r in range(rows):
                    p = builder.mul(builder.sext(load(data[r], i16, at, width), w.type), w, flags=["nsw"])
                    pairs = builder.add(builder.shuffle_vector(p, p, even), builder.shuffle_vector(p, p, odd))
                    builder.store(builder.add(builder.load(sums[r]), pairs), sums[r])
            return [builder.load(v) for v in sums]

        long_blocks = builder.udiv(count, constant(block))
        tail_start = builder.add(start, builder.mul(long_blocks, constant(block)))
        tail_blocks = builder.udiv(builder.urem(count, constant(block)), constant(16))
        wide = accumulate(long_blocks, start, block)
        narrow = accumulate(tail_blocks, tail_start, 16)
        totals = []
        for a, b in zip(wide, narrow, strict=True):
            v = a  # block / 2 int32 lanes -> 8 in int32 (each a sum of at most 8 lanes: < 2**31, see _CHUNK)
            while v.type.count > 8:
                half = v.type.count // 2
                low = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half))))
                high = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(i32, half), list(range(half, 2 * half))))
                v = builder.add(low, high)
            # then the 8 narrow lanes and the whole row in int64: a row's sum may pass 2**31 where no lane does
            v = builder.add(builder.sext(v, ir.VectorType(i64, 8)), builder.sext(b, ir.VectorType(i64, 8)))
            total = builder.extract_element(v, ir.Constant(i32, 0))
            for i in range(1, 8):
                total = builder.add(total, builder.extract_element(v, ir.Constant(i32, i)))
            totals.append(total)
        return totals[0] if rows == 1 else context.make_tuple(builder, signature.return_type, totals)

    return codegen


def _dot_signature(arrays: tuple[Any, ...], start: Any, count: Any) -> Any:
    """The typing shared by _dot1-_dot4, given their arrays (the int16 activation rows, then the int8
    weight row): one int64 sum per activation row (a tuple for more than one) and their code; None, a typing
    error rather than wrong code, unless every array is a contiguous 1-D row of the dtype the code reads."""
    *xs, w = arrays
    kinds = [(x, types.int16) for x in xs] + [(w, types.int8)]
    if not all(isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == t for a, t in kinds):
        return None
    result = types.int64 if len(xs) == 1 else types.UniTuple(types.int64, len(xs))
    return result(*arrays, start, count), _dot_codegen(len(xs))


def _dot1_typing(typingctx: Any, x: Any, w: Any, start: Any, count: Any) -> Any:
    """_dot1(x, w, start, count): sum of x[start:start+count] * w[start:start+count] as int64; x int16,
    w int8, both contiguous rows."""
    return _dot_signature((x, w), start, count)


def _dot2_typing(typingctx: Any, x0: Any, x1: Any, w: Any, start: Any, count: Any) -> Any:
    """_dot2(x0, x1, w, start, count): _dot1 for two int16 rows against one int8 row, which is loaded and
    widened once for both (_dot3 and _dot4 likewise for three and four rows)."""
    return _dot_signature((x0, x1, w), start, count)


def _dot3_typing(typingctx: Any, x0: Any, x1: Any, x2: Any, w: Any, start: Any, count: Any) -> Any:
    return _dot_signature((x0, x1, x2, w), start, count)


def _dot4_typing(typingctx: Any, x0: Any, x1: Any, x2: Any, x3: Any, w: Any, start: Any, count: Any) -> Any:
    return _dot_signature((x0, x1, x2, x3, w), start, count)


# (Any: called from compiled code with the arguments after typingctx, which mypy cannot know)
_dot1: Any = intrinsic(_dot1_typing)
_dot2: Any = intrinsic(_dot2_typing)
_dot3: Any = intrinsic(_dot3_typing)
_dot4: Any = intrinsic(_dot4_typing)


@_jit
def _round_rows(x: Any, xq: Any, step: Any) -> None:
    """xq (M, K) int16 = round(x / step) with step (M,) = max|x[m]| / 32767 per row; step is NaN for the
    rows left to the float kernel: those holding NaN or inf, those whose values are all below 1e-30
    (their step would underflow), zero rows included, and those holding a value above 1e30 (the fast-math
    flags may compute x * 32767 / max|x|, which overflows float32 beyond ~1e34)."""
    M, K = x.shape
    for m in range(M):
        top, total = np.float32(0.0), np.float32(0.0)
        for k in range(K):
            top = max(top, abs(x[m, k]))
            total += x[m, k]  # NaN or inf anywhere makes it non-finite (max() would skip a NaN)
        # (not np.isfinite: it tests x - x == 0, which the fast-math flags fold to True)
        if not abs(total) < np.inf or not np.float32(1e-30) <= top <= np.float32(1e30):
            step[m] = np.nan
            continue
        s = top / np.float32(32767.0)
        inv = np.float32(1.0) / s
        for k in range(K):
            xq[m, k] = np.int16(np.rint(x[m, k] * inv))
        step[m] = s


@_jit
def _dot_long(xq: Any, w: Any) -> Any:
    """float32 of xq . w for rows longer than _CHUNK or not a multiple of 16: _dot1 over _CHUNK elements
    at a time, then the last K % 16 elements, all summed in int64. (Slower per element than one _dot1
    call: the short case takes that.)"""
    K = xq.shape[0]
    body = K - K % 16
    total = np.int64(0)
    for k0 in range(0, body, _CHUNK):
        total += _dot1(xq, w, k0, min(_CHUNK, body - k0))
    for k in range(body, K):
        total += np.int64(xq[k]) * np.int64(w[k])
    return np.float32(total)


PREFETCH_BYTES = 16384  # how far ahead in the weights a thread asks for the next rows (int8, M < 4)
SEGMENT = 768  # weights per dot-product segment, each preceded by its prefetch requests (a multiple of 16)


def _prefetch_typing(typingctx: Any, row: Any, index: Any) -> Any:
    """_prefetch(row, i): ask the CPU to start loading the cache line that holds row[i] into all cache
    levels (LLVM's prefetch). It changes nothing but timing."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch"
        )
        address = builder.bitcast(builder.gep(data, [args[1]]), i8p)
        builder.call(fn, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(row, index), codegen


_prefetch: Any = intrinsic(_prefetch_typing)


@_ijit  # called per weight row, the same code streamed GPT-2's int8 matrices 20-25% slower from cache
def _few_rows_int8(xq: Any, flat: Any, n: int, ahead: int) -> tuple[Any, Any, Any]:
    """The int8 dot products of weight row n with xq's 1-3 rows (missing rows give 0; the rows share each
    loaded weight), the weights given as one row (`flat`), in segments of SEGMENT weights, each preceded
    by prefetching the cache lines `ahead` bytes further on: a few lines at a time, where one request per
    line of a whole 3072-byte row came in bursts that the CPU could not keep in flight (rows of 3072
    streamed 30% slower than rows of 768)."""
    M, K = xq.shape
    base = n * K
    wn = flat[base : base + K]
    s0 = s1 = s2 = np.int64(0)
    for k0 in range(0, K, SEGMENT):
        count = min(SEGMENT, K - k0)
        at = base + k0 + ahead
        if at + count <= flat.shape[0]:
            for c in range(0, count, 64):  # one request per 64-byte cache line
                _prefetch(flat, at + c)
        if M == 1:
            s0 += _dot1(xq[0], wn, k0, count)
        elif M == 2:  # the rows share each loaded and widened weight
            a0, a1 = _dot2(xq[0], xq[1], wn, k0, count)
            s0, s1 = s0 + a0, s1 + a1
        else:
            a0, a1, a2 = _dot3(xq[0], xq[1], xq[2], wn, k0, count)
            s0, s1, s2 = s0 + a0, s1 + a1, s2 + a2
    return s0, s1, s2


@_pjit
def _matmul_int8(x: Any, w: Any, scales: Any, bias: Any, out: Any) -> None:
    """matmul_rows for int8 weights with int16-rounded activations (see above); four rows at a time share
    each loaded weight."""
    M, K = x.shape
    N = w.shape[0]
    xq = np.empty((M, K), dtype=np.int16)
    step = np.empty(M, dtype=np.float32)
    _round_rows(x, xq, step)
    short = K % 16 == 0 and K <= _CHUNK  # GPT-2 up to its large shape: one plain call per dot product
    if short and M < 4:
        # With fewer than 4 rows the products keep up with memory, and prefetching PREFETCH_BYTES ahead
        # made decoding steps ~8% faster; with more rows they are compute-bound and prefetching cost ~5%
        # (rows of other lengths, rare, go without).
        flat = w.reshape(N * K)
        for n in prange(N):
            s0, s1, s2 = _few_rows_int8(xq, flat, n, PREFETCH_BYTES)
            sn, bn = scales[n], bias[n]
            out[0, n] = np.float32(s0) * sn * step[0] + bn
            if M > 1:
                out[1, n] = np.float32(s1) * sn * step[1] + bn
            if M > 2:
                out[2, n] = np.float32(s2) * sn * step[2] + bn
    else:
        for n in prange(N):
            wn, sn, bn = w[n], scales[n], bias[n]
            m = 0
            while m + 4 <= M:
                if short:
                    s0, s1, s2, s3 = _dot4(xq[m], xq[m + 1], xq[m + 2], xq[m + 3], wn, 0, K)
                    a0, a1, a2, a3 = np.float32(s0), np.float32(s1), np.float32(s2), np.float32(s3)
                else:
                    a0, a1 = _dot_long(xq[m], wn), _dot_long(xq[m + 1], wn)
                    a2, a3 = _dot_long(xq[m + 2], wn), _dot_long(xq[m + 3], wn)
                out[m, n] = a0 * sn * step[m] + bn
                out[m + 1, n] = a1 * sn * step[m + 1] + bn
                out[m + 2, n] = a2 * sn * step[m + 2] + bn
                out[m + 3, n] = a3 * sn * step[m + 3] + bn
                m += 4
            # Three rows left share each loaded weight too (batch 7: ~1.1x faster; two rows gained nothing).
            if short and M - m == 3:
                s0, s1, s2 = _dot3(xq[m], xq[m + 1], xq[m + 2], wn, 0, K)
                out[m, n] = np.float32(s0) * sn * step[m] + bn
                out[m + 1, n] = np.float32(s1) * sn * step[m + 1] + bn
                out[m + 2, n] = np.float32(s2) * sn * step[m + 2] + bn
                m = M
            while m < M:  # the rest, one row at a time
                a0 = np.float32(_dot1(xq[m], wn, 0, K)) if short else _dot_long(xq[m], wn)
                out[m, n] = a0 * sn * step[m] + bn
                m += 1
    for m in range(M):
        if step[m] != step[m]:  # a row left to float32 products (see _round_rows)
            _matmul_float(x[m : m + 1], w, scales, bias, out[m : m + 1])


def _matmul(x, w, scales, bias, out):  # (no annotations: numba compares the two signatures)
    """Chooses the kernel by the weights' type when compiled (see the overload below)."""
    raise NotImplementedError  # only called from compiled code


@overload(_matmul, jit_options={"fastmath": _FASTMATH, "nogil": True, "error_model": "numpy"})
def _matmul_overload(x, w, scales, bias, out):
    if isinstance(w, types.Array) and w.dtype == types.int8 and w.layout == "C":  # _dot1/_dot4 read whole rows
        return lambda x, w, scales, bias, out: _matmul_int8(x, w, scales, bias, out)
    return lambda x, w, scales, bias, out: _matmul_float(x, w, scales, bias, out)


@_jit
def matmul_rows(x: Any, w: Any, scales: Any, bias: Any, out: Any) -> None:
    """out (M, N) = x (M, K) @ (w (N, K) * scales (N,)[:, None]).T + bias (N,), in float32.

    w is float32 or bf16 bits (uint16), with scales of one, computed in float32; or int8 (scaled rows),
    computed with each activation row rounded to int16 on its own scale and integer sums, exact up to their
    conversion to float32 (`_matmul_int8`; int8 weights that are not C-contiguous take the float32 path).
    Parallel over output rows: each thread streams its share of the weight rows once, whatever M is.
    """
    _matmul(x, w, scales, bias, out)


@_jit
def _layer_norm(x: Any, weight: Any, bias: Any, out: Any) -> None:
    """out = LayerNorm(x) over the last axis (eps 1e-5, biased variance, as F.layer_norm); x (M, C)."""
    M, C = x.shape
    for m in range(M):
        mean = np.float32(0.0)
        for c in range(C):
            mean += x[m, c]
        mean /= C
        var = np.float32(0.0)
        for c in range(C):
            d = x[m, c] - mean
            var += d * d
        inv = np.float32(1.0) / np.sqrt(var / C + np.float32(1e-5))
        for c in range(C):
            out[m, c] = (x[m, c] - mean) * inv * weight[c] + bias[c]


# tanh(y) ~ y P(y^2) / Q(y^2) on [-7.9, 7.9] (float32 tanh is +-1 beyond), a rational approximation fitted
# for this file by iteratively reweighted least squares: max error 5e-7 evaluated in float32. Unlike the
# libm call it vectorises: GELU of 3072 values takes 2 us instead of 20.
_P = tuple(
    np.float32(c)
    for c in (
        0.999999159399111,
        0.12708739796411644,
        0.0026935531729007653,
        7.1508637719637155e-06,
        -6.140270181198559e-09,
    )
)
_Q = tuple(np.float32(c) for c in (0.46041764389006673, 0.022836099135175737, 0.00019645743365766808))


@_jit
def _tanh(y: Any) -> Any:
    c = min(max(y, np.float32(-7.9)), np.float32(7.9))
    z = c * c
    p = _P[0] + z * (_P[1] + z * (_P[2] + z * (_P[3] + z * _P[4])))
    t = c * p / (np.float32(1.0) + z * (_Q[0] + z * (_Q[1] + z * _Q[2])))
    # exactly +-1 beyond the fitted range (selects, so it still vectorises); NaN compares false and stays NaN
    return np.float32(1.0) if y >= np.float32(7.9) else (np.float32(-1.0) if y <= np.float32(-7.9) else t)


@_jit
def _gelu_tanh(x: Any) -> None:
    """GPT-2's GELU (tanh approximation), in place."""
    M, C = x.shape
    k = np.float32(math.sqrt(2.0 / math.pi))
    for m in range(M):
        for c in range(C):
            v = x[m, c]
            x[m, c] = np.float32(0.5) * v * (np.float32(1.0) + _tanh(k * (v + np.float32(0.044715) * v * v * v)))


@_pjit
def _attend(qkv: Any, k_cache: Any, v_cache: Any, pos: int, visible: Any, out: Any) -> None:
    """Store this step's keys and values at cache position `pos`, then attend each row's query to the
    visible cached positions 0..pos. qkv (M, 3C); k_cache, v_cache (M, nh, S, hd), float32 or bf16 bits;
    visible (M, S) bool."""
    M, nh, _, hd = k_cache.shape
    C = nh * hd
    scale = np.float32(1.0 / math.sqrt(hd))
    for mh in prange(M * nh):
        m, h = mh // nh, mh % nh
        q = qkv[m, h * hd : (h + 1) * hd]  # (hd,)
        keys, values = k_cache[m, h], v_cache[m, h]  # (S, hd)
        for d in range(hd):  # stored in the cache's dtype, and read back from it like every other position
            keys[pos, d] = _narrow(qkv[m, C + h * hd + d], keys)
            values[pos, d] = _narrow(qkv[m, 2 * C + h * hd + d], values)
        scores = np.empty(pos + 1, dtype=np.float32)
        for j in range(pos + 1):
            s = np.float32(0.0)
            for d in range(hd):
                s += q[d] * _widen(keys[j, d])
            scores[j] = s * scale if visible[m, j] else -np.inf
        top = scores.max()  # finite: position pos is always visible
        total = np.float32(0.0)
        for j in range(pos + 1):
            e = np.exp(scores[j] - top)  # 0 for hidden positions
            scores[j] = e
            total += e
        acc = np.zeros(hd, dtype=np.float32)
        for j in range(pos + 1):
            p = scores[j]
            for d in range(hd):
                acc[d] += p * _widen(values[j, d])
        inv = np.float32(1.0) / total
        for d in range(hd):
            out[m, h * hd + d] = acc[d] * inv


@_jit
def _embed(wte: Any, wpe: Any, tokens: Any, positions: Any, x: Any) -> None:
    """x (M, C) = wte[tokens] + wpe[positions], in float32 (the tables float32 or bf16 bits). An id or
    position outside its table raises IndexError (the compiled code checks no bounds otherwise)."""
    M, C = x.shape
    for m in range(M):
        if not (0 <= tokens[m] < wte.shape[0] and 0 <= positions[m] < wpe.shape[0]):
            raise IndexError("token id or position outside the embedding tables")
        for c in range(C):
            x[m, c] = _widen(wte[tokens[m], c]) + _widen(wpe[positions[m], c])


@_jit
def layer_step(
    x: Any,
    ln_1: tuple[Any, Any],
    c_attn: tuple[Any, Any, Any],
    attn_proj: tuple[Any, Any, Any],
    ln_2: tuple[Any, Any],
    c_fc: tuple[Any, Any, Any],
    mlp_proj: tuple[Any, Any, Any],
    k_cache: Any,
    v_cache: Any,
    pos: int,
    visible: Any,
    scratch: tuple[Any, Any, Any, Any],
) -> None:
    """One GPT-2 block for M rows at cache position `pos`, updating the residual stream x (M, C) in place.
    Linear layers are (weight, scales, bias) triples, norms (weight, bias) pairs; scratch is (h (M, C),
    qkv (M, 3C), a (M, C), f (M, 4C))."""
    h, qkv, a, f = scratch
    _layer_norm(x, ln_1[0], ln_1[1], h)
    matmul_rows(h, c_attn[0], c_attn[1], c_attn[2], qkv)
    _attend(qkv, k_cache, v_cache, pos, visible, a)
    matmul_rows(a, attn_proj[0], attn_proj[1], attn_proj[2], h)
    x += h
    _layer_norm(x, ln_2[0], ln_2[1], h)
    matmul_rows(h, c_fc[0], c_fc[1], c_fc[2], f)
    _gelu_tanh(f)
    matmul_rows(f, mlp_proj[0], mlp_proj[1], mlp_proj[2], h)
    x += h


@_jit
def head_step(x: Any, ln_f: tuple[Any, Any], lm_head: tuple[Any, Any, Any], h: Any, logits: Any) -> None:
    """logits (M, V) = lm_head(LayerNorm(x))."""
    _layer_norm(x, ln_f[0], ln_f[1], h)
    matmul_rows(h, lm_head[0], lm_head[1], lm_head[2], logits)


# ------------------------------------------------------------------------------------------ from Python

_threads = threading.local()  # numba's thread count is set per calling thread
_usable = True  # False in a forked child: numba's OpenMP layer kills a child of a process that used it


def _forked() -> None:
    global _usable
    _usable = False


os.register_at_fork(after_in_child=_forked)


def usable() -> bool:
    """Whether the kernels may run in this process (not in a child forked after they ran in the parent)."""
    return _usable


def match_torch_threads() -> None:
    """Use as many threads as torch does (checked cheaply: decoding calls this every step)."""
    wanted = torch.get_num_threads()
    if getattr(_threads, "count", None) != wanted:
        numba.set_num_threads(min(wanted, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        torch.set_num_threads(wanted)  # numba's OpenMP pool can share torch's libgomp: starting it resets torch's count
        _threads.count = wanted


def _readable(t: torch.Tensor) -> bool:
    """A float32 or bf16 CPU tensor: what the compiled step reads (besides Int8Linear's int8 rows)."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16)


def _view(t: torch.Tensor) -> np.ndarray | None:
    """A float32 or bf16 CPU tensor as a numpy view (bf16 as its bits, uint16); None for other dtypes and
    devices."""
    if not _readable(t):
        return None
    t = t.detach()
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def _table(t: torch.Tensor) -> np.ndarray | None:
    """_view of a weight matrix, copied only where it is not contiguous."""
    view = _view(t)
    return None if view is None else np.ascontiguousarray(view)


def _vector(t: torch.Tensor | None, n: int, fill: float) -> np.ndarray | None:
    """A float32 or bf16 CPU vector (biases, norms, scales) as float32 numpy (None for other dtypes and
    devices), or a constant vector when there is no tensor."""
    if t is None:
        return np.full(n, fill, dtype=np.float32)
    if not _readable(t):
        return None
    return np.ascontiguousarray(t.detach().float().numpy())


def _linear(module: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(weight, scales, bias) numpy views of an nn.Linear (float32 or bf16) or an Int8Linear (int8 + scales)."""
    kind = type(module)
    if kind is torch.nn.Linear:
        w = _table(module.weight)
        n = module.out_features
        bias = _vector(module.bias, n, 0.0)
        return None if w is None or bias is None else (w, np.ones(n, dtype=np.float32), bias)
    if (kind.__module__, kind.__name__) == ("bigmodel.compress.quantize", "Int8Linear"):
        q = module.weight_int8
        if module.kernel != "numba" or q.device.type != "cpu":  # e.g. BIGMODEL_INT8_KERNEL=fbgemm
            return None
        n = q.shape[0]
        scales, bias = _vector(module.scales, n, 1.0), _vector(module.bias, n, 0.0)
        return None if scales is None or bias is None else (q.numpy(), scales, bias)
    return None  # a subclass or another layer (LoRA, ...) computes something else


def _norm(module: Any) -> tuple[np.ndarray, np.ndarray] | None:
    if type(module) is not LayerNorm:
        return None
    w = _vector(module.weight, 0, 0.0)
    b = _vector(module.bias, module.weight.shape[0], 0.0)
    return None if w is None or b is None else (w, b)


class CompiledDecoder:
    """Decoding steps of a GPT (see models/gpt.py) for M <= MAX_ROWS rows, sharing the KV cache the
    prefill filled. Build it with `CompiledDecoder.build`, for a model of GPT's own classes
    (generation.plain_gpt: the engine checks it), which answers None when the model cannot take this path
    (weights not float32, bf16 or numba-int8, not on the CPU, too many rows: more than MAX_ROWS, or for
    bf16 weights on a CPU with native bf16 more than NATIVE_BF16_MAX_ROWS)."""

    def __init__(
        self,
        cache: Any,
        kv: tuple[np.ndarray, np.ndarray],
        visible: np.ndarray,
        embeddings: tuple[np.ndarray, np.ndarray],
        layers: list[tuple[Any, ...]],
        head: tuple[Any, ...],
    ) -> None:
        M, C = visible.shape[0], embeddings[0].shape[1]
        self.cache = cache
        self.visible = visible  # (M, S): which cache positions each row attends to
        self.wte, self.wpe = embeddings  # (V, C), (block_size, C)
        self.layers, self.head = layers, head
        self.k, self.v = kv  # (n_layer, M, nh, S, hd) views of the cache's tensors: the prefill wrote them
        self.x = np.empty((M, C), dtype=np.float32)
        self.scratch = (
            np.empty((M, C), dtype=np.float32),
            np.empty((M, 3 * C), dtype=np.float32),
            np.empty((M, C), dtype=np.float32),
            np.empty((M, 4 * C), dtype=np.float32),
        )

    @classmethod
    def build(cls, model: Any, cache: Any, visible: torch.Tensor) -> CompiledDecoder | None:
        """visible (M, S) bool: the cache positions already filled that each row may attend to."""
        t = model.transformer
        M = visible.shape[0]
        if M > MAX_ROWS or not _usable:
            return None
        bf16 = any(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in model.modules())
        if bf16 and M > NATIVE_BF16_MAX_ROWS and hardware.cpu_has_bf16():
            return None
        k, v = _view(cache.k), _view(cache.v)
        if k is None or v is None or not (cache.k.is_contiguous() and cache.v.is_contiguous()):  # (KVCache's are)
            return None
        wte, wpe = _table(t.wte.weight), _table(t.wpe.weight)
        if wte is None or wpe is None:
            return None
        layers = []
        for block in t.h:
            parts = (
                _norm(block.ln_1),
                _linear(block.attn.c_attn),
                _linear(block.attn.c_proj),
                _norm(block.ln_2),
                _linear(block.mlp.c_fc),
                _linear(block.mlp.c_proj),
            )
            if any(p is None for p in parts):
                return None
            layers.append(parts)
        ln_f, lm_head = _norm(t.ln_f), _linear(model.lm_head)
        if ln_f is None or lm_head is None:
            return None
        mask = np.zeros((M, cache.max_len), dtype=np.bool_)
        mask[:, : visible.shape[1]] = visible.cpu().numpy()
        return cls(cache, (k, v), mask, (wte, wpe), layers, (ln_f, lm_head))

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (M,), positions (M,) (each row's own position id) -> next-token logits (M, 1, V)."""
        match_torch_threads()
        pos = self.cache.pos
        self.cache.check_room(1)
        x = self.x
        _embed(self.wte, self.wpe, tokens.numpy(), positions.numpy(), x)  # (M, C)
        self.visible[:, pos] = True
        for i, layer in enumerate(self.layers):
            layer_step(x, *layer, self.k[i], self.v[i], pos, self.visible, self.scratch)
        ln_f, lm_head = self.head
        logits = np.empty((x.shape[0], lm_head[0].shape[0]), dtype=np.float32)
        head_step(x, ln_f, lm_head, self.scratch[0], logits)
        self.cache.advance(1)  # last: a step that raised leaves the cache where the op-by-op step expects it
        return torch.from_numpy(logits)[:, None, :]
