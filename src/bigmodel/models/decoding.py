"""Greedy and beam-search decoding for the encoder-decoder models (`seq2seq`, `rnn-seq2seq`).

A model plugs in through three methods (the `StepModel` protocol): `start(source)` encodes a batch and
returns the decoder state, `step(tokens, state)` feeds one token per row and returns next-token
log-probabilities with the new state (the Transformer keeps a KV cache in it, the RNN its hidden state),
and `reorder(state, index)` keeps / duplicates rows (beam search's bookkeeping).

Token conventions shared by both models: the last three ids of the vocabulary are end, start and pad
(`special_ids`); the ids below them are the tokenizer's (bytes, for the char tokenizer).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


def special_ids(vocab_size: int) -> tuple[int, int, int]:
    """(end, start, pad) ids: the vocabulary's last three."""
    return vocab_size - 3, vocab_size - 2, vocab_size - 1


class StepModel(Protocol):
    def start(self, source: torch.Tensor) -> Any: ...

    def step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]: ...

    def reorder(self, state: Any, index: torch.Tensor) -> Any: ...


@torch.no_grad()
def greedy(model: StepModel, source: torch.Tensor, max_len: int, bos: int, eos: int) -> list[list[int]]:
    """The most likely next token at every step, until end (not included) or `max_len` tokens per row."""
    B = source.shape[0]
    state = model.start(source)
    tokens = torch.full((B,), bos, dtype=torch.long, device=source.device)
    out = torch.zeros(B, 0, dtype=torch.long, device=source.device)
    done = torch.zeros(B, dtype=torch.bool, device=source.device)
    for _ in range(max_len):
        logp, state = model.step(tokens, state)  # (B, V)
        tokens = logp.argmax(-1)  # (B,)
        out = torch.cat([out, tokens[:, None]], 1)
        done |= tokens == eos
        if done.all():
            break
    return [_until(row, eos) for row in out.tolist()]


@torch.no_grad()
def beam_search(
    model: StepModel,
    source: torch.Tensor,
    max_len: int,
    bos: int,
    eos: int,
    num_beams: int = 4,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """The best of `num_beams` hypotheses per row, scored by sum log p / length ** length_penalty.

    Each step extends every live beam by every token, keeps the `num_beams` best continuations that do
    not end, and sets aside those that end (scored with their length, the end token included). A row is
    finished when it has `num_beams` ended hypotheses; at `max_len` the live beams count as ended too.
    """
    B, K = source.shape[0], num_beams
    device = source.device
    state = model.reorder(model.start(source), torch.arange(B, device=device).repeat_interleave(K))
    tokens = torch.full((B * K,), bos, dtype=torch.long, device=device)
    scores = torch.full((B, K), -torch.inf, device=device)
    scores[:, 0] = 0.0  # the K beams start identical: only one may extend, or all K would stay the same
    seqs = torch.zeros(B * K, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    for t in range(1, max_len + 1):
        logp, state = model.step(tokens, state)  # (B*K, V)
        V = logp.shape[-1]
        cand = (scores.view(B * K, 1) + logp.float()).view(B, K * V)  # (B, K*V): running log-prob sums
        top, idx = cand.topk(min(2 * K, K * V), dim=-1)  # (B, 2K): enough to find K that do not end
        new_scores = torch.full((B, K), -torch.inf, device=device)
        new_rows = torch.arange(B, device=device).repeat_interleave(K).view(B, K)  # (B, K) rows to continue
        new_tokens = torch.full((B, K), eos, dtype=torch.long, device=device)
        for b in range(B):
            kept = 0
            for score, i in zip(top[b].tolist(), idx[b].tolist(), strict=True):
                if len(finished[b]) >= K or kept == K or score == -torch.inf:
                    break
                row, token = b * K + i // V, i % V
                if token == eos:  # set aside, scored by its length (the end token included)
                    finished[b].append((score / t**length_penalty, seqs[row].tolist()))
                else:
                    new_scores[b, kept], new_rows[b, kept], new_tokens[b, kept] = score, row, token
                    kept += 1
        if all(len(f) >= K for f in finished):
            break
        rows = new_rows.flatten()
        state = model.reorder(state, rows)
        seqs = torch.cat([seqs[rows], new_tokens.view(-1, 1)], 1)
        tokens, scores = new_tokens.flatten(), new_scores
    length = max(1, seqs.shape[1])
    for b in range(B):  # rows that ran out of steps: their live beams compete too
        for k in range(K):
            if len(finished[b]) < K and scores[b, k] > -torch.inf:
                finished[b].append((float(scores[b, k]) / length**length_penalty, seqs[b * K + k].tolist()))
    return [max(f, key=lambda item: item[0])[1] for f in finished]


def _until(row: list[int], eos: int) -> list[int]:
    return row[: row.index(eos)] if eos in row else row
