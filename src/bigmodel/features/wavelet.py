"""Discrete wavelet transforms in torch, equal to PyWavelets: dwt/idwt, wavedec/waverec, their 2-D forms,
differentiable layers, and the `WaveletFeatures` estimator (per-level energies and statistics).

Conventions are PyWavelets' (`pywt.dwt`, `pywt.wavedec`, ...): the same filters (see wavelet_filters.py),
the same signal extension modes, output lengths and coefficient order. Modes:

- "symmetric": half-sample symmetric extension (... x1 x0 | x0 x1 ... xn-1 | xn-1 xn-2 ...);
  coefficients have floor((N + F - 1) / 2) samples for a filter of length F.
- "periodization": periodic extension (odd N first repeats its last sample); ceil(N / 2) coefficients,
  the shortest representation.
- "zero": zeros outside the signal; floor((N + F - 1) / 2) coefficients.

How the torch path runs: one level of the transform is, for every block of `Bo` output pairs
(approximation and detail), a window of 2 Bo + F - 2 input samples times a fixed (window, 2 Bo) band
matrix. A level is therefore one gather (which also performs the boundary extension, by index) and one
matrix multiply over all signals of the batch, on the input's device, in the input's dtype,
differentiable end to end. The next level reads its input straight out of the previous level's blocked
output (no copy).

Every transform also has a compiled path for the common case: float32 or float64 CPU input that needs no
gradient (none requires grad, or autograd is off: numpy input, torch.no_grad(), WaveletFeatures.transform)
goes to wavelet_kernels.py, numba kernels that run all levels of every row in one call while the row stays
in cache (several times faster than PyWavelets for every filter length). Everything else takes the torch
path: GPU tensors, other dtypes, gradients, torch.jit tracing, torch.compile, an inverse given a None
band, and every call when numba is missing or fails. `_kernel_ok` is that rule, `_wavedec_rows` and
`_waverec_rows` (under dwt/wavedec/dwt2/wavedec2 and their inverses) apply it. Both paths compute the same
coefficients: tests/features/test_wavelet.py checks each against PyWavelets and against the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.features import wavelet_kernels
from bigmodel.features.base import Estimator, same_kind, to_tensor
from bigmodel.features.wavelet_filters import FAMILIES_TEXT, WAVELETS, Wavelet, filter_bank

MODES = ("symmetric", "periodization", "zero")

__all__ = [
    "MODES",
    "WAVELETS",
    "FAMILIES_TEXT",
    "Wavelet",
    "WaveletDecomposition",
    "WaveletFeatures",
    "WaveletReconstruction",
    "dwt",
    "dwt2",
    "dwt_coeff_len",
    "dwt_max_level",
    "idwt",
    "idwt2",
    "wavedec",
    "wavedec2",
    "filter_bank",
    "waverec",
    "waverec2",
]


# ---------------------------------------------------------------------------------------------- lengths


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid: expected {' | '.join(MODES)}")
    return mode


def dwt_coeff_len(data_len: int, filter_len: int, mode: str) -> int:
    """Number of coefficients one DWT level makes from `data_len` samples (as pywt.dwt_coeff_len)."""
    _check_mode(mode)
    if data_len < 1:
        raise ValueError(f"data_len={data_len} must be >= 1")
    return (data_len + 1) // 2 if mode == "periodization" else (data_len + filter_len - 1) // 2


def dwt_max_level(data_len: int, filter_len: int | str | Wavelet) -> int:
    """Deepest useful level: the last at which the signal is still longer than the filter (as pywt)."""
    F_len = filter_len if isinstance(filter_len, int) else filter_bank(filter_len).filter_len
    if data_len < F_len - 1:
        return 0
    return int(np.floor(np.log2(data_len / (F_len - 1))))


def _block(filter_len: int) -> int:
    """Output pairs per block: long enough for an efficient matrix multiply, short enough to waste little."""
    return 8 if filter_len <= 16 else 16


# ------------------------------------------------------------------------------- gather plans, matrices


def _shift(F_len: int, mode: str) -> int:
    """s such that analysis output o is sum_j w[j] x_ext[2 o + j + s]."""
    return -(F_len // 2 - 1) if mode == "periodization" else -(F_len - 2)


def _extension_source(pos: np.ndarray, N: int, mode: str) -> np.ndarray:
    """The sample of an N-sample signal that each extended position reads (-1: a zero, in "zero" mode)."""
    if mode == "symmetric":
        p = pos % (2 * N)
        return np.where(p >= N, 2 * N - 1 - p, p)
    if mode == "periodization":  # an odd signal is first extended by repeating its last sample
        return np.minimum(pos % (N + N % 2), N - 1)
    return np.where((pos >= 0) & (pos < N), pos, -1)


@lru_cache(maxsize=1024)
def _analysis_index(N: int, F_len: int, mode: str, bo: int, block_in: int | None, device: torch.device) -> torch.Tensor:
    """Source columns of every (block, window position) of one analysis level, boundary extension included.

    Output o of a level is sum_j w[j] x_ext[2 o + j + s]; block b covers outputs b*Bo .. b*Bo + Bo - 1 and
    needs extended positions 2 Bo b + s .. 2 Bo b + s + W - 1. The source is the plain signal (block_in
    None; in "zero" mode column N is zero) or a previous level's output laid out as blocks of 2 block_in
    columns (2 block_in + 1 in "zero" mode, the last one zero).
    """
    n = dwt_coeff_len(N, F_len, mode)
    nb, W = -(-n // bo), 2 * bo + F_len - 2
    pos = np.arange(nb)[:, None] * (2 * bo) + np.arange(W)[None, :] + _shift(F_len, mode)  # (nb, W)
    p = _extension_source(pos, N, mode)
    if block_in is None:
        col, zero_col = p, N
    else:
        width = 2 * block_in + (mode == "zero")
        col, zero_col = (p // block_in) * width + p % block_in, 2 * block_in
    col = np.where(p < 0, zero_col, col)
    return torch.from_numpy(col.reshape(-1).astype(np.int64)).to(device)


@lru_cache(maxsize=256)
def _analysis_matrix(w: Wavelet, bo: int, zero_col: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(W, 2 Bo) band matrix: column i is the low-pass output i, Bo + i the high-pass (plus a zero column)."""
    F_len = w.filter_len
    M = np.zeros((2 * bo + F_len - 2, 2 * bo + zero_col))
    for i in range(bo):  # w[j] = dec[F - 1 - j]: the reversed decomposition filters = the reconstruction ones
        M[2 * i : 2 * i + F_len, i] = w.rec_lo
        M[2 * i : 2 * i + F_len, bo + i] = w.rec_hi
    return torch.from_numpy(M).to(device, dtype)


def _synthesis_geometry(F_len: int, periodic: bool, bo: int) -> tuple[int, int, int]:
    """Shift s (x[t] = sum_k c[k] r[t + s - 2k]), first coefficient k0 of a block and window size K."""
    s = F_len // 2 - 1 if periodic else F_len - 2
    k0 = -((F_len - 1 - s) // 2)
    K = (2 * bo - 1 + s) // 2 - k0 + 1
    return s, k0, K


@lru_cache(maxsize=1024)
def _synthesis_index(n: int, F_len: int, periodic: bool, bo: int, device: torch.device) -> torch.Tensor:
    """Columns of [approx | detail | zero] that block b of the reconstruction reads: k = Bo b + k0 + i."""
    out_len = 2 * n if periodic else 2 * n - F_len + 2
    _, k0, K = _synthesis_geometry(F_len, periodic, bo)
    nb = -(-out_len // (2 * bo))
    k = np.arange(nb)[:, None] * bo + k0 + np.arange(K)[None, :]  # (nb, K)
    if periodic:
        ka = kd = k % n
        kd = kd + n
    else:
        inside = (k >= 0) & (k < n)
        ka, kd = np.where(inside, k, 2 * n), np.where(inside, n + k, 2 * n)
    col = np.concatenate([ka, kd], axis=1)  # (nb, 2K)
    return torch.from_numpy(col.reshape(-1).astype(np.int64)).to(device)


@lru_cache(maxsize=256)
def _synthesis_matrix(w: Wavelet, periodic: bool, bo: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(2K, 2 Bo) matrix from a block's approximation and detail windows to its 2 Bo output samples."""
    F_len = w.filter_len
    s, k0, K = _synthesis_geometry(F_len, periodic, bo)
    M = np.zeros((2 * K, 2 * bo))
    for i in range(K):
        for u in range(2 * bo):
            j = u + s - 2 * (k0 + i)
            if 0 <= j < F_len:
                M[i, u], M[K + i, u] = w.rec_lo[j], w.rec_hi[j]
    return torch.from_numpy(M).to(device, dtype)


# ---------------------------------------------------------------------------------- one level, on rows


class _Blocked:
    """A level's output (B, nb, 2 Bo [+ 1]): low-pass in columns [0, Bo), high-pass in [Bo, 2 Bo), then
    in "zero" mode a zero column that the next level reads for samples outside the signal."""

    def __init__(self, r: torch.Tensor, n: int, bo: int) -> None:
        self.r, self.n, self.bo = r, n, bo

    def approx(self) -> torch.Tensor:  # (B, n)
        return self.r[:, :, : self.bo].reshape(self.r.shape[0], -1)[:, : self.n]

    def detail(self) -> torch.Tensor:  # (B, n)
        return self.r[:, :, self.bo : 2 * self.bo].reshape(self.r.shape[0], -1)[:, : self.n]


def _analysis(x: torch.Tensor | _Blocked, N: int, w: Wavelet, mode: str) -> _Blocked:
    """One DWT level of every row: x (B, N) or a previous level's blocked output holding N approximations."""
    F_len, bo = w.filter_len, _block(w.filter_len)
    if isinstance(x, _Blocked):
        src, block_in = x.r.reshape(x.r.shape[0], -1), x.bo
    else:
        src, block_in = (F.pad(x, (0, 1)) if mode == "zero" else x), None
    idx = _analysis_index(N, F_len, mode, bo, block_in, src.device)
    B, n = src.shape[0], dwt_coeff_len(N, F_len, mode)
    windows = src.index_select(1, idx).view(-1, 2 * bo + F_len - 2)  # (B * nb, W)
    M = _analysis_matrix(w, bo, mode == "zero", src.dtype, src.device)
    r = windows @ M  # (B * nb, 2 Bo [+ 1])
    return _Blocked(r.view(B, -1, M.shape[1]), n, bo)


def _synthesis(a: torch.Tensor | None, d: torch.Tensor | None, w: Wavelet, mode: str) -> torch.Tensor:
    """One inverse DWT level of every row: a, d (B, n) -> (B, 2n - F + 2), or (B, 2n) for periodization."""
    ref = a if a is not None else d
    assert ref is not None
    B, n = ref.shape
    a = a if a is not None else torch.zeros_like(ref)
    d = d if d is not None else torch.zeros_like(ref)
    periodic, F_len, bo = mode == "periodization", w.filter_len, _block(w.filter_len)
    out_len = 2 * n if periodic else 2 * n - F_len + 2
    if out_len < 1:
        raise ValueError(f"{n} coefficients are too few to invert with {w.name} (filter length {F_len})")
    src = torch.cat([a, d] if periodic else [a, d, a.new_zeros(B, 1)], dim=1)  # (B, 2n [+ 1])
    idx = _synthesis_index(n, F_len, periodic, bo, src.device)
    M = _synthesis_matrix(w, periodic, bo, src.dtype, src.device)
    windows = src.index_select(1, idx).view(-1, M.shape[0])  # (B * nb, 2K)
    return (windows @ M).view(B, -1)[:, :out_len]


# ------------------------------------------------------------------------ the compiled CPU path (numba)

_USE_KERNEL = True  # False: always the torch path (the tests compare the two)


@lru_cache(maxsize=256)
def _kernel_plan(N: int, F_len: int, mode: str, level: int) -> tuple[int, np.ndarray, np.ndarray]:
    """What wavelet_kernels.wavedec needs besides the signal and the filters: the shift s, a row per level
    [N, n, edge_at] and the boundary sources `edges`.

    A level reads its extended signal xe[i] = x_ext[i + s], i < 2n + F - 2: the N samples themselves at
    -s <= i < N - s, and at the other i (left end, then right end) the sample edges[edge_at + ...] says,
    by the same rule as the torch path (-1: a zero).
    """
    s = _shift(F_len, mode)
    rows, edges, at = [], [], 0
    for _ in range(level):
        n = dwt_coeff_len(N, F_len, mode)
        i = np.r_[np.arange(-s), np.arange(N - s, 2 * n + F_len - 2)]
        edges.append(_extension_source(i + s, N, mode))
        rows.append([N, n, at])
        at, N = at + len(i), n
    return s, np.array(rows, dtype=np.int64), np.concatenate(edges).astype(np.int64)


@lru_cache(maxsize=256)
def _kernel_filters(w: Wavelet, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    return np.asarray(w.rec_lo, dtype=np_dtype), np.asarray(w.rec_hi, dtype=np_dtype)


def _kernel_ok(*ts: torch.Tensor) -> bool:
    """Whether the compiled path may run on these tensors: float32 or float64 (all the same) on the CPU,
    no gradient needed (none requires grad, or autograd is off), not inside torch.jit tracing or
    torch.compile, and numba usable."""
    return (
        _USE_KERNEL
        and ts[0].dtype in (torch.float32, torch.float64)
        and all(t.device.type == "cpu" and t.dtype == ts[0].dtype for t in ts)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in ts))
        and not torch.jit.is_tracing()
        and not torch.compiler.is_compiling()
        and wavelet_kernels.available()
    )


def _kernel_wavedec(x: torch.Tensor, w: Wavelet, mode: str, level: int) -> list[torch.Tensor] | None:
    """wavedec of the rows of x (B, N) by the compiled kernel, or None where the torch path must run (see
    _kernel_ok; any failure of numba also falls back: the torch path computes the same coefficients)."""
    if level < 1 or not _kernel_ok(x):
        return None
    shift, levels, edges = _kernel_plan(x.shape[1], w.filter_len, mode, level)
    lo, hi = _kernel_filters(w, x.dtype)
    try:
        return wavelet_kernels.wavedec(x.detach().contiguous().numpy(), lo, hi, shift, levels, edges)
    except Exception:  # numba failed to compile or run this call
        return None


def _kernel_waverec(coeffs: Sequence[torch.Tensor | None], w: Wavelet, mode: str) -> torch.Tensor | None:
    """waverec of rows [cA (B, n), cD_L (B, n_L), ..., cD_1] by the compiled kernel, or None where the torch
    path must run: as for the analysis, and also when a band is None or the lengths do not fit (the
    torch path then treats the Nones as zeros, or raises its error)."""
    bands = [c for c in coeffs if c is not None]
    if len(bands) < 2 or len(bands) < len(coeffs) or not _kernel_ok(*bands):
        return None
    periodic, length = mode == "periodization", bands[0].shape[1]
    for d in bands[1:]:
        n = d.shape[1]
        if d.shape[0] != bands[0].shape[0] or length not in (n, n + 1):
            return None
        length = 2 * n if periodic else 2 * n - w.filter_len + 2
        if length < 1:
            return None
    lo, hi = _kernel_filters(w, bands[0].dtype)
    try:
        rows = [b.detach().contiguous().numpy() for b in bands]
        return wavelet_kernels.waverec(rows, lo, hi, periodic, length)
    except Exception:  # numba failed to compile or run this call
        return None


# ------------------------------------------------------------------------------ inputs and axis handling


def _signal(x: Any, min_dim: int = 1) -> tuple[torch.Tensor, bool]:
    as_numpy = not isinstance(x, torch.Tensor)
    if as_numpy:
        arr = np.asarray(x)
        if not np.issubdtype(arr.dtype, np.number):
            raise ValueError(f"signals must be numeric, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr) if arr.flags.writeable else arr.copy()).reshape(arr.shape)
    else:
        t = x
    if t.dim() < min_dim:
        what = "(..., T)" if min_dim == 1 else "(..., H, W)"
        raise ValueError(f"signals must have shape {what}, got {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"signals are empty: shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError("complex signals are not supported: transform the real and imaginary parts")
    if not t.is_floating_point():
        t = t.double() if as_numpy else t.float()
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError("the signal contains NaN or infinite values; clean or impute them first")
    return t, as_numpy


def _rows(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Move `axis` last and flatten the rest: (..., N) -> (B, N), plus the leading shape to restore."""
    if not -t.dim() <= axis < t.dim():
        raise ValueError(f"axis={axis} is out of range for an input of shape {tuple(t.shape)}")
    t = t.movedim(axis, -1)
    return t.reshape(-1, t.shape[-1]), tuple(t.shape[:-1])


def _unrows(r: torch.Tensor, lead: tuple[int, ...], axis: int) -> torch.Tensor:
    return r.reshape(*lead, r.shape[-1]).movedim(-1, axis)


def _resolve_level(level: int | None, length: int, w: Wavelet) -> int:
    top = dwt_max_level(length, w.filter_len)
    if level is None:
        return top
    if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or level < 0:
        raise ValueError(f"level={level!r} must be a non-negative integer or None (the deepest useful level)")
    if level > top:
        raise ValueError(
            f"level={level} is too high for {length} samples with {w.name} (filter length {w.filter_len}): "
            f"at most dwt_max_level = {top}"
        )
    return int(level)


def _coef(c: Any, like: torch.Tensor | None) -> torch.Tensor | None:
    if c is None:
        return None
    t = c if isinstance(c, torch.Tensor) else torch.from_numpy(np.asarray(c))
    if like is not None:
        t = t.to(like.device, like.dtype)
    elif not t.is_floating_point():
        t = t.double()
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        raise ValueError("the coefficients contain NaN or infinite values")
    return t


def _template(first: Any) -> tuple[torch.Tensor, bool]:
    """For an inverse transform: the tensor whose device and dtype the other coefficients take, and whether
    to answer with numpy. `first` is the first coefficient that is not None (None if there is none)."""
    if first is None:
        raise ValueError("all coefficients are None: nothing to reconstruct")
    like = _coef(first, None)
    assert like is not None
    return like, not isinstance(first, torch.Tensor)


# ----------------------------------------------------------------------------------------- 1-D transforms


def _wavedec_rows(x: torch.Tensor, w: Wavelet, mode: str, level: int) -> list[torch.Tensor]:
    """(B, N) -> [cA_level, cD_level, ..., cD_1], each (B, n_j): compiled when it can, else in torch."""
    compiled = _kernel_wavedec(x, w, mode, level)
    if compiled is not None:
        return compiled
    details, src, N = [], x, x.shape[1]
    cur: torch.Tensor | _Blocked = src
    for _ in range(level):
        out = _analysis(cur, N, w, mode)
        details.append(out.detail())
        cur, N = out, out.n
    approx = cur.approx() if isinstance(cur, _Blocked) else cur
    return [approx, *details[::-1]]


def _waverec_rows(coeffs: Sequence[torch.Tensor | None], w: Wavelet, mode: str) -> torch.Tensor:
    """[cA (B, n), cD_L, ..., cD_1] (None: zeros) -> (B, T): compiled when it can, else in torch."""
    compiled = _kernel_waverec(coeffs, w, mode)
    if compiled is not None:
        return compiled
    a = coeffs[0]
    for d in coeffs[1:]:
        if a is None and d is None:  # zeros in, zeros out: stays None until a band is given
            continue
        if a is not None and d is not None:
            if a.shape[-1] == d.shape[-1] + 1:  # a non-periodized level can return one extra sample
                a = a[..., :-1]
            elif a.shape[-1] != d.shape[-1]:
                raise ValueError(
                    f"coefficient lengths do not match: approximation {a.shape[-1]}, detail {d.shape[-1]}; "
                    "pass the list wavedec returned"
                )
        a = _synthesis(a, d, w, mode)
    if a is None:
        raise ValueError("all coefficients are None: nothing to reconstruct")
    return a


def _dwt_axis(t: torch.Tensor, w: Wavelet, mode: str, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, lead = _rows(t, axis)
    a, d = _wavedec_rows(rows, w, mode, 1)
    return _unrows(a, lead, axis), _unrows(d, lead, axis)


def _idwt_axis(a: torch.Tensor | None, d: torch.Tensor | None, w: Wavelet, mode: str, axis: int) -> torch.Tensor:
    ref = a if a is not None else d
    assert ref is not None
    ra, lead = _rows(a, axis) if a is not None else (None, ())
    rd, lead = _rows(d, axis) if d is not None else (None, lead)
    return _unrows(_waverec_rows([ra, rd], w, mode), lead, axis)


def dwt(x: Any, wavelet: str | Wavelet = "db4", mode: str = "symmetric", axis: int = -1) -> tuple[Any, Any]:
    """One level of the DWT along `axis`: (cA, cD), like pywt.dwt. Numpy in, numpy out; tensor in, tensor out."""
    w, mode = filter_bank(wavelet), _check_mode(mode)
    t, as_numpy = _signal(x)
    a, d = _dwt_axis(t, w, mode, axis)
    return same_kind(a, as_numpy), same_kind(d, as_numpy)


def idwt(cA: Any, cD: Any, wavelet: str | Wavelet = "db4", mode: str = "symmetric", axis: int = -1) -> Any:
    """Inverse of one DWT level, like pywt.idwt; either cA or cD may be None (taken as zeros)."""
    w, mode = filter_bank(wavelet), _check_mode(mode)
    if cA is None and cD is None:
        raise ValueError("cA and cD are both None: nothing to reconstruct")
    as_numpy = not isinstance(cA if cA is not None else cD, torch.Tensor)
    a = _coef(cA, None)
    d = _coef(cD, a)
    if a is not None and d is not None and a.shape != d.shape:
        raise ValueError(f"cA and cD must have the same shape, got {tuple(a.shape)} and {tuple(d.shape)}")
    return same_kind(_idwt_axis(a, d, w, mode, axis), as_numpy)


def wavedec(
    x: Any, wavelet: str | Wavelet = "db4", mode: str = "symmetric", level: int | None = None, axis: int = -1
) -> list[Any]:
    """Multilevel DWT along `axis`: [cA_n, cD_n, ..., cD_1], like pywt.wavedec (level None: the deepest)."""
    w, mode = filter_bank(wavelet), _check_mode(mode)
    t, as_numpy = _signal(x)
    rows, lead = _rows(t, axis)
    n_level = _resolve_level(level, rows.shape[1], w)
    return [same_kind(_unrows(c, lead, axis), as_numpy) for c in _wavedec_rows(rows, w, mode, n_level)]


def waverec(coeffs: Sequence[Any], wavelet: str | Wavelet = "db4", mode: str = "symmetric", axis: int = -1) -> Any:
    """Inverse of wavedec, like pywt.waverec (an odd-length signal comes back one sample longer)."""
    w, mode = filter_bank(wavelet), _check_mode(mode)
    if len(coeffs) == 0:
        raise ValueError("coeffs is empty: pass the list wavedec returned")
    like, as_numpy = _template(next((c for c in coeffs if c is not None), None))
    lead: tuple[int, ...] = ()
    rows: list[torch.Tensor | None] = []
    for c in coeffs:
        t = _coef(c, like)
        if t is None:
            rows.append(None)
            continue
        r, lead = _rows(t, axis)
        rows.append(r)
    if len(coeffs) == 1:
        return same_kind(_unrows(rows[0], lead, axis), as_numpy) if rows[0] is not None else None
    return same_kind(_unrows(_waverec_rows(rows, w, mode), lead, axis), as_numpy)


# ----------------------------------------------------------------------------------------- 2-D transforms


def _axes(t: torch.Tensor, axes: tuple[int, int]) -> tuple[int, int]:
    if len(axes) != 2:
        raise ValueError(f"axes={axes} must name two axes")
    a0, a1 = (a % t.dim() if -t.dim() <= a < t.dim() else None for a in axes)
    if a0 is None or a1 is None or a0 == a1:
        raise ValueError(f"axes={axes} must be two different axes of an input of shape {tuple(t.shape)}")
    return a0, a1


def _dwt2(
    t: torch.Tensor, w: Wavelet, mode: str, axes: tuple[int, int]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    lo, hi = _dwt_axis(t, w, mode, axes[1])
    aa, da = _dwt_axis(lo, w, mode, axes[0])
    ad, dd = _dwt_axis(hi, w, mode, axes[0])
    return aa, (da, ad, dd)  # (cA, (cH, cV, cD)): cH is detail along axes[0], approximation along axes[1]


def _idwt2(
    cA: torch.Tensor | None, details: Sequence[torch.Tensor | None], w: Wavelet, mode: str, axes: tuple[int, int]
) -> torch.Tensor:
    cH, cV, cD = details
    lo = _idwt_axis(cA, cH, w, mode, axes[0]) if cA is not None or cH is not None else None
    hi = _idwt_axis(cV, cD, w, mode, axes[0]) if cV is not None or cD is not None else None
    if lo is None and hi is None:
        raise ValueError("all coefficients are None: nothing to reconstruct")
    return _idwt_axis(lo, hi, w, mode, axes[1])


def dwt2(
    x: Any, wavelet: str | Wavelet = "db4", mode: str = "symmetric", axes: tuple[int, int] = (-2, -1)
) -> tuple[Any, tuple[Any, Any, Any]]:
    """One level of the 2-D DWT: (cA, (cH, cV, cD)), like pywt.dwt2."""
    w, mode = filter_bank(wavelet), _check_mode(mode)
    t, as_numpy = _signal(x, min_dim=2)
    cA, (cH, cV, cD) = _dwt2(t, w, mode, _axes(t, axes))
    return same_kind(cA, as_numpy), (same_kind(cH, as_numpy), same_kind(cV, as_numpy), same_kind(cD, as_numpy))


def idwt2(
    coeffs: tuple[Any, tuple[Any, Any, Any]],
    wavelet: str | Wavelet = "db4",
    mode: str = "symmetric",
    axes: tuple[int, int] = (-2, -1),
) -> Any:
    """Inverse of dwt2, like pywt.idwt2 (any coefficient may be None: zeros)."""
    w, mode = filter_bank(wavelet), _check_mode(mode)
    cA, details = coeffs
    if len(details) != 3:
        raise ValueError("coeffs must be (cA, (cH, cV, cD))")
    like, as_numpy = _template(next((c for c in (cA, *details) if c is not None), None))
    a = _coef(cA, like)
    ds = [_coef(c, like) for c in details]
    return same_kind(_idwt2(a, ds, w, mode, _axes(like, axes)), as_numpy)


def wavedec2(
    x: Any,
    wavelet: str | Wavelet = "db4",
    mode: str = "symmetric",
    level: int | None = None,
    axes: tuple[int, int] = (-2, -1),
) -> list[Any]:
    """Multilevel 2-D DWT: [cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, cV_1, cD_1)], like pywt.wavedec2."""
    w, mode = filter_bank(wavelet), _check_mode(mode)
    t, as_numpy = _signal(x, min_dim=2)
    ax = _axes(t, axes)
    n_level = _resolve_level(level, min(t.shape[ax[0]], t.shape[ax[1]]), w)
    out: list[Any] = []
    a = t
    for _ in range(n_level):
        a, details = _dwt2(a, w, mode, ax)
        out.append(tuple(same_kind(c, as_numpy) for c in details))
    return [same_kind(a, as_numpy), *out[::-1]]


def waverec2(
    coeffs: Sequence[Any], wavelet: str | Wavelet = "db4", mode: str = "symmetric", axes: tuple[int, int] = (-2, -1)
) -> Any:
    """Inverse of wavedec2, like pywt.waverec2."""
    w, mode = filter_bank(wavelet), _check_mode(mode)
    if len(coeffs) == 0:
        raise ValueError("coeffs is empty: pass the list wavedec2 returned")
    like, as_numpy = _template(next((c for level in coeffs[1:] for c in level if c is not None), coeffs[0]))
    ax = _axes(like, axes)
    a = _coef(coeffs[0], like)
    for details in coeffs[1:]:
        if len(details) != 3:
            raise ValueError("each detail level must be a tuple (cH, cV, cD)")
        ds = [_coef(c, like) for c in details]
        ref = next((c for c in ds if c is not None), None)
        if a is None and ref is None:  # zeros in, zeros out
            continue
        if a is not None and ref is not None:
            for axis in ax:  # a non-periodized level can return one extra sample per axis
                if a.shape[axis] == ref.shape[axis] + 1:
                    a = a.narrow(axis, 0, ref.shape[axis])
            if tuple(a.shape) != tuple(ref.shape):
                raise ValueError(f"coefficient shapes do not match: {tuple(a.shape)} and {tuple(ref.shape)}")
        a = _idwt2(a, ds, w, mode, ax)
    if a is None:
        raise ValueError("all coefficients are None: nothing to reconstruct")
    return same_kind(a, as_numpy)


# --------------------------------------------------------------------------------------- layers (nn.Module)


class WaveletDecomposition(nn.Module):
    """wavedec as a differentiable layer: (..., T) -> [cA_L, cD_L, ..., cD_1] along the last axis.

    The level is fixed when the layer is built (`level` None: the deepest for `length` samples, which
    must then be given). Gradients flow to the input, so the layer can sit inside a trained model.
    """

    def __init__(
        self, wavelet: str = "db4", level: int | None = None, mode: str = "symmetric", length: int | None = None
    ) -> None:
        super().__init__()
        self.wavelet, self.mode = filter_bank(wavelet), _check_mode(mode)
        if level is None:
            if length is None:
                raise ValueError("give level, or length (signal samples) to use the deepest level")
            level = dwt_max_level(length, self.wavelet.filter_len)
        elif length is not None:
            level = _resolve_level(level, length, self.wavelet)
        if level < 0:
            raise ValueError(f"level={level} must be >= 0")
        self.level = int(level)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        rows, lead = _rows(x, -1)
        _resolve_level(self.level, rows.shape[1], self.wavelet)
        return [_unrows(c, lead, -1) for c in _wavedec_rows(rows, self.wavelet, self.mode, self.level)]

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet.name!r}, level={self.level}, mode={self.mode!r}"


class WaveletReconstruction(nn.Module):
    """waverec as a differentiable layer: [cA_L, cD_L, ..., cD_1] -> (..., T)."""

    def __init__(self, wavelet: str = "db4", mode: str = "symmetric") -> None:
        super().__init__()
        self.wavelet, self.mode = filter_bank(wavelet), _check_mode(mode)

    def forward(self, coeffs: Sequence[torch.Tensor]) -> torch.Tensor:
        rows = [_rows(c, -1) for c in coeffs]
        out = _waverec_rows([r for r, _ in rows], self.wavelet, self.mode)
        return _unrows(out, rows[0][1], -1)

    def extra_repr(self) -> str:
        return f"wavelet={self.wavelet.name!r}, mode={self.mode!r}"


# ------------------------------------------------------------------------------- WaveletFeatures estimator

STATISTICS = ("energy", "relative_energy", "mean_abs", "std", "max_abs", "entropy")


def _band_statistics(c: torch.Tensor, total: torch.Tensor, names: Sequence[str], log_energy: bool) -> torch.Tensor:
    """Statistics of one band c (..., n) -> (..., len(names)); total (...,) is the energy of all bands."""
    tiny = torch.finfo(c.dtype).tiny
    energy = (c * c).sum(-1)
    out = []
    for name in names:
        if name == "energy":
            out.append(torch.log(energy + tiny) if log_energy else energy)
        elif name == "relative_energy":
            out.append(energy / total.clamp(min=tiny))
        elif name == "mean_abs":
            out.append(c.abs().mean(-1))
        elif name == "std":
            out.append(c.std(-1, unbiased=False))
        elif name == "max_abs":
            out.append(c.abs().amax(-1))
        else:  # entropy of the band's energy distribution over time: -sum p log p, p = c^2 / energy
            p = (c * c) / energy.clamp(min=tiny)[..., None]
            out.append(-(p * torch.log(p.clamp(min=tiny))).sum(-1))
    return torch.stack(out, dim=-1)


class WaveletFeatureModule(nn.Module):
    """Per-band statistics of a multilevel DWT as a differentiable layer: (..., T) -> (..., features)."""

    def __init__(
        self,
        wavelet: str = "db4",
        level: int = 4,
        mode: str = "symmetric",
        statistics: Sequence[str] = ("energy", "relative_energy", "mean_abs", "std"),
        log_energy: bool = False,
    ) -> None:
        super().__init__()
        self.decompose = WaveletDecomposition(wavelet, level, mode)
        self.statistics, self.log_energy = tuple(statistics), log_energy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bands = self.decompose(x)
        energies = [(c * c).sum(-1) for c in bands]
        total = torch.stack(energies, -1).sum(-1)
        feats = [_band_statistics(c, total, self.statistics, self.log_energy) for c in bands]
        return torch.cat(feats, dim=-1)  # (..., bands * statistics), band-major


class WaveletFeatures(Estimator):
    """Signals (n_samples, T) -> per-band statistics of their multilevel DWT (n_samples, bands * stats).

    Bands are cA_L, cD_L, ..., cD_1 (coarse to fine, as wavedec returns them), each summarised by
    `statistics`, any of: energy (sum of squares; natural log of it when log_energy), relative_energy
    (share of the signal's total coefficient energy), mean_abs, std (population), max_abs, entropy
    (Shannon entropy, in nats, of the band's energy spread over time: low for a burst, high for noise).
    Features come band-major; `get_feature_names_out()` names them ("cD3_energy", ...).

    `fit` learns only the signal length and the level (level None: the deepest for that length); it
    exists so the estimator fits the scikit-learn contract and Pipelines. Learned: level_,
    n_features_in_, n_features_out_.
    """

    level_: int
    n_features_in_: int
    n_features_out_: int

    def __init__(
        self,
        wavelet: str = "db4",
        level: int | None = None,
        mode: str = "symmetric",
        statistics: Sequence[str] = ("energy", "relative_energy", "mean_abs", "std"),
        log_energy: bool = False,
    ) -> None:
        self.wavelet = wavelet
        self.level = level
        self.mode = mode
        self.statistics = statistics
        self.log_energy = log_energy

    def _check_params(self) -> Wavelet:
        w = filter_bank(self.wavelet)
        _check_mode(self.mode)
        if isinstance(self.statistics, str) or not self.statistics:
            raise ValueError(f"statistics={self.statistics!r} must be a non-empty list of: {', '.join(STATISTICS)}")
        bad = [s for s in self.statistics if s not in STATISTICS]
        if bad:
            raise ValueError(f"unknown statistics {bad}: expected any of {', '.join(STATISTICS)}")
        return w

    def _restore_private(self) -> None:
        pass

    def fit(self, X: Any, y: Any = None) -> WaveletFeatures:
        w = self._check_params()
        t, _ = to_tensor(X)
        self.level_ = _resolve_level(self.level, t.shape[1], w)
        self.n_features_in_ = int(t.shape[1])
        self.n_features_out_ = (self.level_ + 1) * len(self.statistics)
        return self

    def transform(self, X: Any) -> Any:
        self._check_fitted("level_")
        t, as_numpy = to_tensor(X)
        if t.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {t.shape[1]} samples per signal, but WaveletFeatures was fitted with {self.n_features_in_}"
            )
        with torch.no_grad() if as_numpy else contextlib.nullcontext():
            out = self.to_module()(t)
        return same_kind(out, as_numpy)

    def fit_transform(self, X: Any, y: Any = None) -> Any:
        return self.fit(X).transform(X)

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        self._check_fitted("level_")
        bands = [f"cA{self.level_}"] + [f"cD{j}" for j in range(self.level_, 0, -1)]
        return np.array([f"{b}_{s}" for b in bands for s in self.statistics], dtype=object)

    def to_module(self) -> WaveletFeatureModule:
        """The fitted feature extractor as a differentiable nn.Module (no parameters)."""
        self._check_fitted("level_")
        return WaveletFeatureModule(self.wavelet, self.level_, self.mode, self.statistics, self.log_energy)
