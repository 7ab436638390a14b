"""Task metrics: accuracy, exact match, corpus BLEU, character error rate, autoencoder sparsity.

Plain functions over predictions and references, shared by the tasks' `evaluate`, `bigmodel eval` and
benchmarks/zoo.py, so that every figure is computed one way.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predicted class ids equal to the labels."""
    if predictions.shape != labels.shape or labels.numel() == 0:
        raise ValueError(f"accuracy: {tuple(predictions.shape)} predictions for {tuple(labels.shape)} labels")
    return float((predictions == labels).float().mean())


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of outputs identical to their reference (after stripping surrounding whitespace)."""
    _check_pairs(hypotheses, references)
    return sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True)) / len(references)


def edit_distance(a: Sequence[object], b: Sequence[object]) -> int:
    """Levenshtein distance: the fewest insertions, deletions and substitutions turning a into b."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def character_error_rate(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus CER: total character edit distance / total reference characters (0 = perfect; may exceed 1)."""
    _check_pairs(hypotheses, references)
    edits = sum(edit_distance(h, r) for h, r in zip(hypotheses, references, strict=True))
    return edits / max(1, sum(len(r) for r in references))


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypotheses: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al. 2002) in [0, 100], one reference per hypothesis, whitespace tokens.

    Clipped n-gram counts (n = 1..max_n) are summed over the corpus, the precisions combined by their
    geometric mean, times the brevity penalty exp(1 - r/c) when the output is shorter than the references
    (r, c: total reference and output lengths). Unsmoothed: 0 when some order has no match, as in
    sacrebleu with smooth_method="none".
    """
    _check_pairs(hypotheses, references)
    matches, totals = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        h, r = hyp.split(), ref.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, max_n + 1):
            hn, rn = _ngrams(h, n), _ngrams(r, n)
            matches[n - 1] += sum(min(count, rn[gram]) for gram, count in hn.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if hyp_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals, strict=True)) / max_n
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100.0 * brevity * math.exp(log_precision)


def activation_sparsity(codes: torch.Tensor, threshold: float = 1e-2) -> float:
    """Fraction of code activations whose magnitude is below `threshold` (1.0 = all silent)."""
    return float((codes.abs() < threshold).float().mean())


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"{len(hypotheses)} outputs for {len(references)} references: need equal, non-zero counts")
