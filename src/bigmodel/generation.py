"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), one engine for all callers.

`generate()` takes and returns token ids like transformers' `generate` (the prompt followed by the new
tokens); `run_generate()` is the `bigmodel generate` command.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import torch

from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) to -inf. logits: (B, V)."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        drop_orig = torch.zeros_like(drop).scatter(-1, order, drop)
        logits = logits.masked_fill(drop_orig, float("-inf"))
    return logits


def next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPT,
    input_ids: torch.Tensor | list[int] | list[list[int]],
    *,
    max_new_tokens: int | None = None,
    max_length: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_return_sequences: int = 1,
    eos_token_id: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Continue each row of `input_ids` (B, T); returns (B * num_return_sequences, T + new) token ids.

    As in transformers: `max_new_tokens` wins over `max_length` (prompt + new, default 20); rows that emit
    `eos_token_id` are padded with it until every row has finished.
    """
    device = model.transformer.wte.weight.device
    ids = torch.as_tensor(input_ids, dtype=torch.long, device=device)
    ids = ids[None] if ids.dim() == 1 else ids
    _check(
        ids.dim() == 2 and ids.size(1) >= 1,
        f"input_ids must be (batch, length>=1), got shape {tuple(ids.shape)}",
    )
    prompt_len = ids.size(1)
    new = max_new_tokens if max_new_tokens is not None else (max_length or 20) - prompt_len
    _check(
        new >= 1,
        f"nothing to generate: max_new_tokens={new} (max_length={max_length}, prompt {prompt_len} tokens)",
    )
    _check(num_return_sequences >= 1, f"num_return_sequences={num_return_sequences} must be >= 1")
    if do_sample:
        _check(
            temperature > 0,
            f"temperature={temperature} must be > 0 when sampling (use do_sample=False for greedy)",
        )
        _check(top_k is None or top_k >= 1, f"top_k={top_k} must be >= 1")
        _check(top_p is None or 0 < top_p <= 1, f"top_p={top_p} must be in (0, 1]")
    block = model.config.block_size
    _check(
        prompt_len + new <= block,
        f"prompt ({prompt_len} tokens) + max_new_tokens ({new}) exceeds the context window of {block} tokens; "
        f"shorten the prompt or ask for at most {max(block - prompt_len, 0)} new tokens",
    )
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    was_training = model.training
    model.eval()
    ids = ids.repeat_interleave(num_return_sequences, dim=0)  # (B*n, T)
    cache = model.new_cache(ids.size(0), prompt_len + new)
    logits, _ = model(ids, cache=cache, last_only=True)  # (B*n, 1, V)
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=device)
    out = [ids]
    for _ in range(new):
        tok = next_token(logits[:, -1, :], do_sample, temperature, top_k, top_p, generator)  # (B*n,)
        if eos_token_id is not None:
            tok = tok.masked_fill(done, eos_token_id)
            done |= tok == eos_token_id
        out.append(tok[:, None])
        if eos_token_id is not None and bool(done.all()):
            break
        logits, _ = model(tok[:, None], cache=cache, last_only=True)
    model.train(was_training)
    return torch.cat(out, dim=1)


def run_generate(args: Any) -> int:
    from bigmodel.data.tokenizer import Tokenizer
    from bigmodel.evaluation import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    model = GPT.from_pretrained(model_dir)
    if not (model_dir / "tokenizer.json").is_file():
        raise UserError(f"{model_dir} has no tokenizer.json; generate needs the model's tokenizer beside it")
    tok = Tokenizer.from_pretrained(model_dir)
    prompt_ids = tok.encode(args.prompt) if args.prompt else [tok.eot_id]
    t0 = time.perf_counter()
    out = generate(
        model,
        [prompt_ids],
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        num_return_sequences=args.num_samples,
        eos_token_id=tok.eot_id,
        seed=args.seed,
    )
    seconds = time.perf_counter() - t0
    new_tokens = 0
    for i, row in enumerate(out.tolist()):
        gen = row[len(prompt_ids) :]
        if tok.eot_id in gen:
            gen = gen[: gen.index(tok.eot_id)]
        new_tokens += len(gen)
        if i:
            sys.stdout.write("\n" + "-" * 40 + "\n")
        sys.stdout.write(args.prompt + tok.decode(gen, skip_special_tokens=True) + "\n")
    sys.stdout.flush()
    print(
        f"generated {new_tokens} tokens in {seconds:.2f}s ({new_tokens / seconds:.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0
