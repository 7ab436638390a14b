"""`seq2seq`: the encoder-decoder Transformer (Vaswani et al. 2017), pre-norm, over byte tokens.

source (B, S) -> embeddings + sinusoidal positions -> encoder blocks [self-attention, feed-forward]
-> memory (B, S, C). target (B, T) -> embeddings + positions -> decoder blocks [causal self-attention,
cross-attention to the memory, feed-forward] -> LayerNorm -> logits (B, T, V). Every sub-layer is
x + f(LayerNorm(x)) (pre-norm, which trains without warmup tricks). With `tie_embeddings`, source and
target embeddings and the output projection are one matrix (the vocabularies are the same bytes).

Decoding (models/decoding.py) runs step by step with a KV cache: each decoder layer keeps the keys and
values of the tokens so far, and the cross-attention keys and values of the memory are computed once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.config import EncoderConfig, Seq2SeqConfig
from bigmodel.models.decoding import beam_search, greedy, special_ids
from bigmodel.models.directory import PretrainedModel
from bigmodel.nn.losses import classification_loss


def sinusoids(length: int, dim: int) -> torch.Tensor:
    """(length, dim) positional encodings: sin/cos of position / 10000^(2i/dim)."""
    pos = torch.arange(length, dtype=torch.float32)[:, None]  # (L, 1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))  # (dim/2,)
    out = torch.zeros(length, dim)
    out[:, 0::2] = torch.sin(pos * freq)
    out[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return out


class Attention(nn.Module):
    """Multi-head attention: queries from x, keys and values from `context` (x itself for self-attention)."""

    def __init__(self, n_embd: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head = n_head
        self.q = nn.Linear(n_embd, n_embd)
        self.kv = nn.Linear(n_embd, 2 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = dropout

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, D)

    def keys_values(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.kv(context).chunk(2, dim=-1)  # (B, S, C) each
        return self.heads(k), self.heads(v)  # (B, H, S, D)

    def forward(
        self,
        x: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """x (B, T, C) attends to k, v (B, H, S, D); mask (B, 1, T|1, S) True = may attend."""
        q = self.heads(self.q(x))  # (B, H, T, D)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal and mask is None)
        B, H, T, D = y.shape
        return self.proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)


class FeedForward(nn.Sequential):
    def __init__(self, n_embd: int, d_ff: int, dropout: float) -> None:
        super().__init__(nn.Linear(n_embd, d_ff), nn.GELU(), nn.Linear(d_ff, n_embd), nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    """Pre-norm bidirectional block (padding masked); also the trunk block of the BERT-style `encoder`."""

    def __init__(self, c: Seq2SeqConfig | EncoderConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(c.n_embd), Attention(c.n_embd, c.n_head, c.dropout)
        self.ln_2, self.ff = nn.LayerNorm(c.n_embd), FeedForward(c.n_embd, c.d_ff, c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        k, v = self.attn.keys_values(h)
        x = x + self.drop(self.attn(h, k, v, mask))
        return x + self.ff(self.ln_2(x))


@dataclass
class DecoderState:
    """What decoding carries between steps: the memory and its mask, and per-layer self / cross keys and values."""

    mask: torch.Tensor  # (B, 1, 1, S) source padding
    memory: torch.Tensor  # (B, S, C) the encoder's output
    self_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, H, t, D): the tokens fed so far
    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, H, S, D): computed at the first step
    pos: int = 0


class DecoderBlock(nn.Module):
    def __init__(self, c: Seq2SeqConfig) -> None:
        super().__init__()
        self.ln_1, self.self_attn = nn.LayerNorm(c.n_embd), Attention(c.n_embd, c.n_head, c.dropout)
        self.ln_2, self.cross_attn = nn.LayerNorm(c.n_embd), Attention(c.n_embd, c.n_head, c.dropout)
        self.ln_3, self.ff = nn.LayerNorm(c.n_embd), FeedForward(c.n_embd, c.d_ff, c.dropout)
        self.drop = nn.Dropout(c.dropout)

    def forward(
        self,
        x: torch.Tensor,
        cross: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """x (B, T, C) -> (B, T, C), the self-attention keys/values including these T tokens, and the
        cross-attention keys/values. `cross` is the memory (B, S, C), or its keys/values cached by an earlier
        step. Every weight is used inside forward(), which is where FSDP gathers a sharded block."""
        h = self.ln_1(x)
        k, v = self.self_attn.keys_values(h)  # (B, H, T, D)
        if past is not None:  # one new token: it may see every cached one, so no causal mask is needed
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        x = x + self.drop(self.self_attn(h, k, v, causal=past is None))
        cross_kv = self.cross_attn.keys_values(cross) if isinstance(cross, torch.Tensor) else cross  # (B, H, S, D)
        x = x + self.drop(self.cross_attn(self.ln_2(x), *cross_kv, mask))
        return x + self.ff(self.ln_3(x)), (k, v), cross_kv


class Seq2SeqTransformer(PretrainedModel):
    config_class = Seq2SeqConfig
    task = "seq2seq"
    positions: torch.Tensor

    def __init__(self, config: Seq2SeqConfig) -> None:
        super().__init__(config)
        if config.vocab_size is None:
            raise ValueError("Seq2SeqConfig.vocab_size is None: set it from the tokenizer")
        c, V = config, config.vocab_size
        self.eos, self.bos, self.pad = special_ids(V)
        self.src_embed = nn.Embedding(V, c.n_embd)
        self.tgt_embed = self.src_embed if c.tie_embeddings else nn.Embedding(V, c.n_embd)
        longest = max(c.max_source_len, c.max_target_len) + 2
        self.register_buffer("positions", sinusoids(longest, c.n_embd), persistent=False)
        self.drop = nn.Dropout(c.dropout)
        self.encoder = nn.ModuleList([EncoderBlock(c) for _ in range(c.n_encoder_layer)])
        self.ln_enc = nn.LayerNorm(c.n_embd)
        self.decoder = nn.ModuleList([DecoderBlock(c) for _ in range(c.n_decoder_layer)])
        self.ln_dec = nn.LayerNorm(c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, V, bias=False)
        self.apply(self._init)
        for embed in (self.src_embed, self.tgt_embed):  # x sqrt(C) in _embed: unit scale, like the positions
            nn.init.normal_(embed.weight, std=c.n_embd**-0.5)
        if c.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight  # one V x C matrix for all three

    @staticmethod
    def _init(module: nn.Module) -> None:
        """Glorot, as torch.nn.Transformer, with attention's query, key and value maps drawn as torch's one
        fused (3C, C) in-projection is: U(±sqrt(6 / 4C)). Separate Glorot draws for q (C, C) and kv (2C, C)
        start the attention logits ~1.6x larger; on `numbers` that cost ~1 point of exact match (3 seeds)."""
        if isinstance(module, nn.Linear):  # (apply() reaches an Attention's Linears before the Attention)
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Attention):
            bound = math.sqrt(6 / (4 * module.q.in_features))
            for weight in (module.q.weight, module.kv.weight):
                nn.init.uniform_(weight, -bound, bound)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, encoder then decoder (what FSDP shards one by one)."""
        return [*self.encoder, *self.decoder]

    def _embed(self, embed: nn.Embedding, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        T = ids.shape[1]
        if start + T > self.positions.shape[0]:
            raise ValueError(f"sequence of {start + T} tokens is longer than this model's positions")
        x = embed(ids) * math.sqrt(self.config.n_embd) + self.positions[start : start + T]  # (B, T, C)
        return self.drop(x)

    def encode(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source (B, S) -> memory (B, S, C) and its attention mask (B, 1, 1, S), False at padding."""
        mask = (source != self.pad)[:, None, None, :]
        x = self._embed(self.src_embed, source)
        for block in self.encoder:
            x = block(x, mask)
        return self.ln_enc(x), mask

    def forward(
        self, source: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing. target (B, T) = start, tokens, end, pad...; predicts target[:, 1:] from target[:, :-1].

        Returns logits (B, T-1, V) and the mean cross-entropy over non-pad target tokens.
        """
        memory, mask = self.encode(source)
        inputs, labels = target[:, :-1], target[:, 1:]
        x = self._embed(self.tgt_embed, inputs)  # (B, T-1, C)
        for block in self.decoder:
            x, _, _ = block(x, memory, mask)
        logits = self.lm_head(self.ln_dec(x))  # (B, T-1, V)
        loss = classification_loss(logits, labels, label_smoothing, ignore_index=self.pad)
        return logits, loss

    # ----- step-by-step decoding (the StepModel protocol of models/decoding.py) ---------------------------
    def start(self, source: torch.Tensor) -> DecoderState:
        memory, mask = self.encode(source)
        return DecoderState(mask, memory, [], [])  # the cross keys/values come with the first step

    def step(self, tokens: torch.Tensor, state: DecoderState) -> tuple[torch.Tensor, DecoderState]:
        """tokens (B,) -> next-token log-probabilities (B, V), with this token's keys/values cached."""
        x = self._embed(self.tgt_embed, tokens[:, None], state.pos)  # (B, 1, C)
        self_kv, cross_kv = [], []
        for i, block in enumerate(self.decoder):
            past = state.self_kv[i] if state.self_kv else None
            x, kv, ckv = block(x, state.cross_kv[i] if state.cross_kv else state.memory, state.mask, past)
            self_kv.append(kv)
            cross_kv.append(ckv)
        logits = self.lm_head(self.ln_dec(x[:, -1]))  # (B, V)
        return logits.float().log_softmax(-1), DecoderState(state.mask, state.memory, self_kv, cross_kv, state.pos + 1)

    def reorder(self, state: DecoderState, index: torch.Tensor) -> DecoderState:
        def pick(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
            return [(k[index], v[index]) for k, v in kv]

        memory = state.memory[index]
        return DecoderState(state.mask[index], memory, pick(state.self_kv), pick(state.cross_kv), state.pos)

    @torch.no_grad()
    def generate(
        self, source: torch.Tensor, max_len: int | None = None, num_beams: int | None = None
    ) -> list[list[int]]:
        """Output token ids (end token excluded) for each source row: greedy, or beam search with num_beams > 1."""
        return decode(self, source, max_len or self.config.max_target_len + 1, num_beams or self.config.num_beams)


def decode(model: Any, source: torch.Tensor, max_len: int, num_beams: int) -> list[list[int]]:
    """Shared by both seq2seq families: greedy for one beam, beam search otherwise."""
    _decode_under_fsdp(model)
    was_training = model.training
    model.eval()
    try:
        if num_beams <= 1:
            return greedy(model, source, max_len, model.bos, model.eos)
        return beam_search(model, source, max_len, model.bos, model.eos, num_beams)
    finally:
        model.train(was_training)


def _decode_under_fsdp(model: nn.Module) -> None:
    """FSDP2 gathers a sharded module's parameters around forward() only: make `start` and `step` (which use
    the embeddings and final norms outside forward) count as forwards too. A no-op on unsharded models."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    if isinstance(model, FSDPModule) and not getattr(model, "_decodes_under_fsdp", False):
        for name in ("start", "step"):
            register_fsdp_forward_method(model, name)
        object.__setattr__(model, "_decodes_under_fsdp", True)  # once: registering wraps the method again
