"""The generation engine: one decoder for the Python API, the CLI, evaluation and (later) the server.

Reading order:
  GenerationConfig     (config.py) the knobs, named as in transformers, None until set; resolved() fills defaults
  process_logits       repetition penalty -> temperature -> top-k -> top-p -> min-p (transformers' order)
  decode               the loop: left-padded batch prefill into a preallocated KV cache, then one token
                       per step for every row; yields each step's tokens and their log-probabilities
  compiled_decoder     decoding steps as compiled code on CPUs (models/gpt_numba.py) or as a CUDA graph
                       (models/gpt_graph.py), for models of GPT's own classes (plain_gpt)
  generate             token ids in, token ids out (what `GPT.generate` calls)
  TextStream           incremental detokenisation: UTF-8-safe chunks, stop strings never emitted
  generate_text/stream_text   strings in, strings out (CLI, server)
  run_generate         `bigmodel generate`
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from bigmodel import hardware
from bigmodel.config import (
    GENERATION_FIELDS,
    GenerationConfig,
    ResolvedGeneration,
    instead_hints,
    not_applied,
    settings_of,
)
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT, MLP, Block
from bigmodel.nn.attention import CausalSelfAttention, prompt_mask

if TYPE_CHECKING:
    from bigmodel.data.tokenizer import Tokenizer


def config_for(model: Any, kwargs: dict[str, Any], generation_config: Any = None) -> ResolvedGeneration:
    """The settings a call runs with, built as transformers builds them: the model's own
    (`model.generation_config`), what `generation_config` sets laid over them (bigmodel's GenerationConfig,
    transformers' or a dict), then the keywords; transformers' defaults for what is left unset, and the
    values checked once, all laid together (so a keyword may mend a setting of the model's)."""
    unknown = not_applied(kwargs)
    if unknown:
        raise ValueError(
            f"unknown generation argument(s) {', '.join(unknown)}; known: {', '.join(sorted(GENERATION_FIELDS))}"
            f"{instead_hints(unknown)}"
        )
    own = settings_of(getattr(model, "generation_config", None) or {}, "model.generation_config")
    given = settings_of(generation_config) if generation_config is not None else {}
    keywords = {k: v for k, v in kwargs.items() if k in GENERATION_FIELDS}
    if "top_k" in keywords and keywords["top_k"] is None:
        # keywords come after transformers' defaults, so None there is a setting: no top-k. (Other knobs'
        # None does what their default does; eos_token_id=None stops nowhere.)
        keywords["top_k"] = 0
    return ResolvedGeneration(**{**own, **given, **keywords})


def new_tokens(cfg: GenerationConfig, prompt: int, block: int) -> int:
    """How many tokens to generate after a prompt of `prompt` tokens, as transformers counts them:
    max_new_tokens; else max_length minus the prompt; else 20 within the context window (recent transformers;
    older releases counted the prompt in the 20). A ValueError when that leaves none."""
    if cfg.max_new_tokens is not None:
        return cfg.max_new_tokens
    new = cfg.max_length - prompt if cfg.max_length is not None else min(20, block - prompt)
    if new < 1:
        limit = f"max_length={cfg.max_length}" if cfg.max_length is not None else f"the context window ({block})"
        raise ValueError(f"nothing to generate: the prompt's {prompt} tokens reach {limit}")
    return new


# ----- logits processing ------------------------------------------------------------------------------------
def process_logits(logits: torch.Tensor, seen: torch.Tensor | None, cfg: GenerationConfig) -> torch.Tensor:
    """logits (N, V) float -> processed logits (N, V); `seen` (N, V) bool marks tokens already in each row.
    cfg's unset settings take transformers' defaults (the engine passes it resolved)."""
    cfg = cfg.resolved()
    if seen is not None and cfg.repetition_penalty != 1.0:
        penalised = torch.where(logits > 0, logits / cfg.repetition_penalty, logits * cfg.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not cfg.do_sample:
        return logits
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.size(-1):  # (0: off)
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if cfg.min_p is not None and cfg.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < cfg.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


# ----- the decoding loop ------------------------------------------------------------------------------------
def _device(model: GPT) -> torch.device:
    """Where the weights are. The engine needs only `config.block_size`/`vocab_size`, `new_cache` and the
    forward's keywords, so any module offering them decodes too (e.g. bigmodel.ensemble.LMEnsemble)."""
    return next(model.parameters()).device


@dataclass
class Step:
    """One decoding step. Its tensors are made under torch.inference_mode: read them, do not train on them."""

    tokens: torch.Tensor  # (N,) the token chosen for every row this step
    logprobs: torch.Tensor | None  # (N,) its log-probability under the model (before any processing)
    done: torch.Tensor  # (N,) rows that have finished (they keep receiving the pad token)


def decode(model: GPT, prompts: list[list[int]], cfg: GenerationConfig, *, logprobs: bool = True) -> Iterator[Step]:
    """Generate for every prompt (each repeated num_return_sequences times), one Step per new token.

    With logprobs=False the steps carry None instead of the chosen tokens' log-probabilities: a
    log-softmax over the vocabulary saved per step (~1% of an int8 GPT-2 step on 2 cores).

    Prompts of different lengths are left-padded: each row gets its own positions (0 at its first real
    token) and an attention mask that hides the padding, so every row decodes as if it were alone.
    Invalid prompts raise ValueError here, before the first step is asked for.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (start an empty text with the end-of-text token)")
    cfg = cfg.resolved()
    rows = [p for p in prompts for _ in range(cfg.num_return_sequences)]
    L = max(len(p) for p in rows)
    block = model.config.block_size
    new = new_tokens(cfg, L, block)
    if L + new > block:
        raise ValueError(
            f"prompt ({L} tokens) + max_new_tokens ({new}) exceeds the context window of {block} tokens; "
            f"shorten the prompt or ask for at most {max(block - L, 0)} new tokens"
        )
    vocab = model.config.vocab_size or 0
    if max(max(p) for p in rows) >= vocab or min(min(p) for p in rows) < 0:
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    return _decode_steps(model, rows, new, cfg, logprobs)


def has_forward_hooks(model: torch.nn.Module) -> bool:
    """Whether any forward (pre-)hook, global or on a submodule, would run with the model's forward."""
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def plain_gpt(model: torch.nn.Module) -> bool:
    """GPT's own forward, block, attention and MLP classes, and no forward hooks: a model whose step does no
    Python work beyond GPT's own, which is what the compiled CPU step computes and what a CUDA graph
    replays faithfully (it would do such work once, at capture). Linear and norm layers may be anything
    that computes with tensors (the CPU step checks them itself)."""
    if not isinstance(model, GPT) or type(model).forward is not GPT.forward or has_forward_hooks(model):
        return False
    return all(
        type(b) is Block and type(b.attn) is CausalSelfAttention and type(b.mlp) is MLP for b in model.transformer.h
    )


def compiled_decoder(model: GPT, cache: Any, visible: torch.Tensor) -> Any | None:
    """The decoding step that replaces the op-by-op forward where it applies, or None:

    - on CPUs, the compiled step (models/gpt_numba.py): GPT's own classes without forward hooks, float32,
      bf16 or numba-int8 weights, at most 16 rows (bf16 on CPUs with native bf16: 8), numba installed. The
      same results to float32 rounding, except for bf16 models, whose compiled step computes in float32
      (bf16 weights and KV cache, float32 activations and sums) where their forward computes in bf16 (so
      on CPUs with native bf16, a bf16 call of more than 8 rows computes its steps in bf16);
    - on CUDA devices, the model's forward with fixed shapes captured as a CUDA graph (models/gpt_graph.py):
      GPT's own classes (any Linear and norm layers) without forward hooks. The same results to the order
      of float additions.

    BIGMODEL_COMPILED_STEP=0 (or false, no, off) turns both off. Steps then run the forward op by op."""
    if hardware.switched_off("BIGMODEL_COMPILED_STEP") or not plain_gpt(model):
        return None
    device = _device(model)
    try:
        if device.type == "cuda":
            from bigmodel.models import gpt_graph

            return gpt_graph.GraphStep(model, cache, visible)
        if device.type != "cpu":
            return None
        from bigmodel.compress import int8_kernels  # (imports numba: not before the device is known)

        kernels = int8_kernels.compiled()
        return None if kernels is None else kernels.CompiledDecoder.build(model, cache, visible)
    except Exception as e:  # the op-by-op path decodes any model the forward accepts
        warnings.warn(f"the compiled decoding step is unavailable ({e!r}); decoding op by op", stacklevel=2)
        return None


def left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Prompts of different lengths as one batch, padded on the left: ids (N, L), real (N, L) bool (not
    padding), and each token's position id (N, L), counted from its row's first real token."""
    N, L = len(rows), max(len(p) for p in rows)
    ids = torch.full((N, L), pad, dtype=torch.long, device=device)
    real = torch.zeros((N, L), dtype=torch.bool, device=device)
    for i, p in enumerate(rows):
        ids[i, L - len(p) :] = torch.tensor(p, device=device)
        real[i, L - len(p) :] = True
    return ids, real, (real.cumsum(-1) - 1).clamp(min=0)


def _argmax(scores: torch.Tensor) -> torch.Tensor:
    """scores.argmax(-1): on the CPU through numpy, whose vectorised argmax over GPT-2's 50257 logits takes
    ~5 us against torch's ~50 (1% of a decoding step). Same answer: the first maximum, or the first NaN."""
    if scores.device.type != "cpu" or scores.dtype != torch.float32:
        return scores.argmax(-1)
    return torch.from_numpy(scores.numpy().argmax(-1))


@torch.inference_mode()  # cheaper than no_grad; only lists and fresh tensors leave the engine
def _decode_steps(
    model: GPT, rows: list[list[int]], new: int, cfg: ResolvedGeneration, with_logprobs: bool
) -> Iterator[Step]:
    device = _device(model)
    N, L, vocab = len(rows), max(len(p) for p in rows), model.config.vocab_size or 0
    pad = cfg.pad_id
    ids, real, positions = left_padded(rows, pad, device)
    padded = not bool(real.all())
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros((N, vocab), dtype=torch.bool, device=device)
        seen.scatter_(1, ids, real)
    generator = torch.Generator(device=device).manual_seed(cfg.seed) if cfg.seed is not None else None
    stop = torch.tensor(cfg.stop_ids, dtype=torch.long, device=device)

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(N, L + new)
        mask = prompt_mask(real) if padded else None
        prompt_positions = positions if padded else None
        linears = hardware.bf16_linears_in_float(model)  # bf16 models where bf16 is emulated (most CPUs)
        with linears:
            logits, _ = model(ids, cache=cache, last_only=True, position_ids=prompt_positions, attn_mask=mask)
        next_pos = positions[:, -1] + 1  # (N,)
        done = torch.zeros(N, dtype=torch.bool, device=device)
        compiled = compiled_decoder(model, cache, real) if new > 1 else None  # prompt keys: the real tokens
        for step in range(new):
            raw = logits[:, -1, :].float()  # (N, V)
            scores = process_logits(raw, seen, cfg)
            if cfg.do_sample:
                tok = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
            else:
                tok = _argmax(scores)
            tok = tok.masked_fill(done, pad)
            logprobs = raw.log_softmax(-1).gather(-1, tok[:, None]).squeeze(-1) if with_logprobs else None
            if len(stop):
                done = done | torch.isin(tok, stop)
            yield Step(tok, logprobs, done.clone())
            if step == new - 1 or bool(done.all()):
                return
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            if compiled is not None:
                try:
                    logits = compiled(tok, next_pos)  # (N, 1, V)
                except Exception as e:  # never seen; a compiled kernel must not break generation
                    warnings.warn(f"compiled decoding step failed ({e!r}); continuing op by op", stacklevel=2)
                    compiled = None
            if compiled is None:
                step_mask, pos = None, None
                if padded:  # (N, 1, 1, S), (N, 1): the step's keys are the real tokens and itself
                    mask = torch.ones(N, cache.pos + 1, dtype=torch.bool, device=device)
                    mask[:, :L] = real
                    step_mask, pos = mask[:, None, None, :], next_pos[:, None]
                with linears:
                    logits, _ = model(tok[:, None], cache=cache, last_only=True, position_ids=pos, attn_mask=step_mask)
            next_pos = next_pos + 1
    finally:
        model.train(was_training)


def generate(
    model: GPT,
    input_ids: torch.Tensor | list[int] | list[list[int]],
    *,
    attention_mask: torch.Tensor | list[int] | list[list[int]] | None = None,
    stop_strings: list[str] | None = None,
    tokenizer: Tokenizer | None = None,
    output_logprobs: bool = False,
    generation_config: Any = None,
    **kwargs: Any,
) -> Any:
    """Continue each row of `input_ids` (B, T); returns (B * num_return_sequences, T + new) token ids.

    Keywords as in transformers' `generate`: max_new_tokens, max_length, do_sample, temperature, top_k,
    top_p, min_p, repetition_penalty, num_return_sequences, eos_token_id, pad_token_id, plus `seed`. As
    in transformers they override `generation_config`, by default the model's own (`model.generation_config`:
    what from_pretrained read from generation_config.json, such as the end-of-text id to stop at).
    `attention_mask` (B, T) marks the real tokens of padded rows (either side); the prompts come back
    left-padded with the id the input was padded with. Rows that stop (an eos token, or a stop string,
    which needs `tokenizer`) are padded with pad_token_id, else the first eos id, as transformers pads
    them. With output_logprobs=True returns (ids, logprobs (N, new)).
    """
    cfg = config_for(model, kwargs, generation_config)
    prompts, input_pad, L = _prompts_from(input_ids, attention_mask)
    if stop_strings and tokenizer is None:
        raise ValueError("stop_strings needs tokenizer=... to see text")
    # lengths count the input's width L, columns of padding every row shares included, as transformers counts
    # them, and the result keeps that width: out[:, input_ids.shape[1]:] are the new tokens
    cfg.max_new_tokens = new_tokens(cfg, L, model.config.block_size)
    rows = [p for p in prompts for _ in range(cfg.num_return_sequences)]
    results = _complete(model, prompts, cfg, tokenizer if stop_strings else None, stop_strings, output_logprobs)
    width = max(len(r.token_ids) for r in results)
    out = torch.full((len(rows), L + width), cfg.pad_id, dtype=torch.long)
    for i, (p, r) in enumerate(zip(rows, results, strict=True)):
        out[i, : L - len(p)] = cfg.pad_id if input_pad is None else input_pad  # the prompt's padding, as given
        out[i, L - len(p) : L] = torch.tensor(p)
        out[i, L : L + len(r.token_ids)] = torch.tensor(r.token_ids, dtype=torch.long)
    out = out.to(_device(model))
    if not output_logprobs:
        return out
    lps = torch.zeros((len(rows), width))
    for i, r in enumerate(results):
        lps[i, : len(r.logprobs)] = torch.tensor(r.logprobs)
    return out, lps


def _prompts_from(input_ids: Any, attention_mask: Any) -> tuple[list[list[int]], int | None, int]:
    """One list of real token ids per row of `input_ids` (a tensor or lists, ragged lists too), keeping the
    tokens `attention_mask` marks; the id of the padding the mask left out (None without any); and the
    input's width (its longest row, padding included)."""
    ragged = isinstance(input_ids, list) and bool(input_ids) and isinstance(input_ids[0], list)
    if ragged:
        rows = [list(map(int, p)) for p in input_ids]
    else:
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        ids = ids[None] if ids.dim() == 1 else ids
        if ids.dim() != 2 or ids.size(1) == 0:
            raise ValueError(f"input_ids must be (batch, length>=1), got shape {tuple(ids.shape)}")
        rows = ids.tolist()
    width = max(map(len, rows))
    if attention_mask is None:
        return rows, None, width
    masks = attention_mask.tolist() if hasattr(attention_mask, "tolist") else list(attention_mask)
    masks = [masks] if not ragged and len(rows) == 1 and masks and not isinstance(masks[0], list) else masks
    if len(masks) != len(rows) or any(len(m) != len(r) for m, r in zip(masks, rows, strict=False)):
        raise ValueError("attention_mask must have the shape of input_ids")
    kept = [[t for t, m in zip(r, ms, strict=True) if m] for r, ms in zip(rows, masks, strict=True)]
    pairs = (pair for r, ms in zip(rows, masks, strict=True) for pair in zip(r, ms, strict=True))
    return kept, next((t for t, m in pairs if not m), None), width


# ----- text: incremental decoding and stop strings ----------------------------------------------------------
@dataclass
class TextStream:
    """Turns generated token ids into text chunks that are safe to show.

    A chunk never ends inside a UTF-8 character (the tokenizer's replacement character means the bytes of
    a character are split across tokens), and text that could be the start of a stop string is held back
    until it is known not to be one, so a stop string is never emitted, even split across tokens.

    Each token decodes only a short window of the latest ids, not the whole sequence again (which cost
    O(n) per token, ~0.3 ms at 4096 tokens). The window starts one complete piece of text back, so that
    decoders which treat a sequence's first token specially (dropping a leading space, say) see the same
    context as in the whole sequence (the piece must have text: a special token alone, which decodes to
    nothing, would leave the next token first); its text up to the last complete piece is known, and
    what follows is new.
    """

    tokenizer: Any
    stop_strings: list[str] | None = None
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the decoded text already returned
    stopped: bool = False
    tokens_before_stop: int = 0  # tokens wholly before the stop string
    _lengths: list[int] = field(default_factory=list)  # decoded length after each token
    _text: str = ""  # the text of ids[:_complete], which ends with a whole character
    _complete: int = 0
    _window: int = 0  # decoding starts at ids[_window] (an earlier complete point)...
    _window_text: str = ""  # ...where ids[_window:_complete] decode to this

    def _decoded(self) -> str:
        """The text of all ids so far, decoding only those from _window on."""
        window = self.tokenizer.decode(self.ids[self._window :], skip_special_tokens=True)
        text = self._text + window[len(self._window_text) :]
        if len(self.ids) > self._complete and not window.endswith("\ufffd"):  # complete up to here
            piece = self.tokenizer.decode(self.ids[self._complete :], skip_special_tokens=True)
            if piece:  # the next window starts at the last complete point (one that has text: see above)
                self._window, self._window_text = self._complete, piece
                self._text, self._complete = text, len(self.ids)
        return text

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self._decoded()
        self._lengths.append(len(text))
        found = [at for s in self.stop_strings or [] if (at := text.find(s, max(0, self.emitted - len(s) + 1))) >= 0]
        if found:  # cut at the earliest stop string, whichever it is
            at = min(found)
            self.stopped = True
            self.tokens_before_stop = sum(1 for n in self._lengths if n <= at)
            chunk, self.emitted = text[self.emitted : at], at
            return chunk
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":  # an incomplete UTF-8 character
            end -= 1
        end -= self._held_back(text[self.emitted : end])
        chunk, self.emitted = text[self.emitted : end], max(self.emitted, end)
        return chunk

    def _held_back(self, pending: str) -> int:
        """Length of the longest suffix of `pending` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop_strings or []:
            for n in range(min(len(s) - 1, len(pending)), best, -1):
                if pending.endswith(s[:n]):
                    best = n
                    break
        return best

    def finish(self) -> str:
        """The held-back rest once generation has ended without a stop string."""
        if self.stopped:
            return ""
        text = self._decoded()
        chunk, self.emitted = text[self.emitted :], len(text)
        return chunk


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (eos token or stop string) or "length"


def stream_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    stop_strings: list[str] | None = None,
    stats: dict[str, int] | None = None,
    **kwargs: Any,
) -> Iterator[str]:
    """Yield the continuation of `prompt` as text while it is generated (one sequence).

    Parameters are checked at once (ValueError), not when the first chunk is asked for. `stats`, when
    given, receives the number of generated tokens under "tokens".
    """
    cfg = _text_config(model, tokenizer, {"num_return_sequences": 1, **kwargs})  # (whatever the model's says)
    if cfg.num_return_sequences != 1:
        raise ValueError("stream_text streams one sequence; use generate_text for num_return_sequences > 1")
    steps = decode(model, [_encode_prompt(tokenizer, prompt)], cfg, logprobs=False)
    return _stream_chunks(steps, TextStream(tokenizer, stop_strings), stats if stats is not None else {})


def _text_config(model: GPT, tokenizer: Tokenizer, kwargs: dict[str, Any]) -> ResolvedGeneration:
    """config_for, stopping at the tokenizer's end-of-text id unless the keywords or the model say otherwise."""
    cfg = config_for(model, kwargs)
    if cfg.eos_token_id is None and "eos_token_id" not in kwargs:
        cfg.eos_token_id = tokenizer.eot_id
    return cfg


def _stream_chunks(steps: Iterator[Step], stream: TextStream, stats: dict[str, int]) -> Iterator[str]:
    stats["tokens"] = 0
    for step in steps:
        if bool(step.done[0]):
            break
        stats["tokens"] += 1
        chunk = stream.push(int(step.tokens[0]))
        if chunk:
            yield chunk
        if stream.stopped:
            return
    rest = stream.finish()
    if rest:
        yield rest


def generate_text(
    model: GPT, tokenizer: Tokenizer, prompts: str | list[str], *, stop_strings: list[str] | None = None, **kwargs: Any
) -> list[Completion]:
    """Continuations of each prompt (num_return_sequences each, in prompt order), stop strings removed."""
    cfg = _text_config(model, tokenizer, kwargs)
    prompts = [prompts] if isinstance(prompts, str) else prompts
    results = _complete(model, [_encode_prompt(tokenizer, p) for p in prompts], cfg, tokenizer, stop_strings)
    stops = set(cfg.stop_ids)
    for r in results:  # the text API leaves the stop token out of the ids as well as the text
        if r.token_ids and r.token_ids[-1] in stops and r.finish_reason == "stop":
            del r.token_ids[-1], r.logprobs[-1]
    return results


def _complete(
    model: GPT,
    prompts: list[list[int]],
    cfg: ResolvedGeneration,
    tokenizer: Tokenizer | None,
    stop_strings: list[str] | None,
    logprobs: bool = True,
) -> list[Completion]:
    """Run `decode` to the end and collect every row: its new ids (a final stop token included), their
    log-probabilities (left empty with logprobs=False), and, when a tokenizer is given, its text with stop
    strings cut off."""
    n = len(prompts) * cfg.num_return_sequences
    streams = [TextStream(tokenizer, stop_strings) for _ in range(n)] if tokenizer is not None else None
    rows = [Completion("", [], [], "length") for _ in range(n)]
    active = [True] * n
    for step in decode(model, prompts, cfg, logprobs=logprobs):
        lps = step.logprobs.tolist() if step.logprobs is not None else None
        for i, t in enumerate(step.tokens.tolist()):
            if not active[i]:
                continue
            r = rows[i]
            r.token_ids.append(t)
            if lps is not None:
                r.logprobs.append(lps[i])
            if bool(step.done[i]):  # a stop token
                active[i], r.finish_reason = False, "stop"
            elif streams is not None:
                r.text += streams[i].push(t)
                if streams[i].stopped:  # a stop string: keep only the tokens wholly before it
                    active[i], r.finish_reason = False, "stop"
                    del r.token_ids[streams[i].tokens_before_stop :], r.logprobs[streams[i].tokens_before_stop :]
        if not any(active):
            break
    if streams is not None:
        for r, stream in zip(rows, streams, strict=True):
            r.text += stream.finish()
    return rows


def _encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    return tokenizer.encode(prompt, add_special_tokens=False) if prompt else [tokenizer.eot_id]  # (as the data)


# ----- the command ------------------------------------------------------------------------------------------
def cast_for_inference(model: GPT, dtype: str = "auto") -> GPT:
    """Weights for decoding: fp32, bf16, or int8 weights (see compress/quantize.py), in place.

    auto picks bf16 where bf16 is native (GPUs with bf16, CPUs with AVX512-BF16/AMX), else fp32. On a
    Linux CPU the weights then move onto huge pages (hardware.weights_on_huge_pages): decoding streams
    them every step.
    """
    device = model.transformer.wte.weight.device
    if dtype == "auto":
        dtype = "bf16" if hardware.native_bf16(device) else "fp32"
    if dtype == "fp32":
        model = model.float()
    elif dtype == "bf16":
        model = model.to(torch.bfloat16)
    elif dtype == "int8":
        from bigmodel.compress.quantize import quantize_int8

        model = quantize_int8(model)
    else:
        raise ValueError(f"dtype {dtype!r} is not one of auto, fp32, bf16, int8")
    if device.type == "cpu":
        hardware.weights_on_huge_pages(model)
    return model


def load_for_inference(model_path: str, dtype: str = "auto") -> tuple[GPT, Tokenizer]:
    """Model (in the requested dtype, on the GPU when there is one, as `bigmodel eval` and `train` run) and
    its tokenizer from a model or run directory."""
    from bigmodel.data.tokenizer import Tokenizer
    from bigmodel.evaluation import resolve_model_dir

    model_dir = resolve_model_dir(model_path)
    model = GPT.from_pretrained(model_dir)
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file()):
        raise UserError(f"{model_dir} has no tokenizer.json; generate needs the model's tokenizer beside it")
    device = hardware.default_device()
    if dtype == "int8":
        from bigmodel.compress.quantize import int8pack_runs_on

        if not int8pack_runs_on(device):
            warnings.warn(
                f"this torch has no {device.type} kernel for int8 weights (torch._weight_int8pack_mm): "
                f"decoding on the CPU (--dtype bf16 decodes on the {device.type} device)",
                stacklevel=2,
            )
            device = torch.device("cpu")
    return cast_for_inference(model.to(device), dtype), Tokenizer.from_pretrained(model_dir)


def run_generate(args: Any) -> int:
    model, tok = load_for_inference(args.model, args.dtype)
    params = dict(
        max_new_tokens=args.max_new_tokens,
        do_sample=not args.greedy,
        temperature=args.temperature,
        top_k=args.top_k,  # (0: off)
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        num_return_sequences=args.num_samples,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    produced = 0
    if args.num_samples == 1:  # stream: text appears as it is generated
        stats: dict[str, int] = {}
        chunks = stream_text(model, tok, args.prompt, stop_strings=args.stop, stats=stats, **params)
        sys.stdout.write(args.prompt)
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
        produced = stats["tokens"]
    else:
        results = generate_text(model, tok, args.prompt, stop_strings=args.stop, **params)
        for i, r in enumerate(results):
            if i:
                sys.stdout.write("\n" + "-" * 40 + "\n")
            sys.stdout.write(args.prompt + r.text + "\n")
            produced += len(r.token_ids)
    sys.stdout.flush()
    seconds = time.perf_counter() - t0
    print(f"generated {produced} tokens in {seconds:.2f}s ({produced / seconds:.1f} tokens/s)", file=sys.stderr)
    return 0
