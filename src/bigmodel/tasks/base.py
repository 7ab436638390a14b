"""What the one training loop trains: a `Task` supplies the model, its batches, its loss and its metrics.

`train/loop.py` knows nothing about language modelling, classification or seq2seq. It asks the task for
a model, a resumable stream of micro-batches, the loss of a micro-batch and the validation metrics, and
owns everything else (optimizer, schedule, accumulation, distribution, guards, checkpoints, logs).

A task is built from the resolved `RunConfig` and the `--data` argument:

    task = TASKS[config.task](config, data)
    model = task.build_model()                          # an nn.Module (unwrapped, on CPU)
    stream = task.batches(micro_batch, seed, rank, world_size)
    loss = task.loss(model, stream.next_batch())        # scalar, differentiable, mean over the micro-batch
    metrics = task.evaluate(model, limit=...)           # {"loss": ..., task.metric: ..., ...}
    task.save(model, out / "final")                     # a model directory (config.json + model.safetensors + ...)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from bigmodel.config import RunConfig

Batch = dict[str, torch.Tensor]


class BatchStream(Protocol):
    """An endless, deterministic (given its seed), resumable stream of training micro-batches.

    Rank-aware: with `world_size` ranks, no two ranks read the same example in an epoch. Its state_dict
    (plain ints/lists, JSON-serialisable) is saved in checkpoints so that a resumed run continues with
    exactly the batch it would have read next.
    """

    def next_batch(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Task(ABC):
    """One kind of training problem (`lm`, `classify`, `seq2seq`, `mlm`, `autoencode`)."""

    name: ClassVar[str]
    unit: ClassVar[str] = "examples"  # what a batch is counted in for throughput logs: "tokens" or "examples"
    metric: ClassVar[str] = "loss"  # the headline validation metric (early stopping / best model use it)
    higher_is_better: ClassVar[bool] = False

    def __init__(self, config: RunConfig, data: str | Path) -> None:
        self.config = config
        self.data = data

    @abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (seeded by the caller) for `self.config.model`."""

    @abstractmethod
    def batches(self, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1) -> BatchStream:
        """The training stream for this rank: micro-batches of `micro_batch` examples (or sequences)."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss of one micro-batch (mean over its examples/tokens), differentiable.

        `model` may be a wrapper (torch.compile, DDP, FSDP): call it, do not reach into its attributes.
        """

    @abstractmethod
    def evaluate(self, model: nn.Module, *, limit: int | None = None) -> dict[str, float]:
        """Validation metrics of the unwrapped model: always "loss" (unregularised, unsmoothed) and `metric`.

        `limit` bounds the work of a periodic evaluation (in `unit`s); None scores the whole validation split.
        The loop calls it under its autocast context, with the model in eval mode.
        """

    @abstractmethod
    def save(self, model: nn.Module, out: Path) -> None:
        """Write `model` as a model directory that `from_pretrained` (and `bigmodel eval`) loads."""

    def units(self, batch: Batch) -> int:
        """Size of a micro-batch in `unit`s (examples by default)."""
        return int(next(iter(batch.values())).shape[0])

    def accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per rank and optimizer step, so that one step sees the configured global batch."""
        return 1

    def fingerprint(self) -> str:
        """Identity of the training data; a checkpoint trained on other data is refused on resume."""
        return str(self.data)

    def flops_per_unit(self, model: nn.Module) -> float:
        """Training FLOPs per unit for the MFU log; 6 * parameters unless the task knows better."""
        return 6.0 * sum(p.numel() for p in model.parameters())

    def has_validation(self) -> bool:
        return True
