"""Autoencoding (`--task autoencode`): the sparse `autoencoder` on feature arrays (labels are not used).

Data as for classify's feature models (data/arrays.py). Loss: reconstruction MSE (standardised features)
+ the sparsity penalty. Metrics: `reconstruction_error` (the MSE alone, the headline), `sparsity` (fraction
of code activations below 0.01), `mean_activation` and `active_units` (code units above 0.01 per input).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from bigmodel.config import AutoencoderConfig, RunConfig, arch_of
from bigmodel.data.arrays import load_arrays
from bigmodel.errors import UserError
from bigmodel.metrics import activation_sparsity
from bigmodel.models.autoencoder import Autoencoder
from bigmodel.tasks.base import Batch
from bigmodel.tasks.examples import ExampleStream, ExampleTask, eval_chunks, to_device

EVAL_BATCH = 512
SILENT = 1e-2  # an activation below this counts as silent


class AutoencodeTask(ExampleTask):
    name = "autoencode"
    metric = "reconstruction_error"
    higher_is_better = False

    def __init__(self, config: RunConfig, data: str | Path) -> None:
        super().__init__(config, data)
        model = config.model
        if not isinstance(model, AutoencoderConfig):
            raise UserError(f"task autoencode trains autoencoder models, not {arch_of(model)!r}")
        self.arrays = load_arrays(data, need_labels=False)
        self.x_train = torch.from_numpy(self.arrays.x_train).flatten(1)
        self.x_val = torch.from_numpy(self.arrays.x_val).flatten(1)
        m = self.x_train.shape[1]
        if model.in_features is not None and model.in_features != m:
            raise UserError(f"model.in_features={model.in_features} does not match {self.arrays.name} ({m}); remove it")
        model.in_features = m

    def build_model(self) -> nn.Module:
        assert isinstance(self.config.model, AutoencoderConfig)
        model = Autoencoder(self.config.model)
        model.scale.fit(self.x_train)
        return model

    def batches(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> ExampleStream:
        return self.stream(
            len(self.x_train), micro_batch, seed, lambda idx, _: {"features": self.x_train[idx]}, rank, world_size
        )

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        _, _, loss = model(**batch)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        assert isinstance(model, Autoencoder)
        errors, codes = [], []
        for idx in eval_chunks(len(self.x_val), limit, EVAL_BATCH):
            x = to_device({"features": self.x_val[idx]}, model)["features"]
            errors.append(model.reconstruction_error(x).cpu())
            codes.append(model.encode(x).cpu())
        err, h = float(torch.cat(errors).mean()), torch.cat(codes)
        return {
            "loss": err,
            "reconstruction_error": err,
            "sparsity": activation_sparsity(h, SILENT),
            "mean_activation": float(h.mean()),
            "active_units": float((h.abs() >= SILENT).float().sum(1).mean()),
        }

    def save(self, model: nn.Module, out: Path) -> None:
        assert isinstance(model, Autoencoder)
        model.save_pretrained(out, task=self.name)

    def fingerprint(self) -> str:
        return self.arrays.fingerprint()
