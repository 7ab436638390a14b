"""Memory planning (`bigmodel plan`): what one rank holds while training a GPT, before you rent the machine.

Per rank, for AdamW training (fp32 master weights):
    weights      4 bytes x P             (DDP: every rank)      4 P / N (FSDP: sharded)
    gradients    4 bytes x P             (DDP)                  4 P / N (FSDP)
    optimizer    8 bytes x P (exp_avg, exp_avg_sq) (DDP)        8 P / N (FSDP)
    FSDP working set: the root's parameters (embeddings: FSDP2 keeps the root gathered) and two gathered
                 blocks (the one running and the prefetched one), plus one block's unsharded gradients
    activations  per token of a micro-batch: per layer 16 C values saved for backward (LayerNorm inputs and
                 outputs 4 C, q/k/v 3 C, attention output C, MLP hidden 4 C before and 4 C after GELU),
                 + 2 V fp32 values for the logits and their log-softmax, + 3 C for the embeddings and the
                 final LayerNorm. With activation checkpointing only each block's input (C per layer) is
                 kept, and one block's 16 C is recomputed at a time.
Activation values are 2 bytes under bf16 autocast and 4 in fp32; logits are scored in fp32.
`benchmarks/memory.py` measures the same quantities on CPU and prints measured against planned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bigmodel.config import GPTConfig, RunConfig, arch_of, resolve_config
from bigmodel.errors import UserError

GiB = 1024**3


@dataclass
class MemoryPlan:
    strategy: str
    world_size: int
    params: int
    weights: float
    gradients: float
    optimizer: float
    working: float  # FSDP's gathered parameters and unsharded gradients (0 for DDP)
    activations: float
    activations_ckpt: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.working + self.activations

    @property
    def total_ckpt(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.working + self.activations_ckpt


def gpt_param_counts(m: GPTConfig) -> tuple[int, int, int]:
    """(total, per block, root) parameter counts of a GPT, tied embeddings counted once."""
    assert m.vocab_size is not None
    c, b = m.n_embd, int(m.bias)
    per_block = (
        (2 * c + 2 * b * c) + (3 * c * c + 3 * b * c) + (c * c + b * c) + (4 * c * c + 4 * b * c) + (4 * c * c + b * c)
    )
    root = m.vocab_size * c + m.block_size * c + c + b * c  # wte (tied with lm_head), wpe, ln_f
    return root + m.n_layer * per_block, per_block, root


def plan_memory(model: GPTConfig, micro_batch: int, world_size: int, strategy: str, bf16: bool = False) -> MemoryPlan:
    """Bytes per rank for training `model` with `micro_batch` sequences per forward/backward."""
    if strategy not in ("ddp", "fsdp"):
        raise UserError(f"strategy {strategy!r}: expected ddp or fsdp")
    total, per_block, root = gpt_param_counts(model)
    shard = world_size if strategy == "fsdp" else 1
    act_bytes = 2 if bf16 else 4
    tokens = micro_batch * model.block_size
    c, v, layers = model.n_embd, model.vocab_size or 0, model.n_layer
    logits = tokens * 2 * v * 4  # fp32 logits and log-softmax kept for the loss's backward
    edges = tokens * 3 * c * act_bytes  # embeddings output, final LayerNorm input and output
    activations = tokens * layers * 16 * c * act_bytes + logits + edges
    activations_ckpt = tokens * (layers + 16) * c * act_bytes + logits + edges
    working = 0.0
    if strategy == "fsdp" and world_size > 1:
        gathered = 2 if bf16 else 4
        working = root * gathered + 2 * per_block * gathered + per_block * 4
    return MemoryPlan(
        strategy=strategy,
        world_size=world_size,
        params=total,
        weights=4 * total / shard,
        gradients=4 * total / shard,
        optimizer=8 * total / shard,
        working=working,
        activations=float(activations),
        activations_ckpt=float(activations_ckpt),
    )


def parse_bytes(text: str) -> float:
    """'80GiB', '24 GB', '512MiB', '1.5T' -> bytes (binary units for both spellings, as GPU memory is sold)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise UserError(f"--memory {text!r}: expected a size such as 80GiB, 24GB or 512MiB")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2).upper()]
    return float(m.group(1)) * scale


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB / 10 else f"{n / 1024**2:.1f} MiB"


def format_plan(config: RunConfig, world_size: int, memory: float | None) -> str:
    m = config.model
    if not isinstance(m, GPTConfig):
        raise UserError(f"bigmodel plan covers GPT language models, not model.arch={arch_of(m)!r}")
    bf16 = config.train.precision != "fp32"  # auto means bf16 on the GPUs and AMX CPUs one plans for
    plans = [plan_memory(m, config.train.micro_batch, world_size, s, bf16) for s in ("ddp", "fsdp")]
    lines = [
        f"model: {plans[0].params / 1e6:.1f}M parameters ({m.n_layer} layers, {m.n_embd} wide, {m.n_head} heads, "
        f"context {m.block_size}, vocabulary {m.vocab_size}); micro-batch {config.train.micro_batch} sequences, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, AdamW; world size {world_size}",
        "",
        f"{'per rank':<42}{'ddp':>14}{'fsdp':>14}",
    ]
    rows = [
        ("weights", "weights"),
        ("gradients", "gradients"),
        ("optimizer state (AdamW)", "optimizer"),
        ("FSDP gathered blocks", "working"),
        ("activations", "activations"),
        ("activations, with checkpointing", "activations_ckpt"),
        ("total", "total"),
        ("total, with checkpointing", "total_ckpt"),
    ]
    for label, attr in rows:
        lines.append(f"{label:<42}" + "".join(f"{_fmt(getattr(p, attr)):>14}" for p in plans))
    if memory is not None:
        for label, attr in (("fits", "total"), ("fits, with checkpointing", "total_ckpt")):
            cells = ["yes" if getattr(p, attr) <= memory else "no" for p in plans]
            lines.append(f"{label + f' in {_fmt(memory)}':<42}" + "".join(f"{c:>14}" for c in cells))
    lines += [
        "",
        "Plus the framework's own memory (CUDA context or the Python process, ~0.3-1 GiB) and allocator slack.",
    ]
    return "\n".join(lines)


def run_plan(args: Any) -> int:
    config = resolve_config(args.preset, args.config, args.set)
    if args.world_size < 1:
        raise UserError(f"--world-size {args.world_size}: expected an integer >= 1")
    if config.task != "lm" or not isinstance(config.model, GPTConfig):
        raise UserError(f"bigmodel plan covers GPT language models; task {config.task!r} is not planned yet")
    if config.model.vocab_size is None:
        config.model.vocab_size = args.vocab_size
    memory = parse_bytes(args.memory) if args.memory else None
    print(format_plan(config, args.world_size, memory))
    return 0
