"""Calibration of predicted probabilities: reliability bins and the expected calibration error (ECE).

A classifier is calibrated when, among the predictions it makes with confidence c, a fraction c is right.
The ECE (Naeini et al. 2015; Guo et al. 2017) measures the gap with equal-width confidence bins: each
prediction's confidence is its top probability, bin m holds the confidences in ((m-1)/M, m/M], and

    ECE = sum over bins of  (bin size / N) * |accuracy(bin) - mean confidence(bin)|

0 is perfect; a model that says 0.9 and is right 70% of the time contributes 0.2 from that bin.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass
class ReliabilityBins:
    """Per-bin counts, accuracies and mean confidences (empty bins hold 0), over n_bins equal-width bins."""

    edges: torch.Tensor  # (n_bins + 1,) from 0 to 1
    counts: torch.Tensor  # (n_bins,)
    accuracy: torch.Tensor  # (n_bins,)
    confidence: torch.Tensor  # (n_bins,)

    @property
    def ece(self) -> float:
        n = self.counts.sum()
        return float(((self.counts / n) * (self.accuracy - self.confidence).abs()).sum())


def _as_tensors(probs: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.as_tensor(np.asarray(probs) if not isinstance(probs, torch.Tensor) else probs).double()
    y = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    if p.dim() == 1:  # binary: the probability of class 1
        p = torch.stack([1 - p, p], dim=1)
    if p.dim() != 2 or y.dim() != 1 or p.shape[0] != y.shape[0] or p.shape[0] == 0:
        raise ValueError(
            f"probs {tuple(p.shape)} and labels {tuple(y.shape)} do not match: expected probs (N, C) or (N,) "
            "for a binary task, and labels (N,) with N >= 1"
        )
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise ValueError("labels must be class indices (integers), not probabilities")
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= p.shape[1]:
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]}), got [{int(y.min())}, {int(y.max())}]")
    if not bool(torch.isfinite(p).all()) or float(p.min()) < 0 or float(p.max()) > 1:
        raise ValueError("probs must be probabilities in [0, 1] (apply softmax to logits first)")
    return p, y


def reliability_bins(probs: Any, labels: Any, n_bins: int = 15) -> ReliabilityBins:
    """Bin predictions by confidence (top probability) into n_bins equal-width bins ((m-1)/M, m/M]."""
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins} must be >= 1")
    p, y = _as_tensors(probs, labels)
    confidence, predicted = p.max(dim=1)  # (N,), (N,)
    correct = (predicted == y).double()  # (N,)
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin m (0-based) holds (edges[m], edges[m+1]]: a confidence on an edge belongs to the bin below it
    # (and 0, impossible for a top probability unless all are 0, to the first bin)
    index = torch.bucketize(confidence, edges[1:-1], right=False)  # (N,)
    counts = torch.bincount(index, minlength=n_bins).double()
    hits = torch.bincount(index, weights=correct, minlength=n_bins)
    conf_sum = torch.bincount(index, weights=confidence, minlength=n_bins)
    safe = counts.clamp(min=1)
    return ReliabilityBins(
        edges=edges,
        counts=counts,
        accuracy=hits / safe,
        confidence=conf_sum / safe,
    )


def expected_calibration_error(probs: Any, labels: Any, n_bins: int = 15) -> float:
    """ECE of probabilities (N, C) (or (N,) for P(class 1) of a binary task) against labels (N,).

    Takes numpy arrays or tensors; returns a float in [0, 1].
    """
    return reliability_bins(probs, labels, n_bins).ece
