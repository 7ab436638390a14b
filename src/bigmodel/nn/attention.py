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

    With `grow_to`, asking for more than `max_len` positions reallocates the tensors (doubling, up to
    grow_to) instead of raising: the cache of transformers-style calls (`model(ids, use_cache=True)`), which
    then holds what was seen rather than the whole context window. The engine's caches keep their size:
    its compiled steps hold their tensors.
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
        grow_to: int | None = None,
    ) -> None:
        shape = (n_layer, batch, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.grow_to = grow_to
        self.pos = 0

    def check_room(self, n: int) -> None:
        """A ValueError unless n more positions fit (decoding steps that write the cache themselves ask too);
        a cache with `grow_to` grows first where that makes them fit."""
        need = self.pos + n
        if need <= self.max_len:
            return
        if self.grow_to is None or need > self.grow_to:
            raise ValueError(f"KV cache holds {self.grow_to or self.max_len} positions; {need} requested")
        size = min(self.grow_to, max(2 * self.max_len, need))
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:3], size, old.shape[4])
            new.narrow(3, 0, self.pos).copy_(old.narrow(3, 0, self.pos))
            setattr(self, name, new)
        self.max_len = size

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) at positions [pos, pos+T) and return all stored (B, nh, pos+T, hd).

        When k or v need gradients the cache keeps their values only and returns tensors of their own
        (later writes would change the views autograd saved): gradients then flow into this call's keys and
        values, not into those earlier calls stored."""
        self.check_room(k.size(2))
        end = self.pos + k.size(2)
        k_all, v_all = self.k[layer], self.v[layer]  # (B, nh, max_len, hd) views
        if k.requires_grad or v.requires_grad:
            k_all.narrow(2, self.pos, k.size(2)).copy_(k.detach())
            v_all.narrow(2, self.pos, v.size(2)).copy_(v.detach())
            return torch.cat([k_all.narrow(2, 0, self.pos), k], 2), torch.cat([v_all.narrow(2, 0, self.pos), v], 2)
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
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            if attn_mask is None:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
            else:  # padded rows: the mask says which keys each query sees
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        else:
            start = cache.pos
            k, v = cache.update(layer, k, v)  # (B, nh, start+T, hd)
            if T == 1 and not dropout:  # decoding: one query per row; plain matmuls beat SDPA's kernels ~10x here
                y = attend_one(q, k, v, attn_mask)
            else:  # several new tokens: the mask given (padded rows), else causal after the whole cached prefix
                if attn_mask is None:
                    attn_mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(diagonal=start)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))
