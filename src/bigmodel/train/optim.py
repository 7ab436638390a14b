"""AdamW with weight decay on matrices only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from bigmodel.config import TrainConfig
from bigmodel.nn.regularizers import parameter_kinds

DECAY_KINDS = ("matrix", "embedding")  # as nn.regularizers.parameter_kinds names them


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Decay weight matrices and embeddings; never biases or normalisation gains (see train.weight_decay)."""
    kinds = [(kind, p) for kind, _, p in parameter_kinds(model).values() if p.requires_grad]  # tied weights once
    decay = [p for kind, p in kinds if kind in DECAY_KINDS]
    no_decay = [p for kind, p in kinds if kind not in DECAY_KINDS]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)


def lr_at(cfg: TrainConfig, step: int, time_fraction: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to lr * min_lr_ratio.

    Progress is the larger of the step fraction and, under a wall-clock budget, the time fraction, so a
    run stopped by `train.max_minutes` still ends its decay.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, max((step - cfg.warmup_steps) / span, time_fraction))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)
