"""The fixed-shape decoding step (models/gpt_graph.py) against the model's own forward, op by op.

On the CPU the step runs without a graph (capture=False): the same forward on the same fixed-shape inputs
that a CUDA graph records. The capture itself is tested only where a CUDA device is present."""

from __future__ import annotations

import copy

import pytest
import torch

from bigmodel import generation
from bigmodel.generation import GenerationConfig, cast_for_inference, decode
from bigmodel.models import gpt_graph
from bigmodel.models.gpt import GPT
from bigmodel.models.gpt_graph import GraphStep
from conftest import tiny_gpt

V = 50
PROMPTS = [[3, 14, 15, 9, 2], [6, 5], [35, 8, 9, 7, 9, 3, 2, 3], [1]]  # ragged: left-padded rows
TOLERANCE = {"fp32": 1e-5, "int8": 1e-5, "bf16": 3e-2}  # bf16: sums of another length round differently


def _model(dtype: str) -> GPT:
    model = tiny_gpt(V, block_size=48, n_layer=2, n_head=4, n_embd=32, scale=3.0, pos_scale=10.0)
    return cast_for_inference(model, dtype)


def _prefilled(model: GPT, prompts: list[list[int]], max_len: int) -> tuple:
    """Two caches filled by the same left-padded prefill, with each row's positions and visible keys."""
    N, L = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(N, L, dtype=torch.long)
    real = torch.zeros(N, L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :], real[i, L - len(p) :] = torch.tensor(p), True
    positions = (real.cumsum(-1) - 1).clamp(min=0)
    mask = ((torch.ones(L, L, dtype=torch.bool).tril() & real[:, None, :]) | torch.eye(L, dtype=torch.bool))[:, None]
    caches = []
    for _ in range(2):
        cache = model.new_cache(N, max_len)
        logits, _ = model(ids, cache=cache, last_only=True, position_ids=positions, attn_mask=mask)
        caches.append(cache)
    return caches, real, positions[:, -1] + 1, logits[:, -1].argmax(-1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_fixed_shape_steps_equal_the_forward(dtype: str) -> None:
    """Padded rows at their own positions, several steps: logits, the cache's contents and its position."""
    model = _model(dtype)
    tol = TOLERANCE[dtype]
    with torch.inference_mode():
        (cache, ref_cache), real, pos, tok = _prefilled(model, PROMPTS, 16)
        step = GraphStep(model, cache, real, capture=False)
        N, L = real.shape
        for i in range(16 - L):
            got = step(tok, pos)
            visible = torch.ones(N, ref_cache.pos + 1, dtype=torch.bool)
            visible[:, :L] = real
            expected, _ = model(tok[:, None], cache=ref_cache, last_only=True, position_ids=pos[:, None],
                                attn_mask=visible[:, None, None, :])
            assert got.shape == expected.shape == (N, 1, V)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
            assert cache.pos == ref_cache.pos == L + i + 1
            tok, pos = expected[:, -1].argmax(-1), pos + 1
        torch.testing.assert_close(cache.k, ref_cache.k, rtol=tol, atol=tol)
        torch.testing.assert_close(cache.v, ref_cache.v, rtol=tol, atol=tol)
        with pytest.raises(ValueError, match="KV cache holds 16 positions"):
            step(tok, pos)


def _steps(model: GPT, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch, fixed: bool, **kw) -> tuple:
    """decode() with the fixed-shape step in place of the CPU's compiled one, or op by op."""
    made = []

    def fixed_shape(model, cache, visible):  # type: ignore[no-untyped-def]
        made.append(GraphStep(model, cache, visible, capture=False))
        return made[-1]

    monkeypatch.setattr(generation, "compiled_decoder", fixed_shape if fixed else lambda *a: None)
    steps = list(decode(model, prompts, GenerationConfig(max_new_tokens=12, **kw)))
    assert len(made) == int(fixed)
    return torch.stack([s.tokens for s in steps]), torch.stack([s.logprobs for s in steps])


@pytest.mark.parametrize(
    "kw",
    [{}, {"num_return_sequences": 2, "do_sample": True, "seed": 3, "top_k": 5}, {"repetition_penalty": 1.3}],
)
def test_the_engine_decodes_the_same_through_the_fixed_shape_step(kw: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("fp32")
    for prompts in (PROMPTS, PROMPTS[:1]):
        ref_tokens, ref_logprobs = _steps(model, prompts, monkeypatch, False, **kw)
        tokens, logprobs = _steps(model, prompts, monkeypatch, True, **kw)
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


def test_cuda_models_take_the_graph_unless_they_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's choice for a CUDA model, without a GPU: the capture is recorded instead of run."""
    model = _model("fp32")
    captured = []
    monkeypatch.setattr(generation, "_device", lambda m: torch.device("cuda"))
    monkeypatch.setattr(GraphStep, "_capture", lambda self: captured.append(self))
    visible = torch.ones(1, 4, dtype=torch.bool)
    step = generation.compiled_decoder(model, model.new_cache(1, 8), visible)
    assert isinstance(step, GraphStep) and captured == [step]
    handle = model.transformer.h[0].register_forward_pre_hook(lambda mod, args: None)
    assert gpt_graph.has_forward_hooks(model)
    assert generation.compiled_decoder(model, model.new_cache(1, 8), visible) is None  # a graph runs no hook
    handle.remove()
    assert not gpt_graph.has_forward_hooks(model)

    class Custom(GPT):
        def forward(self, idx, targets=None, **kw):  # type: ignore[no-untyped-def]
            return super().forward(idx, targets, **kw)

    custom = Custom(model.config).eval()
    assert generation.compiled_decoder(custom, custom.new_cache(1, 8), visible) is None  # its own forward
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", "0")
    assert generation.compiled_decoder(model, model.new_cache(1, 8), visible) is None
    monkeypatch.delenv("BIGMODEL_COMPILED_STEP")
    assert len(captured) == 1

    def failing(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(GraphStep, "_capture", failing)
    with pytest.warns(UserWarning, match="simulated capture failure"):
        assert generation.compiled_decoder(model, model.new_cache(1, 8), visible) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_captured_steps_equal_op_by_op_steps_on_cuda(dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = copy.deepcopy(_model("fp32")).to("cuda")
    model = model.to(torch.bfloat16) if dtype == "bf16" else model
    kw = {"max_new_tokens": 12}
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", "0")
    ref = torch.stack([s.tokens for s in decode(model, PROMPTS, GenerationConfig(**kw))])
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", "1")
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: replays.append(1) or replay(self))
    tokens = torch.stack([s.tokens for s in decode(model, PROMPTS, GenerationConfig(**kw))])
    assert len(replays) == 11  # every step after the prefill
    assert torch.equal(tokens, ref)
