"""Feature extraction written in torch: decompositions as scikit-learn-style estimators, Fourier and wavelet
features."""

from bigmodel.features.base import NotFittedError
from bigmodel.features.decompose import PCA, IncrementalPCA, TruncatedSVD
from bigmodel.features.spectral import STFT, band_energies, spectrogram, spectrum
from bigmodel.features.wavelet import (
    WaveletDecomposition,
    WaveletFeatures,
    WaveletReconstruction,
    dwt,
    dwt2,
    dwt_max_level,
    filter_bank,
    idwt,
    idwt2,
    wavedec,
    wavedec2,
    waverec,
    waverec2,
)

__all__ = [
    "PCA",
    "STFT",
    "IncrementalPCA",
    "NotFittedError",
    "TruncatedSVD",
    "WaveletDecomposition",
    "WaveletFeatures",
    "WaveletReconstruction",
    "band_energies",
    "dwt",
    "dwt2",
    "dwt_max_level",
    "filter_bank",
    "idwt",
    "idwt2",
    "spectrogram",
    "spectrum",
    "wavedec",
    "wavedec2",
    "waverec",
    "waverec2",
]
