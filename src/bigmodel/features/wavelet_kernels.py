"""The whole multilevel DWT of every row in one compiled (numba) call: the fast CPU path of `wavedec`/`dwt`.

`wavelet.py`'s torch path computes a level as one gather and one banded block matrix multiply: it is
differentiable and runs on any device, but for short filters it does several times more multiplications
than the filter has taps (8x for haar) and every level is another pass over memory. Here each row (16 KB
for 4,096 float32 samples) goes through all its levels while it stays in the core's cache. Per level:

1. extend: the current approximation is written into two short scratch arrays, the even and the odd
   samples of its extension, E[m] = x_ext[2m + s] and O[m] = x_ext[2m + 1 + s]. The interior is a plain
   strided copy; only the few samples at each end read the precomputed `edges` table (the boundary rule
   of the mode, or -1 for a zero), so the kernel itself knows nothing about modes;
2. filter: a[k] = sum_i lo[2i] E[k + i] + lo[2i + 1] O[k + i], and d[k] likewise with hi: one pass over
   k per pair of taps, unit stride and branch-free, which LLVM vectorises. a goes to a scratch array
   (the next level's input) or, at the last level, to the output; d goes straight to the output.

The caller (`wavelet._kernel_wavedec`) decides when this runs, computes the plan (lengths, shift,
boundary tables; the same rules as its torch path) and passes the reconstruction filters (the reversed
decomposition filters), so both paths compute PyWavelets' coefficients. Products are summed in the
input's dtype (float32 or float64), without fastmath: every output is its own sum, so the loops over
outputs vectorise without reassociation.

numba is optional: `available()` is False without it, and `wavelet.py` then uses its torch path. The
kernel compiles on first use (a few seconds per dtype; cached on disk by numba afterwards) and runs on as
many threads as torch uses (one for inputs under PARALLEL_MIN_SAMPLES samples).
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import numpy as np
import torch


@cache
def _compiled() -> Any | None:
    try:
        return _build()
    except Exception:  # numba missing or unusable (e.g. no writable cache folder): the caller falls back
        return None


def _build() -> Any:
    import numba

    # fastmath "contract" only (fused multiply-adds): every output is its own sum, so the loops over
    # outputs vectorise without reassociating anything, and NaN/inf keep their IEEE meaning
    @numba.njit(parallel=True, fastmath={"contract"}, cache=True, boundscheck=False, nogil=True)
    def wavedec_kernel(
        x: Any, lo: Any, hi: Any, shift: int, levels: Any, edges: Any, approx_at: int, out: Any, chunks: int
    ) -> None:
        """Every row of x (B, N) through all levels; `chunks` ranges of rows run in parallel.

        levels (L, 4) int64, level 1 first: [N, n, edge_at, out_at]: the level makes n coefficients per row
        from N samples (the row at level 1, then the previous approximation). Its extended signal
        xe[i] = x_ext[i + shift], i < 2n + F - 2, is the signal itself at -shift <= i < N - shift; the other
        i read the signal sample edges[edge_at + ...] (left end, then right end; -1: a zero). The details
        of row b go to out[out_at + b n : out_at + (b + 1) n], the last approximation likewise from
        approx_at. The intermediate approximations stay in two scratch rows per chunk.
        """
        B = x.shape[0]
        L = levels.shape[0]
        F = lo.shape[0]
        width = 0
        for lev in range(L):
            width = max(width, 2 * levels[lev, 1] + F - 2)
        for c in numba.prange(chunks):
            cur = np.empty(width, x.dtype)
            nxt = np.empty(width, x.dtype)
            for b in range(c * B // chunks, (c + 1) * B // chunks):
                row = x[b]
                inner = cur[-shift:]
                for i in range(row.shape[0]):  # level 1's signal; later levels find theirs in place
                    inner[i] = row[i]
                for lev in range(L):
                    N, n, e, at = levels[lev, 0], levels[lev, 1], levels[lev, 2], levels[lev, 3]
                    # 1. the boundary extension: a few samples at each end
                    for i in range(-shift):
                        j = edges[e + i]
                        cur[i] = cur[j - shift] if j >= 0 else 0.0
                    e -= N  # the right end starts at i = N - shift
                    for i in range(N - shift, 2 * n + F - 2):
                        j = edges[e + i]
                        cur[i] = cur[j - shift] if j >= 0 else 0.0
                    # 2. a[k] = sum_j lo[j] xe[2k + j], d[k] likewise: a pass over k per pair of taps
                    d = out[at + b * n : at + (b + 1) * n]
                    a = out[approx_at + b * n : approx_at + (b + 1) * n] if lev == L - 1 else nxt[-shift : n - shift]
                    l0, l1, h0, h1 = lo[0], lo[1], hi[0], hi[1]
                    for k in range(n):
                        v0, v1 = cur[2 * k], cur[2 * k + 1]
                        a[k] = l0 * v0 + l1 * v1
                        d[k] = h0 * v0 + h1 * v1
                    for t in range(2, F, 2):
                        l0, l1, h0, h1 = lo[t], lo[t + 1], hi[t], hi[t + 1]
                        xt = cur[t:]
                        for k in range(n):
                            v0, v1 = xt[2 * k], xt[2 * k + 1]
                            a[k] += l0 * v0 + l1 * v1
                            d[k] += h0 * v0 + h1 * v1
                    cur, nxt = nxt, cur  # the approximation just written is the next level's signal

    return wavedec_kernel


def available() -> bool:
    """Whether numba is installed and usable (the kernel compiles lazily on first use)."""
    return _compiled() is not None


# Inputs smaller than this (samples) run on one thread: waking a second one costs more than it saves, and
# on a busy machine a parallel region can wait milliseconds for a descheduled thread.
PARALLEL_MIN_SAMPLES = 1 << 18

_threads = threading.local()  # numba's thread count is set per calling thread


def _use_threads(samples: int) -> int:
    """Set numba's thread count for the next call: torch's, or 1 for a small input. Returns it."""
    wanted = torch.get_num_threads() if samples >= PARALLEL_MIN_SAMPLES else 1
    if getattr(_threads, "count", None) != wanted:
        import numba

        _threads.used = min(wanted, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        numba.set_num_threads(_threads.used)
        _threads.count = wanted
    return int(_threads.used)


def wavedec(
    x: np.ndarray, lo: np.ndarray, hi: np.ndarray, shift: int, levels: np.ndarray, edges: np.ndarray
) -> list[torch.Tensor]:
    """x (B, N) C-contiguous float32/float64 -> [cA_L, cD_L, ..., cD_1], each (B, n_l) and contiguous.

    lo, hi: the filters, in x's dtype; levels (L, 3) int64, level 1 first: [N, n, edge_at]; edges: the
    boundary sources (see `wavedec_kernel`). All bands share one allocation.
    """
    kernel = _compiled()
    if kernel is None:
        raise RuntimeError("the numba wavelet kernel is not available (is numba installed?)")
    B = x.shape[0]
    threads = _use_threads(x.size)
    n = [*levels[:, 1].tolist(), int(levels[-1, 1])]  # details of levels 1 .. L, then the approximation
    sizes = [B * v for v in n]
    offsets = np.cumsum([0, *sizes[:-1]])  # where each band starts in the one output buffer
    plan = np.concatenate([levels, offsets[:-1, None]], axis=1)
    out = torch.empty(sum(sizes), dtype=torch.float32 if x.dtype == np.float32 else torch.float64)
    kernel(x, lo, hi, shift, plan, edges, int(offsets[-1]), out.numpy(), min(B, 4 * threads))
    bands = [band.view(B, v) for band, v in zip(out.split(sizes), n, strict=True)]
    return [bands[-1], *bands[-2::-1]]
