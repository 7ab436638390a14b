"""Decoding steps of fixed shapes for GPUs, replayed from one captured CUDA graph.

Op by op, a decoding step of GPT-2 on a GPU launches a few hundred small kernels (12 layers of norms,
projections, attention and MLP), and at batch 1 the time goes into launching them from Python, not into
reading the weights. A CUDA graph records the step's kernels once and replays all of them with one
launch. A graph fixes every shape and address, so this step differs from the op-by-op one in one way:
attention runs over the whole preallocated KV cache under a mask that hides the positions not yet
written, and each new key and value goes to the position held in a tensor (`StaticCache.index`), not in
a Python int. Everything else is the model's own forward (any dtype, Int8Linear, swapped Linear
subclasses), so the logits equal the op-by-op step's up to the order of float additions.

A graph replays what the Python code did once, at capture, so nothing the forward sees from Python may
change between steps: StaticCache holds the cache's tensors and a position fixed at capture, never the
live KVCache. `GraphStep(model, cache, visible, capture=False)` runs the same fixed-shape step without a
graph, seeing exactly what the graph saw: on the CPU that is how the tests check it. The engine
(generation.py) takes the graph on CUDA devices for GPT's own classes (`plain_gpt` there) unless
BIGMODEL_COMPILED_STEP=0, and falls back to op-by-op steps with a warning if capturing or replaying
raises.
"""

from __future__ import annotations

from typing import Any

import torch

from bigmodel.models.gpt import GPT
from bigmodel.nn.attention import KVCache


class StaticCache:
    """The KV cache as a graph step sees it, with fixed shapes: `update` writes the new keys and values at
    the position held in `index` (a (1,) tensor on the cache's device) and returns all `max_len`
    positions, which the step's mask hides until they are written. It holds the cache's tensors, not the
    KVCache, whose `pos` changes every step: its own `pos` stays the position at capture (the forward reads
    it only for its length check, which GraphStep makes once for the whole cache), and `advance` does
    nothing (GraphStep advances the KVCache after each step)."""

    def __init__(self, cache: KVCache) -> None:
        self.k, self.v = cache.k, cache.v
        self.pos = cache.pos
        self.index = torch.zeros(1, dtype=torch.long, device=cache.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, nh, 1, hd) stored at position `index`; returns the whole cache (B, nh, max_len, hd)."""
        k_all, v_all = self.k[layer], self.v[layer]
        k_all.index_copy_(2, self.index, k)
        v_all.index_copy_(2, self.index, v)
        return k_all, v_all

    def advance(self, n: int) -> None:
        pass


class GraphStep:
    """Decoding steps of a GPT for the rows of `cache`, which the prefill filled: one new token per row per
    call, through the model's forward on fixed-shape inputs, captured once as a CUDA graph (capture=True,
    CUDA devices only) or run as it is (capture=False). For a model that does no Python work of its own
    in a step (generation.plain_gpt: the engine checks it), since a graph would do that work once only.

    visible (N, L) bool: the cache positions already filled that each row may attend to (its prompt's real
    tokens). Each call makes its own position visible to every row, as the op-by-op step does.
    """

    def __init__(self, model: GPT, cache: KVCache, visible: torch.Tensor, *, capture: bool = True) -> None:
        N, L = visible.shape
        if cache.max_len > model.config.block_size:  # (the forward's own check runs once, at capture)
            raise ValueError(
                f"a KV cache of {cache.max_len} positions is longer than the context window "
                f"(block_size={model.config.block_size})"
            )
        device = cache.k.device
        self.model, self.cache = model, cache
        self.view = StaticCache(cache)
        self.tokens = torch.zeros(N, 1, dtype=torch.long, device=device)  # the step's inputs, copied in
        self.positions = torch.zeros(N, 1, dtype=torch.long, device=device)
        self.mask = torch.zeros(N, 1, 1, cache.max_len, dtype=torch.bool, device=device)
        self.mask[:, 0, 0, :L] = visible
        self.graph: Any = None
        self.logits: torch.Tensor | None = None  # the graph's output buffer, rewritten by every replay
        if capture:
            self._capture()

    def _forward(self) -> torch.Tensor:
        logits, _ = self.model(
            self.tokens, cache=self.view, last_only=True, position_ids=self.positions, attn_mask=self.mask
        )
        return logits

    def _capture(self) -> None:
        """Record one step. CUDA graphs want a few eager runs on a side stream first, the stream the capture
        then uses (cuBLAS sets up its handle and workspace per stream); those runs write keys and values at
        the cache's next position, which the first real step overwrites, and no row sees that position
        until then."""
        self.view.index.fill_(self.cache.pos)
        device = self.tokens.device
        current = torch.cuda.current_stream(device)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self._forward()
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA work from the process's other threads does not break the capture
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
                self.logits = self._forward()
            self.graph = graph
        finally:  # a capture that fails can leave its stream current (its exit raises before restoring it)
            torch.cuda.set_stream(current)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens (N,), positions (N,) (each row's own position id) -> next-token logits (N, 1, V)."""
        pos = self.cache.pos
        self.cache.check_room(1)
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.view.index.fill_(pos)
        self.mask[:, 0, 0, pos] = True
        if self.graph is None:
            logits = self._forward()
        else:
            self.graph.replay()
            assert self.logits is not None
            logits = self.logits.clone()  # the next replay rewrites the buffer
        self.cache.advance(1)
        return logits
