"""`multi-input`: several inputs of one kind, one shared feature extractor, merged features, a head.

(B, n, m) inputs (or (B, n*m) rows split into n) -> the same extractor on each input (m -> h -> d) ->
merge (concat | sum | attention pooling) -> head -> class logits. With `shared = false` every input gets
its own extractor, which shows what sharing saves: the extractor's parameters are divided by n, and each
example trains the one extractor n times.
"""

from __future__ import annotations

import torch
from torch import nn

from bigmodel.config import MultiInputConfig
from bigmodel.models.mlp import ACTIVATION, Classifier, Standardize
from bigmodel.nn.connections import SharedExtractor


class MultiInput(Classifier):
    config_class = MultiInputConfig

    def __init__(self, config: MultiInputConfig) -> None:
        super().__init__(config)
        if config.n_inputs is None or config.in_features is None or config.n_classes is None:
            raise ValueError("MultiInputConfig.n_inputs, in_features and n_classes are None: set them from the data")
        n, m, d = config.n_inputs, config.in_features, config.features
        act = ACTIVATION[config.activation]

        def extractor() -> nn.Module:
            return nn.Sequential(
                nn.Linear(m, config.extractor_hidden), act(), nn.Linear(config.extractor_hidden, d), act()
            )

        self.scale = Standardize((n, m), config.standardize)
        if config.shared:
            self.extract = SharedExtractor(extractor(), d, config.merge, n_inputs=n)
        else:
            kinds = [f"input{i}" for i in range(n)]
            self.extract = SharedExtractor({kind: extractor() for kind in kinds}, d, config.merge, kinds=kinds)
        width = self.extract.out_features
        if config.hidden:
            self.head: nn.Module = nn.Sequential(
                nn.Dropout(config.dropout),
                nn.Linear(width, config.hidden),
                act(),
                nn.Dropout(config.dropout),
                nn.Linear(config.hidden, config.n_classes),
            )
        else:
            self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(width, config.n_classes))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        c = self.config
        assert c.n_inputs is not None and c.in_features is not None
        x = features.reshape(features.shape[0], c.n_inputs, c.in_features)  # (B, n, m); 2-D rows are split
        return self.head(self.extract(self.scale(x)))  # (B, n, m) -> (B, n*d | d) -> (B, classes)
