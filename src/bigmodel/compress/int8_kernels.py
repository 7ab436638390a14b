"""Weight-only int8 matrix products for a few rows (decoding steps), compiled by numba.

Decoding reads every weight once per step for one row (or a handful) of activations, so its speed is
the rate at which weights stream from memory. These kernels read the int8 weights directly, widen each
to float32 in registers and accumulate in float32: four times fewer bytes than fp32 weights, and no
rounding of the activations (fbgemm's int8 kernels quantize them). On a 2-core AVX2 CPU they stream the
weights about 1.3-1.8x faster than fbgemm's dynamic int8 GEMV (benchmarks/generate_speed.py).

numba is optional: `available()` is False without it, and `compress/quantize.py` then uses fbgemm.
The kernels compile on first use (a second or two, cached on disk by numba afterwards).
"""

from __future__ import annotations

import threading
from functools import cache
from typing import Any

import torch

MAX_ROWS = 16  # more rows than a decoding step has (prefill, evaluation) go to BLAS on the dequantized weight


@cache
def _compiled() -> Any | None:
    try:
        return _build()
    except Exception:  # numba missing or unusable (e.g. no writable cache folder): the caller falls back
        return None


def _build() -> Any:
    import numba
    import numpy as np

    # fastmath lets LLVM reassociate and vectorise the sums (reassociation alone measured ~15% slower); the
    # kernels only multiply and add, so NaN activations still come out as NaN (tested)
    jit = numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False, nogil=True)

    @jit
    def rows_kernel(x: Any, w: Any, scales: Any, bias: Any, out: Any) -> None:  # x (M, K), w (N, K) -> out (M, N)
        M, K = x.shape
        N = w.shape[0]
        for n in numba.prange(N):
            sn, bn = scales[n], bias[n]
            m = 0
            while m + 4 <= M:  # four activation rows share each widened weight: four independent sums
                a0 = a1 = a2 = a3 = np.float32(0.0)
                for k in range(K):
                    wk = np.float32(w[n, k])
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
                    acc += x[m, k] * np.float32(w[n, k])
                out[m, n] = acc * sn + bn
                m += 1

    return rows_kernel


def available() -> bool:
    """Whether numba is installed (the kernels compile lazily on first use)."""
    return _compiled() is not None


_threads = threading.local()  # numba's thread count is set per calling thread


def _match_torch_threads() -> None:
    """Use as many threads as torch does (checked cheaply: decoding calls this ~50 times a step)."""
    wanted = torch.get_num_threads()
    if getattr(_threads, "count", None) != wanted:
        import numba

        numba.set_num_threads(min(wanted, numba.config.NUMBA_NUM_THREADS))  # type: ignore[attr-defined]
        _threads.count = wanted


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ (weight (N, K) int8 * scales (N,)[:, None]).T + bias (N,) -> (M, N) float32,
    for M <= MAX_ROWS.

    CPU tensors only; uses as many threads as torch does. Concurrent calls from several threads are safe
    with numba's OpenMP or TBB threading layer, not with its fallback `workqueue` layer.
    """
    kernel = _compiled()
    if kernel is None:
        raise RuntimeError("the numba int8 kernels are not available (is numba installed?)")
    _match_torch_threads()
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    kernel(x.numpy(), weight.numpy(), scales.float().numpy(), bias.float().numpy(), out.numpy())
    return out
