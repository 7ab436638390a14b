"""GPT-2: learned positions, pre-LayerNorm blocks, GELU MLP, tied input/output embeddings.

Parameter names follow GPT-2's (transformer.h.N.attn.c_attn, ...), so the Hugging Face layout in
models/hf.py is a rename-free mapping (only GPT-2's Conv1D weights are stored transposed).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from bigmodel.config import GenerationConfig, GPTConfig
from bigmodel.nn.attention import CausalSelfAttention, KVCache, prompt_mask
from bigmodel.nn.losses import classification_loss

if TYPE_CHECKING:
    from bigmodel.data.tokenizer import Tokenizer


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's has none-or-both)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.c_fc(x), approximate="tanh")  # (B, T, 4C); GPT-2's "gelu_new"
        return self.dropout(self.c_proj(x))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, config.bias)
        self.attn = CausalSelfAttention(config.n_embd, config.n_head, config.dropout, config.bias)
        self.ln_2 = LayerNorm(config.n_embd, config.bias)
        self.mlp = MLP(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, attn_mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The trunk: token + position embeddings, the blocks, the final LayerNorm (GPT-2's `transformer.*`)."""

    def __init__(self, config: GPTConfig, vocab_size: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = LayerNorm(config.n_embd, config.bias)


class _LogitsAndLoss(NamedTuple):
    logits: torch.Tensor  # (B, T, V), or fewer positions with last_only / logits_to_keep
    loss: torch.Tensor | None


class LMOutput(_LogitsAndLoss):
    """What GPT's forward returns: unpack it (`logits, loss = model(x, y)`), or read it as transformers'
    outputs are read (`model(**enc).logits`, `model(ids, labels=ids).loss`).

    Two more attributes answer transformers' requests; they are not unpacked:
      cache          the KVCache the call read and extended (with use_cache=True, or a cache passed in);
                     `past_key_values` is its older name
      hidden_states  with output_hidden_states=True, a tuple of n_layer + 1 tensors (B, T, C): the
                     embeddings, each block's output, and last the final LayerNorm's output (as transformers)
    Being attributes, they do not survive what rebuilds the tuple from its two fields (`_replace`, pytree's
    flatten/unflatten, and so DDP with find_unused_parameters or static_graph).
    """

    cache: KVCache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None

    @property
    def past_key_values(self) -> KVCache | None:
        if self.cache is None:  # a loop copied from transformers, whose forward keeps a cache by default
            warnings.warn(
                "this output has no cache: bigmodel's forward keeps one only with use_cache=True "
                "(transformers' keeps one by default)",
                stacklevel=2,
            )
        return self.cache

    def to_tuple(self) -> tuple[Any, ...]:
        """transformers' tuple (its return_dict=False): loss, logits, cache, hidden_states, without the Nones."""
        return tuple(x for x in (self.loss, self.logits, self.cache, self.hidden_states) if x is not None)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        if config.vocab_size is None:
            raise ValueError("GPTConfig.vocab_size is None: set it to the tokenizer's vocabulary size")
        self.config = config
        # what `generate` starts from, as transformers' model.generation_config (from_pretrained reads a
        # directory's generation_config.json into it; save_pretrained writes what it sets)
        self.generation_config = GenerationConfig()
        self.activation_checkpointing = False  # recompute each block's activations in backward (train only)
        self.transformer = Transformer(config, config.vocab_size)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def tie_weights(self) -> None:
        """The output head reads the token embedding: one tensor, saved once (again after anything that
        replaces parameters, such as load_state_dict(assign=True))."""
        self.lm_head.weight = self.transformer.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks (FSDP shards, and activation checkpointing recomputes, one at a time)."""
        return list(self.transformer.h)

    @property
    def device(self) -> torch.device:
        """Where the weights are, as transformers' `model.device`: `tok(texts, return_tensors="pt").to(model.device)`
        moves the inputs there."""
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The embeddings' dtype, as transformers' `model.dtype` (float32 for int8 models: only their Linear
        layers are int8)."""
        return self.transformer.wte.weight.dtype

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); by default without position embeddings, as GPT-2 reports."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token: 6 * parameters for the matmuls + attention's 12 * L * T * C (PaLM app. B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd

    def forward(
        self,
        idx: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
        *,
        cache: KVCache | None = None,
        last_only: bool = False,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        label_smoothing: float = 0.0,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
    ) -> LMOutput | tuple[Any, ...]:
        """idx (B, T) token ids -> LMOutput: logits (B, T, V) (or (B, 1, V) with last_only) and the mean loss
        of `targets` (B, T), the next token at each position (targets of -1 are padding and ignored).

        `label_smoothing` (training only; see nn/losses.py) spreads that probability mass over the vocabulary
        in the loss.

        `cache`: a KVCache (`new_cache`) holding the positions before idx; the call stores idx's keys and
        values after them, and positions continue from there. For batches of padded prompts the generation
        engine passes `position_ids` (B, T) and a boolean `attn_mask` (B, 1, T, cached + T) saying which keys
        each query may see; otherwise attention is causal.

        transformers' keywords work too, with GPT2LMHeadModel's numbers:
          input_ids         for idx
          attention_mask    (B, cached + T), 1 on real tokens: padding is hidden as keys; positions are not
                            shifted by it (0..T-1 without a cache, as GPT2LMHeadModel has them)
          labels            (B, T), the inputs themselves, shifted inside (labels of -100 ignored)
          use_cache=True    start a KVCache (it grows with the positions stored, up to block_size) and
                            return it as `.cache`; pass it back as `cache=` or `past_key_values=` to continue.
                            Off by default here (transformers: on), so training and scoring never fill one;
                            reading `.past_key_values` of an output without one warns so. A cache keeps
                            values: gradients do not flow into keys and values earlier calls stored
          output_hidden_states=True   `.hidden_states`, see LMOutput
          logits_to_keep    n > 0: logits of the last n positions only; or a 1-D tensor of the positions to keep
          return_dict=False transformers' tuple (LMOutput.to_tuple) instead of the LMOutput
        """
        keep_some = not (isinstance(logits_to_keep, int) and logits_to_keep == 0)  # (transformers' 0: all)
        if last_only and keep_some:
            raise ValueError("pass last_only or logits_to_keep, not both")
        if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() != 1:
            raise ValueError(f"logits_to_keep: a count or a 1-D tensor of positions, not {tuple(logits_to_keep.shape)}")
        if output_attentions:
            raise ValueError(
                "output_attentions=True: attention weights are not kept (attention runs fused, through "
                "scaled_dot_product_attention)"
            )
        idx, cache, attn_mask = self._resolve_inputs(
            idx=idx, input_ids=input_ids, attention_mask=attention_mask, attn_mask=attn_mask,
            targets=targets, labels=labels, cache=cache, past_key_values=past_key_values, use_cache=use_cache,
            last_only=last_only or keep_some,
        )
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens is longer than the context window "
                f"(block_size={self.config.block_size})"
            )
        if position_ids is None:
            position_ids = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        t = self.transformer
        x = t.drop(t.wte(idx) + t.wpe(position_ids))  # (B, T, C)
        hidden: list[torch.Tensor] = []
        recompute = self.activation_checkpointing and self.training and cache is None
        for i, block in enumerate(t.h):
            if output_hidden_states:
                hidden.append(x)
            if recompute:  # keep only the block's input; its activations are recomputed during backward
                x = torch.utils.checkpoint.checkpoint(block, x, None, i, attn_mask, use_reentrant=False)
            else:
                x = block(x, cache, i, attn_mask)
        if cache is not None:
            cache.advance(T)
        x = t.ln_f(x)
        if output_hidden_states:
            hidden.append(x)
        if last_only:
            x = x[:, -1:, :]  # (B, 1, C): generation needs only the next-token logits
        elif keep_some:
            x = x[:, -logits_to_keep:] if isinstance(logits_to_keep, int) else x[:, logits_to_keep]
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = classification_loss(logits, targets, label_smoothing, ignore_index=-1)
        elif labels is not None:  # transformers' convention: position t predicts labels[t + 1]
            loss = classification_loss(logits[:, :-1], labels[:, 1:], label_smoothing, ignore_index=-100)
        out = LMOutput(logits, loss)
        if cache is not None and use_cache is not False:
            out.cache = cache
        if output_hidden_states:
            out.hidden_states = tuple(hidden)
        return out.to_tuple() if return_dict is False else out

    def _resolve_inputs(
        self,
        *,
        idx: torch.Tensor | None,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        attn_mask: torch.Tensor | None,
        targets: torch.Tensor | None,
        labels: torch.Tensor | None,
        cache: KVCache | None,
        past_key_values: KVCache | None,
        use_cache: bool | None,
        last_only: bool,
    ) -> tuple[torch.Tensor, KVCache | None, torch.Tensor | None]:
        """The token ids (idx, or transformers' input_ids), the cache (cache, past_key_values, or a new one
        for use_cache=True) and the attention mask (attn_mask, or the one transformers' attention_mask
        describes); a ValueError for inputs that contradict each other."""
        ids = input_ids if idx is None else idx
        if ids is None or (idx is not None and input_ids is not None):
            raise ValueError("pass the token ids once: as idx (the first argument) or as input_ids")
        if ids.dim() != 2:
            raise ValueError(f"token ids must be (batch, length), got shape {tuple(ids.shape)}")
        if labels is not None and (targets is not None or last_only):
            raise ValueError(
                "labels (transformers' unshifted targets) go without targets and last_only (or logits_to_keep)"
            )
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("pass the cache once: as cache or as past_key_values (its older name)")
            cache = past_key_values
        if cache is not None and not (hasattr(cache, "pos") and hasattr(cache, "advance")):
            raise ValueError(
                f"the cache must be a bigmodel KVCache (an earlier output's .cache, or model.new_cache(batch)), "
                f"not {type(cache).__name__}"
            )
        if cache is not None and cache.k.shape[1] != ids.shape[0]:
            raise ValueError(f"the cache holds {cache.k.shape[1]} rows, the token ids {ids.shape[0]}")
        if cache is None and use_cache:  # sized to what it holds, growing with it (transformers' grows too)
            cache = self.new_cache(ids.shape[0], max_len=ids.shape[1], grow=True)
        if attention_mask is None:
            return ids, cache, attn_mask
        if attn_mask is not None:
            raise ValueError("pass attention_mask (B, cached + T) or attn_mask (B, 1, T, cached + T), not both")
        real = torch.as_tensor(attention_mask, device=ids.device).bool()
        keys = ids.shape[1] + (cache.pos if cache is not None else 0)
        if real.shape != (ids.shape[0], keys):
            hint = ""
            if cache is None and real.dim() == 2 and real.shape[1] > keys:
                hint = " (no cache was passed: start one with use_cache=True, then pass out.cache)"
            raise ValueError(
                f"attention_mask {tuple(real.shape)} must be (batch, cached + new positions) = "
                f"{(ids.shape[0], keys)}{hint}"
            )
        return ids, cache, prompt_mask(real, queries=ids.shape[1])

    def new_cache(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None, *, grow: bool = False
    ) -> KVCache:
        """A KV cache for `batch` rows and `max_len` positions (the context window by default); with grow=True
        it grows as positions are added, up to the context window."""
        c = self.config
        return KVCache(
            c.n_layer,
            batch,
            c.n_head,
            max_len or c.block_size,
            c.n_embd // c.n_head,
            dtype=dtype or self.transformer.wte.weight.dtype,
            device=self.transformer.wte.weight.device,
            grow_to=c.block_size if grow else None,
        )

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Continue `input_ids` (B, T); keywords as in transformers' `generate`, overriding
        `self.generation_config` (see bigmodel.generation.generate)."""
        from bigmodel.generation import generate  # generation builds on models, not the other way round

        return generate(self, input_ids, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        allow_pickle: bool = False,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
    ) -> GPT:
        """Load a model directory (ours or one saved by transformers' GPT2LMHeadModel, sharded or not).

        A pytorch_model.bin is read (with torch.load(weights_only=True)) only when allow_pickle is True.
        `dtype` (or transformers' older name, `torch_dtype`): the weights' dtype, a torch dtype or its name
        ("float32", "bfloat16", "float16", or bigmodel's "fp32", "bf16", "fp16"), or "auto" for the dtype
        the token embedding is stored in (float32 unless that is bf16 or fp16; a bf16 checkpoint then loads
        without being widened to float32). float32 by default, where transformers 5 defaults to "auto".
        """
        from bigmodel.models.hf import load_gpt

        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass dtype or torch_dtype (its older name), not both")
        return load_gpt(path, allow_pickle, dtype if dtype is not None else torch_dtype)

    def save_pretrained(self, path: str | Path, tokenizer: Tokenizer | None = None) -> None:
        """Write config.json, model.safetensors, generation_config.json (and the tokenizer when given)."""
        from bigmodel.models.hf import save_gpt

        save_gpt(self, path, tokenizer)
