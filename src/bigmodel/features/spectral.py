"""Fourier features in torch: real-FFT spectra, STFT spectrograms, band energies; batched and differentiable.

Every function takes signals with time on the last axis, (..., T), as a numpy array or a tensor, and
returns the same kind. Results equal numpy.fft / scipy.signal (see tests): `spectrum` matches
`np.abs(np.fft.rfft(x))` and friends, `spectrogram` matches `scipy.signal.spectrogram(..., detrend=False)`
for scaling "spectrum" and "psd". `STFT` is the same computation as an nn.Module for use inside a model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

KINDS = ("magnitude", "power", "phase", "complex")
SCALINGS = ("spectrum", "psd", "none")


def _signal(x: Any) -> tuple[torch.Tensor, bool]:
    as_numpy = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.asarray(x)) if as_numpy else x
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(f"signals must have time on the last axis, shape (..., T) with T >= 1; got {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double() if as_numpy else t.float()
    if not bool(torch.isfinite(t).all()):
        raise ValueError("the signal contains NaN or infinite values")
    return t, as_numpy


def _out(t: torch.Tensor, as_numpy: bool) -> Any:
    return t.detach().cpu().numpy() if as_numpy else t


def _kind(z: torch.Tensor, kind: str, log: bool, eps: float) -> torch.Tensor:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is invalid: expected {' | '.join(KINDS)}")
    if kind == "complex":
        return z
    if kind == "phase":
        return torch.angle(z)
    v = z.abs() if kind == "magnitude" else z.real**2 + z.imag**2
    return torch.log(v + eps) if log else v


def spectrum(x: Any, kind: str = "magnitude", *, n: int | None = None, log: bool = False, eps: float = 1e-10) -> Any:
    """Real-FFT spectrum of each signal: (..., T) -> (..., n // 2 + 1). kind: magnitude | power | phase | complex."""
    t, as_numpy = _signal(x)
    return _out(_kind(torch.fft.rfft(t, n=n, dim=-1), kind, log, eps), as_numpy)


def rfft_frequencies(n: int, fs: float = 1.0) -> np.ndarray:
    return np.fft.rfftfreq(n, d=1.0 / fs)


class STFT(nn.Module):
    """Short-time Fourier transform: (..., T) -> (..., n_fft // 2 + 1, frames), differentiable.

    Frames start at 0, hop, 2*hop, ... and must fit in the signal (no padding), with a periodic Hann
    window by default, as scipy.signal.spectrogram does. scaling: "spectrum" divides by the window's sum
    (amplitudes), "psd" gives a one-sided power spectral density (needs fs), "none" leaves raw sums.
    """

    window: torch.Tensor

    def __init__(
        self,
        n_fft: int = 256,
        hop: int | None = None,
        *,
        window: str = "hann",
        kind: str = "magnitude",
        scaling: str = "spectrum",
        fs: float = 1.0,
        log: bool = False,
        eps: float = 1e-10,
    ) -> None:
        super().__init__()
        if n_fft < 1 or (hop is not None and hop < 1):
            raise ValueError(f"n_fft={n_fft} and hop={hop} must be >= 1")
        if window not in ("hann", "hamming", "boxcar"):
            raise ValueError(f"window={window!r} is invalid: expected hann | hamming | boxcar")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling={scaling!r} is invalid: expected {' | '.join(SCALINGS)}")
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is invalid: expected {' | '.join(KINDS)}")
        self.n_fft, self.hop = n_fft, hop or n_fft // 8 or 1  # scipy's default overlap is n_fft // 8
        self.kind, self.scaling, self.fs, self.log, self.eps = kind, scaling, fs, log, eps
        if window == "hann":
            w = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
        elif window == "hamming":
            w = torch.hamming_window(n_fft, periodic=True, dtype=torch.float64)
        else:
            w = torch.ones(n_fft, dtype=torch.float64)
        self.register_buffer("window", w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[-1]
        if T < self.n_fft:
            raise ValueError(f"signals of {T} samples are shorter than n_fft={self.n_fft}")
        w = self.window.to(x.dtype)
        frames = x.unfold(-1, self.n_fft, self.hop) * w  # (..., frames, n_fft)
        z = torch.fft.rfft(frames, dim=-1).transpose(-1, -2)  # (..., freqs, frames)
        if self.scaling == "spectrum":
            z = z / w.sum()
        elif self.scaling == "psd":
            z = z / torch.sqrt(self.fs * (w**2).sum())
        if self.kind == "power" and self.scaling == "psd":  # one-sided density: double all but DC (and Nyquist)
            p = z.real**2 + z.imag**2
            last = p.shape[-2] - (1 if self.n_fft % 2 == 0 else 0)
            p[..., 1:last, :] *= 2
            return torch.log(p + self.eps) if self.log else p
        return _kind(z, self.kind, self.log, self.eps)


def spectrogram(x: Any, n_fft: int = 256, hop: int | None = None, **kwargs: Any) -> Any:
    """STFT of each signal as numpy-or-tensor in, same kind out (see STFT for the options)."""
    t, as_numpy = _signal(x)
    return _out(STFT(n_fft, hop, **kwargs).to(t.device)(t), as_numpy)


def band_energies(x: Any, fs: float, bands: list[tuple[float, float]], *, log: bool = False, eps: float = 1e-10) -> Any:
    """Energy of each signal in each frequency band [lo, hi): the sum of |rfft|^2 over the band's bins.

    (..., T) -> (..., len(bands)).
    """
    if not bands:
        raise ValueError("bands is empty: give at least one (low, high) frequency pair")
    t, as_numpy = _signal(x)
    freqs = torch.from_numpy(rfft_frequencies(t.shape[-1], fs)).to(t.device, t.dtype)
    for lo, hi in bands:
        if not 0 <= lo < hi:
            raise ValueError(f"band ({lo}, {hi}) is invalid: expected 0 <= low < high")
    power = torch.fft.rfft(t, dim=-1).abs() ** 2  # (..., F)
    masks = torch.stack([(freqs >= lo) & (freqs < hi) for lo, hi in bands], dim=-1).to(t.dtype)  # (F, bands)
    e = power @ masks
    return _out(torch.log(e + eps) if log else e, as_numpy)
