"""Data parallelism through PyTorch's own engine: torchrun's environment, DDP and FSDP2, and rank agreement.

`torchrun --nproc-per-node N -m bigmodel train ...` starts N processes with RANK / WORLD_SIZE /
LOCAL_RANK / MASTER_ADDR set; `Distributed.from_env()` joins them into one process group (NCCL on GPUs,
gloo on CPUs). A plain `bigmodel train` is a world of one: no process group, no wrapper, the same code.

`wrap_model` applies the configured strategy:
- `ddp`: `DistributedDataParallel`, every rank holds the whole model, gradients are all-reduced;
- `fsdp`: FSDP2 `fully_shard` on every transformer block and then on the root, so parameters, gradients
  and optimizer state are sharded across ranks and a block's weights are gathered only while it runs,
  with a `MixedPrecisionPolicy` (bf16 compute, fp32 gradient reduction) when training in bf16.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from bigmodel.errors import UserError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """True when there is a process group to talk to (more than one rank)."""
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """Join torchrun's process group when launched by it with more than one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=device)
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            device_id = device if backend == "nccl" else None
            dist.init_process_group(backend, timeout=timedelta(minutes=30), device_id=device_id)
        return cls(rank=rank, world_size=world, local_rank=local, device=device)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, value: float) -> float:
        """Sum of a float over ranks (a NaN or inf on any rank makes the result non-finite everywhere)."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one: how ranks agree to stop or skip together."""
        return self.flags(flag)[0]

    def flags(self, *flags: bool) -> list[bool]:
        """`any` for several flags in one all-reduce (the loop asks two questions every step)."""
        if not self.active:
            return list(flags)
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [bool(v > 0) for v in t.tolist()]

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def resolve_parallel(parallel: str, world_size: int) -> str:
    """The strategy to use: 'none' for one process whatever is configured, 'ddp' for 'auto' on several."""
    if world_size == 1:
        return "none"
    if parallel == "none":
        raise UserError(
            f"train.parallel='none' but torchrun started {world_size} processes; set train.parallel=ddp or fsdp"
        )
    return "ddp" if parallel == "auto" else parallel


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP shards one by one and activation checkpointing recomputes one by one."""
    blocks = getattr(model, "blocks", None)
    if callable(blocks):
        return list(blocks())
    raise UserError(f"{type(model).__name__} does not list its blocks (a blocks() method); FSDP needs them")


def wrap_model(model: nn.Module, strategy: str, ctx: Distributed, amp: torch.dtype | None) -> nn.Module:
    """Return the module the training step calls: the model itself, DDP(model), or the FSDP2-sharded model.

    FSDP2 shards in place (the returned object is `model`, its parameters now DTensors); DDP returns a
    wrapper whose `.module` is `model`. Either way `model` stays the unwrapped module that is saved.
    """
    if strategy == "none":
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        # gradients live in DDP's all-reduce buckets instead of beside them: one copy, not two
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=amp, reduce_dtype=torch.float32) if amp else MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def set_gradient_sync(wrapped: nn.Module, strategy: str, enabled: bool) -> None:
    """Skip the gradient all-reduce on accumulation micro-steps; only the last one of a step syncs."""
    if strategy == "ddp":
        wrapped.require_backward_grad_sync = enabled  # type: ignore[assignment]  # what DDP.no_sync() toggles
    elif strategy == "fsdp":
        wrapped.set_requires_gradient_sync(enabled)  # type: ignore[operator]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's global value (FSDP2's gradient norm is one); plain tensors pass through."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t
