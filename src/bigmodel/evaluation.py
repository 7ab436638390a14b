"""Held-out scores of a language model: loss (nats/token), perplexity, bits per byte (`bigmodel eval`)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from bigmodel import hardware
from bigmodel.data.loader import TokenShards, eval_batches
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT


@torch.no_grad()
def evaluate(
    model: GPT,
    shards: TokenShards,
    *,
    max_tokens: int | None = None,
    batch_size: int = 16,
    autocast_dtype: torch.dtype | None = None,
    block_size: int | None = None,
) -> dict[str, float | int]:
    """Mean next-token loss over consecutive windows of the split; bits per byte from the manifest's byte count.

    Windows are the model's context long, or `block_size` (at most that) to score several models on the
    same windows.
    """
    block = block_size or model.config.block_size
    if block > model.config.block_size:
        raise ValueError(f"block_size={block} is longer than the model's context ({model.config.block_size})")
    if shards.tokens < 2:
        raise UserError(f"the {shards.split} split of {shards.dir} is empty; prepare with --val-fraction > 0")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for x, y in eval_batches(shards, block, batch_size, max_tokens):
        with hardware.autocast(device, autocast_dtype):
            logits, _ = model(x.to(device))
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.to(device).flatten(), reduction="sum")
        total += loss.item()
        count += y.numel()
    model.train(was_training)
    mean = total / count
    return {
        "loss": mean,
        "perplexity": math.exp(min(mean, 700.0)),
        "bits_per_byte": mean / math.log(2) / shards.bytes_per_token,
        "tokens": count,
    }


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a run directory (its final/ model, else its newest complete checkpoint)."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / "final" / "config.json").is_file():
        return path / "final"
    from bigmodel.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(path / "checkpoints") if (path / "checkpoints").is_dir() else None
    if ckpt is not None:
        return ckpt
    raise UserError(f"{path} is neither a model directory (config.json) nor a run with final/ or checkpoints")


def check_same_tokenizer(model_dir: Path, data_dir: Path) -> None:
    """Scores are meaningless when the data was tokenized differently from the model's training data."""
    a, b = model_dir / "tokenizer.json", data_dir / "tokenizer.json"
    if a.is_file() and b.is_file() and json.loads(a.read_text())["model"] != json.loads(b.read_text())["model"]:
        raise UserError(
            f"{data_dir} was tokenized with another tokenizer than {model_dir}; prepare the data with --tokenizer {a}"
        )


def run_eval(args: Any) -> int:
    from bigmodel.generation import cast_for_inference

    model_dir = resolve_model_dir(args.model)
    model = cast_for_inference(GPT.from_pretrained(model_dir), args.dtype)
    shards = TokenShards(args.data, args.split)
    check_same_tokenizer(model_dir, Path(args.data))
    dtype = hardware.autocast_dtype(args.precision, hardware.default_device())
    result = evaluate(model, shards, max_tokens=args.max_tokens, autocast_dtype=dtype)
    print(json.dumps(result))
    return 0
