"""`mlp`: a classifier of feature vectors whose hidden layers use one connection pattern.

standardise -> n_hidden x [connection(m -> k), activation, dropout] -> dense head (k -> classes).
The hidden layers use the pattern named by `model.connection` (nn/connections.py), so the patterns can
be compared on one task with everything else equal (benchmarks/zoo.py does). `Standardize` and
`Classifier` are shared with models/multi_input.py.
"""

from __future__ import annotations

import torch
from torch import nn

from bigmodel.config import MLPConfig
from bigmodel.models.directory import PretrainedModel
from bigmodel.nn.connections import connection
from bigmodel.nn.losses import classification_loss

ACTIVATION: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Standardize(nn.Module):
    """x -> (x - mean) / std with the training set's statistics, stored with the weights (buffers)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, shape: tuple[int, ...], enabled: bool = True) -> None:
        super().__init__()
        self.enabled = enabled
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        """Set the statistics from training samples x (N, *shape); constant features keep std 1."""
        if not self.enabled:
            return
        self.mean.copy_(x.mean(0))
        std = x.std(0)
        self.std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std if self.enabled else x

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.std + self.mean if self.enabled else x


class Classifier(PretrainedModel):
    """Shared by the feature classifiers: `forward(features, labels)` -> (logits, mean cross-entropy)."""

    task = "classify"
    scale: Standardize

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, features: torch.Tensor, labels: torch.Tensor | None = None, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.logits(features)  # (B, classes)
        loss = classification_loss(logits, labels, label_smoothing) if labels is not None else None
        return logits, loss

    @torch.no_grad()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Class ids (B,) of raw (unstandardised) features."""
        return self.logits(features).argmax(-1)


class MLP(Classifier):
    config_class = MLPConfig

    def __init__(self, config: MLPConfig) -> None:
        super().__init__(config)
        if config.in_features is None or config.n_classes is None:
            raise ValueError("MLPConfig.in_features and n_classes are None: set them from the data")
        m, k = config.in_features, config.hidden
        self.scale = Standardize((m,), config.standardize)
        layers: list[nn.Module] = []
        width = m
        for i in range(config.n_hidden):
            layers += [
                connection(
                    config.connection,
                    width,
                    k,
                    rank=config.rank,
                    groups=config.groups,
                    mix=config.mix,
                    density=config.density,
                    seed=i,
                ),
                ACTIVATION[config.activation](),
                nn.Dropout(config.dropout),
            ]
            width = k
        self.hidden = nn.Sequential(*layers)
        self.head = nn.Linear(width, config.n_classes)

    def blocks(self) -> list[nn.Module]:
        """The hidden connection layers (what FSDP shards one by one; the head stays with the root)."""
        return [layer for i, layer in enumerate(self.hidden) if i % 3 == 0]  # [connection, activation, dropout] x n

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.scale(features)))  # (B, m) -> (B, k) -> (B, classes)
