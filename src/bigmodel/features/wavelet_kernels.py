"""The compiled (numba) CPU path of `wavelet.py`: a whole multilevel DWT of every row in one call, and its
inverse.

`wavelet.py`'s torch path computes a level as one gather and one banded block matrix multiply: it is
differentiable and runs on any device, but for short filters it does several times more multiplications
than the filter has taps (8x for haar) and every level is another pass over memory. Here each row (16 KB
for 4,096 float32 samples) goes through all its levels while it stays in the core's cache.

Analysis, per level and row:

1. extend: the signal sits in a scratch row at offset -s (level 1 copies the row in; later levels find
   the previous approximation already written there), and only the few samples beyond each end are
   filled, from the precomputed `edges` table (the mode's boundary rule; -1 for a zero). The kernel
   itself knows nothing about modes;
2. filter: a[k] = sum_j lo[j] xe[2k + j], d[k] likewise with hi: one pass over k per pair of taps,
   branch-free, which LLVM vectorises (stride-2 loads). a goes into the other scratch row at offset -s
   (the next level's signal) or, at the last level, to the output; d goes straight to the output.

Synthesis, per level and row, in polyphase form: x[2m + p] = sum_i lo[2i + q_p] a[m + c_p - i] +
hi[2i + q_p] d[m + c_p - i]. The outputs whose k = m + c_p - i all lie inside the coefficients run as
unit-stride passes, one per tap; the few at each end (zeros or periodic wrap) follow the definition.

The caller (`wavelet._kernel_wavedec`, `wavelet._kernel_waverec`) decides when this runs, computes the
analysis plan with the same rules as its torch path and passes the reconstruction filters (the reversed
decomposition filters), so both paths compute PyWavelets' coefficients. Sums run in the input's dtype
(float32 or float64), with fused multiply-adds and no other fastmath: every output is its own sum, so
the loops over outputs vectorise without reassociating anything, and NaN/inf keep their meaning.

numba is optional: `available()` is False without it, and `wavelet.py` then uses its torch path. The
kernels compile on first use (a few seconds per dtype; cached on disk by numba afterwards). They are
serial and release the GIL; a large input's rows are split between as many Python threads as torch uses
(numba's own `parallel=True` would start an OpenMP pool in torch's libgomp, which resets torch's thread
count: seen with numba 0.68, torch 2.13). Concurrent calls from several threads are safe.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial
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

    # serial kernels over a range of rows, without the GIL (`_run_rows` splits the rows between threads);
    # fastmath "contract" only: fused multiply-adds
    jit = numba.njit(fastmath={"contract"}, cache=True, boundscheck=False, nogil=True)

    @jit
    def wavedec_kernel(
        x: Any, lo: Any, hi: Any, shift: int, levels: Any, edges: Any, approx_at: int, out: Any, b0: int, b1: int
    ) -> None:
        """Rows b0 .. b1 - 1 of x (B, N) through all levels.

        levels (L, 4) int64, level 1 first: [N, n, edge_at, out_at]: the level makes n coefficients per row
        from N samples (the row at level 1, then the previous approximation). Its extended signal
        xe[i] = x_ext[i + shift], i < 2n + F - 2, is the signal itself at -shift <= i < N - shift; the other
        i read the signal sample edges[edge_at + ...] (left end, then right end; -1: a zero). The details
        of row b go to out[out_at + b n : out_at + (b + 1) n], the last approximation likewise from
        approx_at. The intermediate approximations stay in two scratch rows.
        """
        L = levels.shape[0]
        F = lo.shape[0]
        width = 0
        for lev in range(L):
            width = max(width, 2 * levels[lev, 1] + F - 2)
        # two scratch rows, picked by the level's parity (swapping two array variables instead makes them
        # loop-carried, and LLVM then no longer vectorises the filter loops)
        buf = np.empty((2, width), x.dtype)
        for b in range(b0, b1):
            row, inner = x[b], buf[0, -shift:]
            for i in range(row.shape[0]):  # level 1's signal; later levels find theirs in place
                inner[i] = row[i]
            for lev in range(L):
                N, n, e, at = levels[lev, 0], levels[lev, 1], levels[lev, 2], levels[lev, 3]
                cur, nxt = buf[lev % 2], buf[1 - lev % 2]
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

    @jit
    def waverec_kernel(bands: Any, lo: Any, hi: Any, periodic: bool, out: Any, b0: int, b1: int) -> None:
        """Rows b0 .. b1 - 1 through all inverse levels: bands [cA (B, n_0), cD_L (B, n_L), ..., cD_1] ->
        out (B, T), lengths already checked (an approximation one longer than its details loses its last
        sample).

        One level makes x[t] = sum_k a[k] lo[t + s - 2k] + d[k] hi[t + s - 2k], t < 2M (k outside [0, n):
        a zero, or k mod n for periodization). By the parity of t: x[2m + p] = sum_i lo[2i + q_p]
        a[m + c_p - i] + hi[2i + q_p] d[m + c_p - i]. The m where every k lies inside run as passes over
        m per tap, unit stride; the few others (F/2 at each end) one by one.
        """
        L = len(bands) - 1
        F = lo.shape[0]
        h = F // 2
        s = h - 1 if periodic else F - 2
        q0, q1 = s % 2, (s + 1) % 2
        c0, c1 = (s - q0) // 2, (s + 1 - q1) // 2
        width = 1
        for lev in range(1, L + 1):
            n = bands[lev].shape[1]
            width = max(width, n if periodic else n - h + 1)
        buf = np.empty((2, 2 * width), out.dtype)  # the intermediate approximations, by parity as above
        eo = np.empty((2, width), out.dtype)
        for b in range(b0, b1):
            for lev in range(1, L + 1):
                a = bands[0][b] if lev == 1 else buf[lev % 2]  # the previous level's output
                d = bands[lev][b]
                n = d.shape[0]
                M = n if periodic else n - h + 1
                x = out[b] if lev == L else buf[1 - lev % 2]
                m_lo = min(M, max(0, h - 1 - min(c0, c1)))  # the first m with every k >= 0
                m_hi = max(m_lo, min(M, n - max(c0, c1)))  # past the last m with every k < n
                for j in range(m_lo + M - m_hi):  # the ends, by the definition
                    m = j if j < m_lo else m_hi + j - m_lo
                    v0 = v1 = lo[0] - lo[0]
                    for i in range(h):
                        k0, k1 = m + c0 - i, m + c1 - i
                        if periodic:
                            k0, k1 = k0 % n, k1 % n
                        if 0 <= k0 < n:
                            v0 += lo[2 * i + q0] * a[k0] + hi[2 * i + q0] * d[k0]
                        if 0 <= k1 < n:
                            v1 += lo[2 * i + q1] * a[k1] + hi[2 * i + q1] * d[k1]
                    x[2 * m] = v0
                    x[2 * m + 1] = v1
                E, O = eo[0], eo[1]  # noqa: E741  the interior's even and odd outputs: one pass per tap
                for i in range(h):
                    e0, e1 = m_lo + c0 - i, m_lo + c1 - i
                    A0, D0, A1, D1 = a[e0:], d[e0:], a[e1:], d[e1:]
                    l0, g0, l1, g1 = lo[2 * i + q0], hi[2 * i + q0], lo[2 * i + q1], hi[2 * i + q1]
                    if i == 0:
                        for u in range(m_hi - m_lo):
                            E[u] = l0 * A0[u] + g0 * D0[u]
                            O[u] = l1 * A1[u] + g1 * D1[u]
                    else:
                        for u in range(m_hi - m_lo):
                            E[u] += l0 * A0[u] + g0 * D0[u]
                            O[u] += l1 * A1[u] + g1 * D1[u]
                X = x[2 * m_lo :]  # interleaved at the end (stored in place, LLVM does not vectorise the sums)
                for u in range(m_hi - m_lo):
                    X[2 * u] = E[u]
                    X[2 * u + 1] = O[u]

    return wavedec_kernel, waverec_kernel


def available() -> bool:
    """Whether numba is installed and usable (the kernel compiles lazily on first use)."""
    return _compiled() is not None


# Inputs smaller than this (samples) run on the calling thread alone: handing rows to other threads costs
# more than it saves.
PARALLEL_MIN_SAMPLES = 1 << 18

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _forget_pool() -> None:  # a forked child has none of the parent's threads (and maybe a held lock)
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _run_rows(kernel: Any, B: int, samples: int, *args: Any) -> None:
    """kernel(*args, b0, b1) over rows [0, B): split between as many threads as torch uses (the caller
    takes the first share), or all on the calling thread for an input under PARALLEL_MIN_SAMPLES."""
    global _pool
    threads = min(B, torch.get_num_threads()) if samples >= PARALLEL_MIN_SAMPLES else 1
    bounds = [B * i // threads for i in range(threads + 1)]
    shares = []
    if threads > 1:
        with _pool_lock:  # one pool; it starts threads only as shares need them
            if _pool is None:
                _pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="bigmodel-wavelet")
            pool = _pool
        shares = [pool.submit(partial(kernel, *args, bounds[i], bounds[i + 1])) for i in range(1, threads)]
    kernel(*args, bounds[0], bounds[1])
    for share in shares:
        share.result()


def _float_tensor(dtype: np.dtype) -> torch.dtype:
    return torch.float32 if dtype == np.float32 else torch.float64


def wavedec(
    x: np.ndarray, lo: np.ndarray, hi: np.ndarray, shift: int, levels: np.ndarray, edges: np.ndarray
) -> list[torch.Tensor]:
    """x (B, N) C-contiguous float32/float64 -> [cA_L, cD_L, ..., cD_1], each (B, n_l) and contiguous.

    lo, hi: the filters, in x's dtype; levels (L, 3) int64, level 1 first: [N, n, edge_at]; edges: the
    boundary sources (see `wavedec_kernel`). All bands share one allocation.
    """
    kernels = _compiled()
    if kernels is None:
        raise RuntimeError("the numba wavelet kernel is not available (is numba installed?)")
    B = x.shape[0]
    n = [*levels[:, 1].tolist(), int(levels[-1, 1])]  # details of levels 1 .. L, then the approximation
    sizes = [B * v for v in n]
    offsets = np.cumsum([0, *sizes[:-1]])  # where each band starts in the one output buffer
    plan = np.concatenate([levels, offsets[:-1, None]], axis=1)
    out = torch.empty(sum(sizes), dtype=_float_tensor(x.dtype))
    _run_rows(kernels[0], B, x.size, x, lo, hi, shift, plan, edges, int(offsets[-1]), out.numpy())
    bands = [band.view(B, v) for band, v in zip(out.split(sizes), n, strict=True)]
    return [bands[-1], *bands[-2::-1]]


def waverec(bands: list[np.ndarray], lo: np.ndarray, hi: np.ndarray, periodic: bool, length: int) -> torch.Tensor:
    """[cA (B, n_0), cD_L (B, n_L), ..., cD_1 (B, n_1)] C-contiguous float32/float64 -> (B, length).

    The lengths must already fit (n_0 = n_L or n_L + 1, each level's output n_l or n_l + 1 long, `length`
    the last level's); lo, hi: the filters, in the bands' dtype.
    """
    from numba.typed import List

    kernels = _compiled()
    if kernels is None:
        raise RuntimeError("the numba wavelet kernel is not available (is numba installed?)")
    B = bands[0].shape[0]
    out = torch.empty(B, length, dtype=_float_tensor(bands[0].dtype))
    _run_rows(kernels[1], B, B * length, List(bands), lo, hi, periodic, out.numpy())
    return out
