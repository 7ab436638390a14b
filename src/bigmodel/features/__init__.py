"""Feature extraction written in torch, as scikit-learn-style estimators (decompositions so far)."""

from bigmodel.features.base import NotFittedError
from bigmodel.features.decompose import PCA, IncrementalPCA, TruncatedSVD

__all__ = ["PCA", "IncrementalPCA", "NotFittedError", "TruncatedSVD"]
