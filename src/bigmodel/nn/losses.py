"""Classification losses with label smoothing, for class labels (B, C) and next-token targets (B, T, V).

Label smoothing (Szegedy et al. 2016) trains against the target distribution
`(1 - eps) * one_hot(y) + eps / C` instead of the one-hot label: the model is asked to keep a little
probability on every class, which stops logits from growing without bound and usually makes confidences
better calibrated. The loss per row is therefore

    (1 - eps) * (-log p[y]) + eps * mean_c(-log p[c])

which is what `torch.nn.functional.cross_entropy(..., label_smoothing=eps)` computes (tests compare the
two). Rows whose target is `ignore_index` (padding) contribute nothing and are not counted in the mean.
Smoothing is a training device: evaluation always reports the plain (unsmoothed) cross-entropy, which is
what `bigmodel.evaluation.evaluate` computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def classification_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of logits (B, C) against targets (B,), or (B, T, V) against (B, T), in fp32.

    `reduction`: "mean" over the rows that are not ignored (NaN when every row is, as torch does),
    "sum", or "none" (a loss per row, shaped like `targets`, 0 where ignored).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction={reduction!r} must be mean, sum or none")
    if logits.dim() < 2 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} do not match: expected logits "
            "(B, C) with targets (B,), or (B, T, V) with targets (B, T)"
        )
    flat_logits, flat_targets = logits.float().flatten(0, -2), targets.reshape(-1)  # (N, C), (N,)
    if label_smoothing == 0.0:  # the common case: torch's fused kernel, bit-identical to plain cross-entropy
        loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=ignore_index, reduction=reduction)
        return loss.view(targets.shape) if reduction == "none" else loss
    keep = flat_targets != ignore_index  # (N,)
    logp = flat_logits.log_softmax(-1)  # (N, C)
    nll = -logp.gather(-1, flat_targets.masked_fill(~keep, 0)[:, None]).squeeze(-1)  # (N,)
    uniform = -logp.mean(-1)  # (N,): cross-entropy against the uniform distribution over the classes
    per_row = ((1.0 - label_smoothing) * nll + label_smoothing * uniform) * keep  # (N,), 0 where ignored
    if reduction == "none":
        return per_row.view(targets.shape)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / keep.sum()
