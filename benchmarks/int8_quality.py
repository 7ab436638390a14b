"""Held-out perplexity of a trained GPT in fp32, bf16 and int8, through the forward and through decoding steps.

    python benchmarks/int8_quality.py runs/demo runs/demo/data [--max-tokens N]

`bigmodel eval --dtype int8` scores whole windows with the forward, where int8 layers multiply float32
activations by dequantized weights (BLAS). Decoding runs other kernels: a step's few rows go through
`models/gpt_numba.py`, whose int8 path also rounds each activation row to int16. This script scores the
same held-out windows both ways: "steps" feeds each window's tokens one at a time through the KV cache
(teacher forcing, 8 windows per step: the compiled decoding step, which bf16 models on CPUs with native
bf16 take up to 8 rows), so its perplexity is the one the decoding kernels give; the table says which
path each dtype's steps took. fp32 forward and fp32 steps agree up to float rounding, which checks the harness.
bf16 differs by design between the two: its forward computes in bf16, its compiled steps in float32 from
the bf16 weights and a bf16 KV cache.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from bigmodel import hardware
from bigmodel.data.loader import TokenShards, eval_batches
from bigmodel.evaluation import check_same_tokenizer, resolve_model_dir
from bigmodel.generation import cast_for_inference, compiled_decoder
from bigmodel.models.gpt import GPT

WINDOWS = 8  # windows scored together: rows of a decoding step (bf16 on native-bf16 CPUs: at most 8 compiled)


@torch.inference_mode()
def nll_forward(model: GPT, x: torch.Tensor, y: torch.Tensor) -> float:
    with hardware.bf16_linears_in_float(model):  # as `bigmodel eval --dtype bf16` runs it
        logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()


@torch.inference_mode()
def nll_steps(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[float, bool]:
    """The same sum, one position at a time through the cache: the first token by the forward (prefill),
    the rest by the compiled decoding step (or op by op where it does not apply); and whether the compiled
    step ran."""
    B, T = x.shape
    cache = model.new_cache(B, T)
    logits, _ = model(x[:, :1], cache=cache)
    step = compiled_decoder(model, cache, torch.ones(B, 1, dtype=torch.bool))
    total = F.cross_entropy(logits[:, -1].float(), y[:, 0], reduction="sum").item()
    for t in range(1, T):
        if step is not None:
            logits = step(x[:, t], torch.full((B,), t))
        else:
            logits, _ = model(x[:, t : t + 1], cache=cache)
        total += F.cross_entropy(logits[:, -1].float(), y[:, t], reduction="sum").item()
    return total, step is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model directory or run directory")
    ap.add_argument("data", help="data directory (its val split is scored)")
    ap.add_argument("--max-tokens", type=int, default=None, help="score about this many tokens (default: all)")
    args = ap.parse_args()
    model_dir = resolve_model_dir(args.model)
    check_same_tokenizer(model_dir, Path(args.data))
    fp32 = GPT.from_pretrained(model_dir).eval()
    models = {"fp32": fp32}
    models.update({dtype: cast_for_inference(GPT.from_pretrained(model_dir), dtype) for dtype in ("bf16", "int8")})
    shards = TokenShards(args.data, "val")
    block = fp32.config.block_size
    sums = {(dtype, path): 0.0 for dtype in models for path in ("forward", "steps")}
    compiled = dict.fromkeys(models, True)
    count = 0
    for x, y in eval_batches(shards, block, WINDOWS, args.max_tokens):
        if x.shape[1] < 2:
            continue
        for dtype, model in models.items():
            sums[dtype, "forward"] += nll_forward(model, x, y)
            total, ran = nll_steps(model, x, y)
            sums[dtype, "steps"] += total
            compiled[dtype] &= ran
        count += y.numel()
    ppl = {key: math.exp(total / count) for key, total in sums.items()}
    print(f"{model_dir}: {count} held-out tokens, windows of {block}")
    print(f"{'':8s} {'forward':>10s} {'steps':>10s}")
    for dtype in models:
        path = "compiled step" if compiled[dtype] else "op by op (the compiled step did not apply)"
        print(f"{dtype:8s} {ppl[dtype, 'forward']:10.3f} {ppl[dtype, 'steps']:10.3f}  steps: {path}")
    for dtype in ("bf16", "int8"):
        for path in ("forward", "steps"):
            change = ppl[dtype, path] / ppl["fp32", path] - 1
            print(f"{dtype} against fp32, {path}: {change:+.3%}")
    change = ppl["int8", "steps"] / ppl["int8", "forward"] - 1
    print(f"int8 steps against int8 forward (the int16 activations): {change:+.5%}")


if __name__ == "__main__":
    main()
