"""Causal multi-head self-attention through `scaled_dot_product_attention`, with a preallocated KV cache."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def prompt_mask(real: torch.Tensor, queries: int | None = None) -> torch.Tensor:
    """The attention mask (N, 1, T, S) of padded rows, real (N, S) bool marking their tokens, for queries at
    the last T = `queries` positions (all S by default): causal, padding hidden as keys, and every query
    may see itself (so no row of the softmax is empty)."""
    S = real.shape[1]
    T = S if queries is None else queries
    q = torch.arange(S - T, S, device=real.device)[:, None]  # (T, 1) each query's position
    k = torch.arange(S, device=real.device)  # (S,)
    return (((k <= q) & real[:, None, :]) | (k == q))[:, None]


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, written in place as decoding advances.

    k, v: (n_layer, B, n_head, max_len, head_dim). `pos` is the number of positions already stored; each
    layer calls `update`, and the model calls `advance` once all layers have seen the new positions.
    """

    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_head: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def check_room(self, n: int) -> None:
        """A ValueError unless n more positions fit (decoding steps that write the cache themselves ask too)."""
        if self.pos + n > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {self.pos + n} requested")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) at positions [pos, pos+T) and return all stored (B, nh, pos+T, hd)."""
        self.check_room(k.size(2))
        end = self.pos + k.size(2)
        k_all, v_all = self.k[layer], self.v[layer]  # (B, nh, max_len, hd) views
        k_all.narrow(2, self.pos, k.size(2)).copy_(k)
        v_all.narrow(2, self.pos, v.size(2)).copy_(v)
        return k_all.narrow(2, 0, end), v_all.narrow(2, 0, end)

    def advance(self, n: int) -> None:
        self.pos += n


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of a single query per row: q (B, nh, 1, hd), k/v (B, nh, S, hd), mask (B, 1, 1, S) or None."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, 1, S)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    return att.float().softmax(dim=-1).to(v.dtype) @ v  # (B, nh, 1, hd)


class CausalSelfAttention(nn.Module):
    """GPT-2 attention: one fused q,k,v projection, causal SDPA, output projection."""

    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, C); attn_mask, when given, is a boolean (B, 1, T, cached + T) mask of visible keys, which
        replaces causal masking: it must hide later positions itself (as `prompt_mask` does)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if cache is None:
            dropout = self.dropout if self.training else 0.0
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:  # padded rows: the mask says which keys each query sees
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        else:
            start = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, start+T, hd)
            if T == 1:  # decoding: one query per row; plain matmuls beat SDPA's kernels by ~10x here
                y = attend_one(q, k, v, attn_mask)
            elif attn_mask is not None:  # padded batch: the engine says which keys each query sees
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            else:  # several new tokens: causal among themselves, full view of the cached prefix
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))
