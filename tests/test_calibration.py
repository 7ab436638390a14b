"""Expected calibration error: a hand-computed case, edges of bins, and a plain-loop reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bigmodel.calibration import expected_calibration_error, reliability_bins


def test_hand_computed_case() -> None:
    # 5 bins of width 0.2. Confidences (top probabilities): 0.9, 0.9 (bin 4, one right: acc 0.5, conf 0.9),
    # 0.7 (bin 3, right: acc 1, conf 0.7), 0.5 (bin 2, wrong: acc 0, conf 0.5)
    probs = np.array([[0.9, 0.1], [0.1, 0.9], [0.3, 0.7], [0.5, 0.5]])
    labels = np.array([0, 0, 1, 1])  # the last row predicts class 0 (argmax takes the first of a tie)
    expected = 2 / 4 * abs(0.5 - 0.9) + 1 / 4 * abs(1 - 0.7) + 1 / 4 * abs(0 - 0.5)
    assert expected_calibration_error(probs, labels, n_bins=5) == pytest.approx(expected)  # 0.4
    bins = reliability_bins(probs, labels, n_bins=5)
    assert bins.counts.tolist() == [0, 0, 1, 1, 2]
    assert bins.accuracy.tolist() == pytest.approx([0, 0, 0, 1, 0.5])
    assert bins.confidence.tolist() == pytest.approx([0, 0, 0.5, 0.7, 0.9])


def test_bin_edges_belong_to_the_bin_below_and_binary_input() -> None:
    # 0.6 is the upper edge of bin (0.4, 0.6]; 1.0 is in the last bin
    bins = reliability_bins(np.array([0.6, 1.0]), np.array([1, 1]), n_bins=5)
    assert bins.counts.tolist() == [0, 0, 1, 0, 1]
    # (N,) = probability of class 1; perfectly calibrated-looking confident predictions
    assert expected_calibration_error(torch.tensor([1.0, 0.0]), torch.tensor([1, 0])) == 0.0


def test_equals_a_plain_loop_reference() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 6)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = rng.integers(0, 6, 500)
    conf, pred = probs.max(1), probs.argmax(1)
    ece = 0.0
    for m in range(15):
        lo, hi = m / 15, (m + 1) / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += inside.mean() * abs((pred[inside] == labels[inside]).mean() - conf[inside].mean())
    assert expected_calibration_error(probs, labels) == pytest.approx(ece, abs=1e-12)
    assert expected_calibration_error(torch.from_numpy(probs).float(), torch.from_numpy(labels)) == pytest.approx(
        ece, abs=1e-6
    )


def test_errors() -> None:
    with pytest.raises(ValueError, match="do not match"):
        expected_calibration_error(np.ones((3, 2)) / 2, np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="apply softmax"):
        expected_calibration_error(np.array([[2.0, -1.0]]), np.array([0]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 2\)"):
        expected_calibration_error(np.ones((1, 2)) / 2, np.array([2]))
    with pytest.raises(ValueError, match="n_bins=0"):
        expected_calibration_error(np.ones((1, 2)) / 2, np.array([0]), n_bins=0)
