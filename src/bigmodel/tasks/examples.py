"""What the example-counted tasks (classify, seq2seq, mlm, autoencode) share: a resumable stream over a
fixed set of examples, batch-size accounting in examples, and moving batches to the model's device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bigmodel.errors import UserError
from bigmodel.tasks.base import Batch, Task


class ExampleStream:
    """Endless micro-batches over examples 0..n-1: a fresh permutation each epoch, rank-aware, resumable.

    Epoch e's order is a permutation drawn from (seed, e); rank r of w reads every w-th example of it
    (n // w each, so no two ranks read the same example in an epoch). A micro-batch that reaches the end of
    an epoch continues with the next one. The state is (epoch, cursor): a resumed run reads exactly the
    batch it would have read next. `collate(indices, generator)` turns example indices into a Batch; the
    generator, seeded from the stream position, serves random choices made per batch (masking, noise), so
    that they too are the same after a resume.
    """

    def __init__(
        self,
        n: int,
        micro_batch: int,
        seed: int,
        collate: Callable[[torch.Tensor, torch.Generator], Batch],
        rank: int = 0,
        world_size: int = 1,
        bootstrap: bool = False,
    ) -> None:
        if n < world_size:
            raise UserError(f"{n} training examples cannot be shared by {world_size} ranks")
        self.n, self.micro_batch, self.seed = n, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.collate = collate
        self.sample = bootstrap_sample(n, seed) if bootstrap else None  # (n,) indices, repeats allowed
        self.epoch, self.cursor = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=g)
        if self.sample is not None:  # a permutation of the resample: its repeats come round as often as drawn
            perm = self.sample[perm]
        return perm[self.rank :: self.world_size][: self.n // self.world_size]

    def next_indices(self) -> torch.Tensor:
        taken: list[torch.Tensor] = []
        need = self.micro_batch
        while need:
            chunk = self._order[self.cursor : self.cursor + need]
            taken.append(chunk)
            need -= len(chunk)
            self.cursor += len(chunk)
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
        return torch.cat(taken)

    def next_batch(self) -> Batch:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.cursor)
        return self.collate(self.next_indices(), g)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._epoch_order(self.epoch)


def bootstrap_sample(n: int, seed: int) -> torch.Tensor:
    """n example indices drawn uniformly with replacement from 0..n-1, fixed by `seed` (the same on every rank)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 - 1)  # a stream apart from the epochs' permutations
    return torch.randint(n, (n,), generator=g)


class ExampleTask(Task):
    """Base of the tasks whose batches are counted in examples (`train.batch_size` per optimizer step)."""

    unit = "examples"

    def accum_steps(self, world_size: int = 1) -> int:
        return self.config.example_accum_steps(world_size)

    def units(self, batch: Batch) -> int:
        return int(next(iter(batch.values())).shape[0])

    def stream(
        self,
        n: int,
        micro_batch: int,
        seed: int,
        collate: Callable[[torch.Tensor, torch.Generator], Batch],
        rank: int = 0,
        world_size: int = 1,
    ) -> ExampleStream:
        """The task's ExampleStream over its n training examples, a bootstrap resample if `train.bootstrap`."""
        return ExampleStream(n, micro_batch, seed, collate, rank, world_size, bootstrap=self.config.train.bootstrap)


def to_device(batch: Batch, model: nn.Module) -> Batch:
    """The batch on the device of the model's parameters (a no-op on CPU)."""
    device = next(model.parameters()).device
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def eval_chunks(n: int, limit: int | None, size: int) -> list[torch.Tensor]:
    """Index chunks covering the first min(n, limit) validation examples in order (deterministic)."""
    stop = n if limit is None else min(n, max(1, limit))
    return list(torch.arange(stop).split(size))
