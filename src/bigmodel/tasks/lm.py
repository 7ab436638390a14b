"""Language modelling (`--task lm`, the default): a GPT trained on next-token prediction over token shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bigmodel.config import GPTConfig, RunConfig, arch_of
from bigmodel.data.loader import TokenShards, WindowLoader, data_fingerprint
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.evaluation import evaluate
from bigmodel.models.gpt import GPT
from bigmodel.tasks.base import Batch, Task


class WindowStream:
    """WindowLoader's (x, y) windows as {"input_ids", "targets"} batches (BatchStream protocol): targets are
    the inputs shifted by one already (GPT's `targets`, not transformers' `labels`, which it shifts)."""

    def __init__(self, loader: WindowLoader) -> None:
        self.loader = loader

    def next_batch(self) -> Batch:
        x, y = self.loader.next_batch()
        return {"input_ids": x, "targets": y}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.loader.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


class LMTask(Task):
    name = "lm"
    unit = "tokens"
    metric = "loss"
    higher_is_better = False

    def __init__(self, config: RunConfig, data: str | Path) -> None:
        super().__init__(config, data)
        self.shards = TokenShards(data, "train")
        has_val = self.shards.manifest["splits"]["val"]["tokens"] > 1
        self.val = TokenShards(data, "val") if has_val else None
        self.tokenizer = Tokenizer.from_pretrained(data)
        if not isinstance(config.model, GPTConfig):
            raise UserError(f"task lm trains GPT models, not model.arch={arch_of(config.model)!r}")
        if config.train.bootstrap:
            raise UserError(
                "train.bootstrap resamples the examples of classify, seq2seq, mlm and autoencode; task lm streams "
                "token windows: drop train.bootstrap (vary train.seed for ensemble members)"
            )
        self.model_config: GPTConfig = config.model
        model = self.model_config
        if model.vocab_size is None:
            model.vocab_size = self.tokenizer.vocab_size
        elif model.vocab_size < self.tokenizer.vocab_size:
            raise UserError(
                f"model.vocab_size={model.vocab_size} is smaller than the data's vocabulary "
                f"({self.tokenizer.vocab_size} tokens); remove the override or raise it"
            )

    def build_model(self) -> nn.Module:
        return GPT(self.model_config)

    def batches(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> WindowStream:
        block = self.model_config.block_size
        return WindowStream(WindowLoader(self.shards, block, micro_batch, seed, rank, world_size))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        smoothing = self.config.train.label_smoothing  # training only: evaluate() scores unsmoothed
        _, loss = model(batch["input_ids"], batch["targets"], label_smoothing=smoothing)
        return loss

    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        assert self.val is not None and isinstance(model, GPT)
        scores: dict[str, float] = dict(evaluate(model, self.val, max_tokens=limit))  # "tokens" stays an int
        return scores

    def save(self, model: nn.Module, out: Path) -> None:
        assert isinstance(model, GPT)
        model.save_pretrained(out, self.tokenizer)

    def units(self, batch: Batch) -> int:
        return batch["input_ids"].numel()

    def accum_steps(self, world_size: int = 1) -> int:
        return self.config.grad_accum_steps(world_size)

    def fingerprint(self) -> str:
        return data_fingerprint(self.shards.manifest)

    def flops_per_unit(self, model: nn.Module) -> float:
        assert isinstance(model, GPT)
        return model.flops_per_token()

    def has_validation(self) -> bool:
        return self.val is not None
