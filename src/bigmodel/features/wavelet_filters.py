"""Orthogonal wavelet filter banks, computed rather than typed in: Daubechies, symlets, coiflets.

Every family here is an orthonormal two-channel filter bank: a low-pass `rec_lo` of even length F with
sum sqrt(2) and unit norm, orthogonal to its own even shifts. The other three filters follow from it in
PyWavelets' conventions: dec_lo = reversed rec_lo, dec_hi[k] = (-1)^(k+1) rec_lo[k], rec_hi = reversed
dec_hi. The design runs once per name in float64 numpy and is cached.

- dbN (Daubechies, N vanishing moments, F = 2N): H(z) = sqrt(2) ((1 + z) / 2)^N Q(z), where |Q|^2 is
  Daubechies' maxflat polynomial P(y) = sum_k C(N-1+k, k) y^k with y = sin^2(w/2). Each root y of P gives
  a reciprocal pair of zeros z, 1/z of Q(z)Q(1/z); dbN keeps the zero inside the unit circle from every
  pair (extremal phase). haar is db1.
- symN (least asymmetric, F = 2N): the same pairs, but of all 2^groups ways to pick one zero per real
  pair or per complex-conjugate quadruplet, the one whose phase response is closest to linear (smallest
  L2 norm of the phase minus its linear part over a full turn), as in Daubechies' "Ten Lectures" and
  MATLAB's symaux. A filter and its time reversal are equally asymmetric; the standard tables take the
  zeros nearest z = -1 inside the unit circle for sym2 and odd N, outside for even N >= 4, and so do we.
- coifN (coiflets, F = 6N): 2N vanishing moments for the wavelet and 2N - 1 for the scaling function
  (about index 2N), plus orthonormality. These quadratic equations are solved by Gauss-Newton from the
  Deslauriers-Dubuc interpolating filter, which the coiflet approximates; it converges to the tabulated
  coiflets in a handful of steps.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache
from math import comb

import numpy as np

DAUBECHIES = range(1, 9)
SYMLETS = range(2, 9)
COIFLETS = range(1, 6)
WAVELETS = (
    ("haar",)
    + tuple(f"db{n}" for n in DAUBECHIES)
    + tuple(f"sym{n}" for n in SYMLETS)
    + tuple(f"coif{n}" for n in COIFLETS)
)
FAMILIES_TEXT = "haar, db1-db8, sym2-sym8, coif1-coif5"


@dataclass(frozen=True, eq=False)
class Wavelet:
    """An orthogonal wavelet's four filters (float64, PyWavelets' conventions)."""

    name: str
    dec_lo: np.ndarray
    dec_hi: np.ndarray
    rec_lo: np.ndarray
    rec_hi: np.ndarray

    @property
    def filter_len(self) -> int:
        return len(self.rec_lo)

    def __repr__(self) -> str:
        return f"Wavelet({self.name!r}, filter_len={self.filter_len})"


def filter_bank(name: str | Wavelet) -> Wavelet:
    """The filter bank of a wavelet by name (haar, dbN, symN, coifN), designed once and cached."""
    if isinstance(name, Wavelet):
        return name
    if not isinstance(name, str) or name not in WAVELETS:
        raise ValueError(f"unknown wavelet {name!r}: expected one of {FAMILIES_TEXT}")
    return _design(name)


@cache
def _design(name: str) -> Wavelet:
    if name == "haar":
        rec_lo = _daubechies(1)
    elif name.startswith("db"):
        rec_lo = _daubechies(int(name[2:]))
    elif name.startswith("sym"):
        rec_lo = _symlet(int(name[3:]))
    else:
        rec_lo = _coiflet(int(name[4:]))
    dec_hi = (-1.0) ** (np.arange(len(rec_lo)) + 1) * rec_lo
    filters = [rec_lo[::-1].copy(), dec_hi, rec_lo, dec_hi[::-1].copy()]
    for f in filters:
        f.flags.writeable = False  # shared by the cache
    return Wavelet(name, *filters)


def _from_zeros(n_vanishing: int, zeros: list[complex]) -> np.ndarray:
    """Real filter with N zeros at z = -1 and the given zeros, normalised to sum sqrt(2)."""
    h = np.real(np.poly(np.concatenate([np.asarray(zeros, dtype=complex), -np.ones(n_vanishing)])))
    return h * (np.sqrt(2.0) / h.sum())


def _zero_groups(N: int) -> list[list[complex]]:
    """Q(z)'s zeros inside the unit circle, one group per real zero or complex-conjugate pair, by angle.

    A root y of P(y) is a zero of (2 - z - 1/z) / 4 - y, i.e. z^2 - (2 - 4y) z + 1 = 0: a pair z, 1/z.
    """
    if N == 1:
        return []
    ys = np.roots([comb(N - 1 + k, k) for k in range(N)][::-1])  # highest power first
    groups = []
    for y in ys:
        if y.imag < -1e-12:  # its conjugate stands for both
            continue
        pair = np.roots([1.0, -(2.0 - 4.0 * y), 1.0])
        z = pair[np.argmin(np.abs(pair))]
        groups.append([complex(z), complex(np.conj(z))] if abs(y.imag) > 1e-12 else [complex(z.real)])
    groups.sort(key=lambda g: abs(np.angle(g[0])))
    return groups


def _daubechies(N: int) -> np.ndarray:
    return _from_zeros(N, [z for g in _zero_groups(N) for z in g])


def _nonlinear_phase_norm(zeros: list[complex], n_freq: int = 1024) -> float:
    """L2 norm of the phase of prod(e^{-iw} - z) minus its linear part, w over [0, 2 pi]."""
    w = np.linspace(0.0, 2.0 * np.pi, n_freq)
    u = np.exp(-1j * w)
    phase = np.zeros_like(w)
    for z in zeros:  # per-factor phases are continuous: no factor vanishes on the unit circle
        p = np.unwrap(np.angle(u - z))
        phase += p - p[0]
    nonlinear = phase - phase[-1] * w / (2.0 * np.pi)
    return float(np.sum(nonlinear**2))


def _symlet(N: int) -> np.ndarray:
    groups = _zero_groups(N)
    best: tuple[float, list[complex]] | None = None
    for flips in itertools.product((False, True), repeat=len(groups) - 1):  # the last group fixes orientation
        inside_last = N == 2 or N % 2 == 1
        choice = (*flips, not inside_last)
        zeros = [1 / z if flip else z for g, flip in zip(groups, choice, strict=True) for z in g]
        cost = _nonlinear_phase_norm(zeros)
        if best is None or cost < best[0] - 1e-9:
            best = (cost, zeros)
    assert best is not None
    return _from_zeros(N, best[1])


def _coiflet_equations(h: np.ndarray, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Residuals and Jacobian of the coiflet conditions (moments scaled by the centre to stay O(1))."""
    F, c = len(h), 2 * N
    k = (np.arange(F) - c) / c
    alt = (-1.0) ** np.arange(F)
    rows, res = [np.ones(F)], [h.sum() - np.sqrt(2.0)]
    for m in range(F // 2):  # orthonormality: sum_k h[k] h[k + 2m] = delta(m)
        g = np.zeros(F)
        g[: F - 2 * m] += h[2 * m :]
        g[2 * m :] += h[: F - 2 * m]
        rows.append(g)
        res.append(h[: F - 2 * m] @ h[2 * m :] - (1.0 if m == 0 else 0.0))
    for power in range(2 * N):  # wavelet moments: sum_k (-1)^k k^p h[k] = 0
        rows.append(alt * k**power)
        res.append(rows[-1] @ h)
    for power in range(1, 2 * N):  # scaling-function moments about the centre
        rows.append(k**power)
        res.append(rows[-1] @ h)
    return np.array(res), np.array(rows)


def _coiflet(N: int) -> np.ndarray:
    F, c = 6 * N, 2 * N
    h = np.zeros(F)
    h[c] = 1.0 / np.sqrt(2.0)
    nodes = np.arange(-(2 * N - 1), 2 * N, 2).astype(float)  # Deslauriers-Dubuc: midpoint Lagrange weights
    for j, x in enumerate(nodes):
        others = np.delete(nodes, j)
        h[c + int(x)] = np.prod(-others / (x - others)) / np.sqrt(2.0)
    for _ in range(50):
        res, jac = _coiflet_equations(h, N)
        if np.abs(res).max() < 1e-15:
            break
        step, *_ = np.linalg.lstsq(jac, -res, rcond=None)
        h = h + step
    res, _ = _coiflet_equations(h, N)
    if np.abs(res).max() > 1e-12:  # internal invariant: the design must converge
        raise RuntimeError(f"coif{N} design did not converge (residual {np.abs(res).max():.1e})")
    return h
