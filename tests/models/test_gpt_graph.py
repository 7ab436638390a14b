"""The fixed-shape decoding step (models/gpt_graph.py) against the model's own forward, op by op.

On the CPU the step runs without a graph (capture=False): the same forward on the same fixed-shape inputs,
seeing from Python exactly what a CUDA graph saw at capture. The capture itself is tested only where a
CUDA device is present."""

from __future__ import annotations

import copy

import pytest
import torch

from bigmodel import generation
from bigmodel.compress import quantize
from bigmodel.generation import GenerationConfig, cast_for_inference, decode
from bigmodel.models.gpt import GPT
from bigmodel.models.gpt_graph import GraphStep
from bigmodel.nn.attention import CausalSelfAttention, prompt_mask
from conftest import tiny_gpt

V = 50
PROMPTS = [[3, 14, 15, 9, 2], [6, 5], [35, 8, 9, 7, 9, 3, 2, 3], [1]]  # ragged: left-padded rows
TOLERANCE = {"fp32": 1e-5, "int8": 1e-5, "bf16": 3e-2}  # bf16: sums of another length round differently
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PLACES = [("cpu", False), pytest.param("cuda", True, marks=CUDA)]  # (device, captured)


def _model(dtype: str, device: str = "cpu") -> GPT:
    model = tiny_gpt(V, block_size=48, n_layer=2, n_head=4, n_embd=32, scale=3.0, pos_scale=10.0)
    return cast_for_inference(model.to(device), dtype)


def _prefilled(model: GPT, prompts: list[list[int]], max_len: int) -> tuple:
    """Two caches filled by the same left-padded prefill, with each row's positions and visible keys."""
    device = model.transformer.wte.weight.device
    ids, real, positions = generation.left_padded(prompts, 0, device)
    mask = prompt_mask(real)
    N = len(prompts)
    caches = []
    for _ in range(2):
        cache = model.new_cache(N, max_len)
        logits, _ = model(ids, cache=cache, last_only=True, position_ids=positions, attn_mask=mask)
        caches.append(cache)
    return caches, real, positions[:, -1] + 1, logits[:, -1].argmax(-1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize(("device", "captured"), PLACES)
def test_fixed_shape_steps_equal_the_forward(dtype: str, device: str, captured: bool) -> None:
    """Padded rows at their own positions, several steps: logits, the cache's contents and its position."""
    if dtype == "int8" and not quantize.int8pack_runs_on(torch.device(device)):
        pytest.skip("this torch has no int8 kernel for the device")
    model = _model(dtype, device)
    tol = TOLERANCE[dtype]
    with torch.inference_mode():
        (cache, ref_cache), real, pos, tok = _prefilled(model, PROMPTS, 16)
        step = GraphStep(model, cache, real, capture=captured)
        assert (step.graph is not None) == captured
        N, L = real.shape
        for i in range(16 - L):
            got = step(tok, pos)
            visible = torch.ones(N, ref_cache.pos + 1, dtype=torch.bool, device=device)
            visible[:, :L] = real
            expected, _ = model(tok[:, None], cache=ref_cache, last_only=True, position_ids=pos[:, None],
                                attn_mask=visible[:, None, None, :])
            assert got.shape == expected.shape == (N, 1, V)
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
            assert cache.pos == ref_cache.pos == L + i + 1
            assert step.view.pos == L  # what the forward sees from Python stays as it was at capture
            tok, pos = expected[:, -1].argmax(-1), pos + 1
        torch.testing.assert_close(cache.k, ref_cache.k, rtol=tol, atol=tol)
        torch.testing.assert_close(cache.v, ref_cache.v, rtol=tol, atol=tol)
        with pytest.raises(ValueError, match="KV cache holds 16 positions"):
            step(tok, pos)
        with pytest.raises(ValueError, match="longer than the context window"):
            GraphStep(model, model.new_cache(N, 49), real, capture=False)  # block_size 48


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_the_fixed_shape_step_reads_no_tensor_value_in_python(dtype: str) -> None:
    """What capturing a CUDA graph asks of the step, checked without a GPU. Tensors on the meta device have
    shapes but no values, so every read of a value into Python (.item(), bool(), .tolist(), a shape that
    depends on values) raises there, as a host sync fails a capture or bakes a stale value into the graph.
    The step runs on them, int8 through the kernel GPUs use (torch._weight_int8pack_mm); a hook that reads
    a value shows that such a read is caught."""
    model = _model(dtype).to("meta")
    N, L = 2, 3
    cache = model.new_cache(N, 8)
    cache.advance(L)  # as if a prefill had filled L positions
    step = GraphStep(model, cache, torch.ones(N, L, dtype=torch.bool, device="meta"), capture=False)
    tok, pos = torch.zeros(N, dtype=torch.long, device="meta"), torch.full((N,), L, device="meta")
    with torch.inference_mode():
        for _ in range(2):
            logits = step(tok, pos)
        assert logits.shape == (N, 1, V) and logits.device.type == "meta"
        assert cache.pos == L + 2
        model.transformer.h[0].mlp.register_forward_hook(lambda mod, args, out: bool(out.abs().max() > 0))
        with pytest.raises(RuntimeError, match="meta"):
            step(tok, pos)


def _steps(model: GPT, prompts: list[list[int]], monkeypatch: pytest.MonkeyPatch, fixed: bool, **kw) -> tuple:
    """decode() through the fixed-shape step (captured on CUDA devices), or op by op."""
    made = []

    def fixed_shape(model, cache, visible):  # type: ignore[no-untyped-def]
        made.append(GraphStep(model, cache, visible, capture=cache.k.device.type == "cuda"))
        return made[-1]

    monkeypatch.setattr(generation, "compiled_decoder", fixed_shape if fixed else lambda *a: None)
    steps = list(decode(model, prompts, GenerationConfig(max_new_tokens=12, **kw)))
    assert len(made) == int(fixed)
    return torch.stack([s.tokens for s in steps]), torch.stack([s.logprobs for s in steps])


@pytest.mark.parametrize(
    "kw",
    [{}, {"num_return_sequences": 2, "do_sample": True, "seed": 3, "top_k": 5}, {"repetition_penalty": 1.3}],
)
@pytest.mark.parametrize(("device", "captured"), PLACES)
def test_the_engine_decodes_the_same_through_the_fixed_shape_step(
    kw: dict, device: str, captured: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _model("fp32", device)
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
    assert generation.has_forward_hooks(model)
    assert generation.compiled_decoder(model, model.new_cache(1, 8), visible) is None  # a graph runs no hook
    handle.remove()
    assert not generation.has_forward_hooks(model)

    class Custom(GPT):
        def forward(self, idx, targets=None, **kw):  # type: ignore[no-untyped-def]
            return super().forward(idx, targets, **kw)

    custom = Custom(model.config).eval()
    assert generation.compiled_decoder(custom, custom.new_cache(1, 8), visible) is None  # its own forward
    swapped = copy.deepcopy(model)
    swapped.transformer.h[1].attn.__class__ = type("Attention", (CausalSelfAttention,), {})
    assert generation.compiled_decoder(swapped, swapped.new_cache(1, 8), visible) is None  # may read cache.pos
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", "0")
    assert generation.compiled_decoder(model, model.new_cache(1, 8), visible) is None
    monkeypatch.delenv("BIGMODEL_COMPILED_STEP")
    assert len(captured) == 1

    def failing(self):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated capture failure")

    monkeypatch.setattr(GraphStep, "_capture", failing)
    with pytest.warns(UserWarning, match="simulated capture failure"):
        assert generation.compiled_decoder(model, model.new_cache(1, 8), visible) is None
