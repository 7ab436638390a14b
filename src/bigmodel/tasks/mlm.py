"""Masked-language-model pretraining (`--task mlm`) of the `encoder` on a data directory of token shards.

Examples are the consecutive block_size windows of the train split (`bigmodel prepare` makes the shards;
the data's tokenizer is the model's, plus [MASK] and [PAD] at the end of the vocabulary). In each window
`mask_prob` of the tokens (at least one) are chosen for prediction: 80% of them become [MASK], 10% a
random token, 10% stay (BERT's recipe). Loss: cross-entropy on the chosen tokens; metrics: that loss and
the accuracy of the predicted tokens on validation windows masked with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigmodel.config import EncoderConfig, RunConfig, arch_of
from bigmodel.data.loader import TokenShards, data_fingerprint
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.models.encoder import IGNORE, Encoder, encoder_special_ids
from bigmodel.tasks.base import Batch
from bigmodel.tasks.examples import ExampleStream, ExampleTask, eval_chunks, to_device

EVAL_BATCH = 64
EVAL_SEED = 0


def windows(shards: TokenShards, size: int) -> list[tuple[int, int]]:
    """(shard, start) of every whole `size`-token window, consecutive and non-overlapping."""
    return [(s, start) for s, a in enumerate(shards.arrays) for start in range(0, len(a) - size + 1, size)]


class MLMTask(ExampleTask):
    name = "mlm"
    metric = "loss"
    higher_is_better = False

    def __init__(self, config: RunConfig, data: str | Path) -> None:
        super().__init__(config, data)
        model = config.model
        if not isinstance(model, EncoderConfig):
            raise UserError(f"task mlm trains encoder models, not {arch_of(model)!r}")
        if model.n_classes is not None:
            raise UserError("model.n_classes is for --task classify; masked-LM pretraining has no classes")
        self.shards = TokenShards(data, "train")
        self.val = TokenShards(data, "val")
        self.tokenizer = Tokenizer.from_pretrained(data)
        vocab = self.tokenizer.vocab_size + 2
        if model.vocab_size is not None and model.vocab_size != vocab:
            raise UserError(
                f"model.vocab_size={model.vocab_size} is not the data's vocabulary + 2 = {vocab}; remove it"
            )
        model.vocab_size = vocab
        self.mask_id, self.pad_id = encoder_special_ids(vocab)
        self.train_windows = windows(self.shards, model.block_size)
        self.val_windows = windows(self.val, model.block_size)
        if not self.train_windows:
            raise UserError(f"{data} has no train shard of {model.block_size} tokens; lower model.block_size")

    def _collate(
        self, shards: TokenShards, wins: list[tuple[int, int]], idx: torch.Tensor, g: torch.Generator
    ) -> Batch:
        model = self.config.model
        assert isinstance(model, EncoderConfig)
        T = model.block_size
        ids = torch.from_numpy(
            np.stack(
                [
                    np.asarray(shards.arrays[s][start : start + T], dtype=np.int64)
                    for s, start in (wins[i] for i in idx.tolist())
                ]
            )
        )  # (B, T)
        chosen = torch.rand(ids.shape, generator=g) < model.mask_prob  # (B, T)
        chosen[torch.arange(len(ids)), torch.randint(0, T, (len(ids),), generator=g)] = True  # >= 1 per window
        labels = torch.where(chosen, ids, IGNORE)
        action = torch.rand(ids.shape, generator=g)
        random_tokens = torch.randint(0, self.tokenizer.vocab_size, ids.shape, generator=g)
        inputs = torch.where(chosen & (action < 0.8), self.mask_id, ids)
        inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, inputs)
        return {"input_ids": inputs, "labels": labels}

    def build_model(self) -> nn.Module:
        assert isinstance(self.config.model, EncoderConfig)
        return Encoder(self.config.model)

    def batches(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> ExampleStream:
        return self.stream(
            len(self.train_windows),
            micro_batch,
            seed,
            lambda idx, g: self._collate(self.shards, self.train_windows, idx, g),
            rank,
            world_size,
        )

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        _, loss = model(**batch, label_smoothing=self.config.train.label_smoothing)  # smoothing: training only
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        if not self.val_windows:
            raise UserError(f"the val split of {self.data} has no whole window; prepare with --val-fraction > 0")
        total = count = correct = 0.0
        g = torch.Generator().manual_seed(EVAL_SEED)
        for idx in eval_chunks(len(self.val_windows), limit, EVAL_BATCH):
            batch = to_device(self._collate(self.val, self.val_windows, idx, g), model)
            logits, _ = model(batch["input_ids"])
            target = batch["labels"]
            chosen = target != IGNORE
            loss = torch.nn.functional.cross_entropy(logits[chosen].float(), target[chosen], reduction="sum")
            total, count = total + float(loss), count + float(chosen.sum())
            correct += float((logits[chosen].argmax(-1) == target[chosen]).sum())
        return {"loss": total / count, "accuracy": correct / count, "masked_tokens": count}

    def save(self, model: nn.Module, out: Path) -> None:
        assert isinstance(model, Encoder)
        model.save_pretrained(out, self.tokenizer, task=self.name)

    def fingerprint(self) -> str:
        return data_fingerprint(self.shards.manifest)

    def has_validation(self) -> bool:
        return bool(self.val_windows)
