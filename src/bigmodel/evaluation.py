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


def evaluate_model_dir(
    model_dir: str | Path, data: str | Path, *, limit: int | None = None, autocast_dtype: torch.dtype | None = None
) -> dict[str, float]:
    """Validation metrics of a model directory of the zoo (not GPT) on `data`, by the task it was trained for.

    classify: loss, accuracy; seq2seq: loss, exact_match, cer, bleu; mlm: masked-token loss and accuracy;
    autoencode: reconstruction_error, sparsity, ... (see tasks/). `limit` bounds the examples scored.
    """
    import copy

    from bigmodel.config import EncoderConfig, RunConfig
    from bigmodel.models import load_model
    from bigmodel.models.directory import PretrainedModel, read_config_json
    from bigmodel.tasks import TASKS

    model = load_model(model_dir)
    assert isinstance(model, PretrainedModel)
    meta = read_config_json(model_dir)
    config = RunConfig(
        preset=model.arch, task=str(meta.get("task", model.saved_task())), model=copy.deepcopy(model.config)
    )
    if isinstance(config.model, EncoderConfig) and config.model.n_classes is not None:
        config.model.init_from = str(model_dir)  # the classifier's own tokenizer and shape
        config.model.tokenizer = ""  # (saved beside the weights; the one it was trained with may be gone)
    task = TASKS[config.task](config, data)
    labels = getattr(task, "labels", None)
    if model.labels and labels is not None and list(labels) != model.labels:
        raise UserError(f"{data} has the classes {list(labels)}; {model_dir} was trained on {model.labels}")
    device = hardware.default_device()
    model.to(device)
    with torch.no_grad(), hardware.autocast(device, autocast_dtype):
        return task.evaluate(model, limit=limit)


def run_eval(args: Any) -> int:
    from bigmodel.generation import cast_for_inference
    from bigmodel.models import model_arch

    model_dir = resolve_model_dir(args.model)
    if model_arch(model_dir) != "gpt":
        if args.dtype != "fp32" or args.split != "val":
            raise UserError("--dtype and --split apply to GPT language models; the other families score fp32 on val")
        dtype = hardware.autocast_dtype(args.precision, hardware.default_device())
        print(json.dumps(evaluate_model_dir(model_dir, args.data, limit=args.max_tokens, autocast_dtype=dtype)))
        return 0
    model = cast_for_inference(GPT.from_pretrained(model_dir), args.dtype)
    shards = TokenShards(args.data, args.split)
    check_same_tokenizer(model_dir, Path(args.data))
    dtype = hardware.autocast_dtype(args.precision, hardware.default_device())
    with hardware.bf16_linears_in_float(model):  # --dtype bf16 on a CPU without native bf16
        result = evaluate(model, shards, max_tokens=args.max_tokens, autocast_dtype=dtype)
    print(json.dumps(result))
    return 0
