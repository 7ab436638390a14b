"""Feature extraction written in torch: decompositions as scikit-learn-style estimators, Fourier features."""

from bigmodel.features.base import NotFittedError
from bigmodel.features.decompose import PCA, IncrementalPCA, TruncatedSVD
from bigmodel.features.spectral import STFT, band_energies, spectrogram, spectrum

__all__ = [
    "PCA",
    "STFT",
    "IncrementalPCA",
    "NotFittedError",
    "TruncatedSVD",
    "band_energies",
    "spectrogram",
    "spectrum",
]
