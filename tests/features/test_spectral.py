"""Fourier features against numpy.fft and scipy.signal on an ECG-like signal (heartbeat, mains hum, noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

signal = pytest.importorskip("scipy.signal")

from bigmodel.features.spectral import STFT, band_energies, spectrogram, spectrum  # noqa: E402


@pytest.fixture(scope="module")
def ecg() -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(4096) / 360.0  # 360 Hz, like the MIT-BIH ECG
    x = np.sin(2 * np.pi * 1.2 * t) ** 15 + 0.1 * np.sin(2 * np.pi * 50 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([x, np.roll(x, 100)])  # (2, 4096)


def test_spectrum_equals_numpy(ecg: np.ndarray) -> None:
    z = np.fft.rfft(ecg, axis=-1)
    np.testing.assert_allclose(spectrum(ecg), np.abs(z), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(spectrum(ecg, "power"), np.abs(z) ** 2, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(spectrum(ecg, "phase")[:, 1:50], np.angle(z)[:, 1:50], atol=1e-9)
    np.testing.assert_allclose(spectrum(ecg, "power", log=True), np.log(np.abs(z) ** 2 + 1e-10), rtol=1e-10)
    out = spectrum(torch.from_numpy(ecg).float())
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32


@pytest.mark.parametrize("scaling, mode", [("spectrum", "magnitude"), ("density", "psd")])
def test_spectrogram_equals_scipy(ecg: np.ndarray, scaling: str, mode: str) -> None:
    kind = "magnitude" if mode == "magnitude" else "power"
    _, _, ref = signal.spectrogram(
        ecg, fs=360.0, window="hann", nperseg=256, noverlap=192, detrend=False, scaling=scaling, mode=mode
    )
    ours = spectrogram(ecg, 256, 64, kind=kind, scaling="psd" if scaling == "density" else scaling, fs=360.0)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-7, atol=1e-12)


def test_stft_module_is_differentiable() -> None:
    x = torch.randn(3, 1024, dtype=torch.float64, requires_grad=True)
    y = STFT(128, 32, kind="power")(x)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert torch.autograd.gradcheck(
        lambda s: STFT(16, 8, kind="magnitude")(s), (torch.randn(1, 64, dtype=torch.float64, requires_grad=True),)
    )


def test_band_energies(ecg: np.ndarray) -> None:
    bands = [(0.5, 5.0), (45.0, 55.0), (100.0, 180.0)]
    e = band_energies(ecg, 360.0, bands)
    p = np.abs(np.fft.rfft(ecg, axis=-1)) ** 2
    f = np.fft.rfftfreq(ecg.shape[-1], 1 / 360.0)
    for i, (lo, hi) in enumerate(bands):
        np.testing.assert_allclose(e[:, i], p[:, (f >= lo) & (f < hi)].sum(-1), rtol=1e-10)
    assert e[0, 1] > 3 * e[0, 2]  # the 50 Hz hum in a 10 Hz band outweighs 80 Hz of noise


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: spectrum(np.array([np.nan, 1.0])), "NaN"),
        (lambda: spectrum(np.zeros((2, 0))), "T >= 1"),
        (lambda: spectrum(np.ones(8), "loud"), "kind"),
        (lambda: spectrogram(np.ones(10), 64), "shorter than n_fft"),
        (lambda: band_energies(np.ones(8), 1.0, []), "bands is empty"),
        (lambda: band_energies(np.ones(8), 1.0, [(3.0, 1.0)]), "invalid"),
    ],
)
def test_bad_input(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
