"""int8-weight matrix products for a few rows (decoding steps), compiled by numba.

Decoding reads every weight once per step for one row (or a handful) of activations, so its speed is
the rate at which weights stream from memory. The kernel (`matmul_rows` in models/gpt_numba.py, which the
compiled decoding step uses too) reads the int8 weights directly: four times fewer bytes than fp32
weights. It rounds each activation row to int16 on its own scale (at most 1/65534 of the row's largest
value, ~250x finer than the weights' own int8 step) so that the CPU multiplies and adds 16 weights per
instruction, and sums the products in integers (exact up to the final conversion to float32). fbgemm's
int8 kernels round activations to 7 bits instead. On a demo model, perplexity through decoding steps
equals the forward's (float activations) to 1e-7 relative (benchmarks/int8_quality.py); speed against
fbgemm and fp32 is in benchmarks/generate_speed.py.

numba is optional: `available()` is False without it, and `compress/quantize.py` then uses fbgemm.
The kernel compiles on first use (a second or two, cached on disk by numba afterwards).
"""

from __future__ import annotations

from functools import cache
from types import ModuleType

import torch

MAX_ROWS = 32  # more rows (long prompts, evaluation) are faster through BLAS on dequantized weights


@cache
def compiled() -> ModuleType | None:
    """models/gpt_numba.py (the row-matmul kernel and the compiled decoding step), or None where numba is
    missing or unusable. Imported once, here, by Int8Linear and by the generation engine alike."""
    try:
        from bigmodel.models import gpt_numba

        return gpt_numba
    except Exception:  # numba missing or unusable (e.g. no writable cache folder): the caller falls back
        return None


def available() -> bool:
    """Whether numba is installed and usable (the kernel compiles lazily on first use)."""
    return compiled() is not None


def usable() -> bool:
    """Whether the kernel may run in this process: available, and not in a child forked after it ran here
    (numba's OpenMP layer terminates such a child); Int8Linear then uses BLAS on dequantized weights."""
    kernels = compiled()
    return kernels is not None and kernels.usable()


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (M, K) float32 @ (weight (N, K) int8 * scales (N,)[:, None]).T + bias (N,) -> (M, N) float32,
    for M <= MAX_ROWS, with each row of x rounded to int16 on its own scale (rows holding NaN or inf are
    computed in float32).

    CPU tensors only; uses as many threads as torch does. Concurrent calls from several threads are safe
    with numba's OpenMP or TBB threading layer, not with its fallback `workqueue` layer.
    """
    kernels = compiled()
    if kernels is None:
        raise RuntimeError("the numba int8 kernels are not available (is numba installed?)")
    kernels.match_torch_threads()
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    kernels.matmul_rows(x.numpy(), weight.numpy(), scales.float().numpy(), bias.float().numpy(), out.numpy())
    return out
