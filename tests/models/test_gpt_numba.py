"""The compiled decoding step (models/gpt_numba.py) against the model's own forward, op by op."""

from __future__ import annotations

import copy

import pytest
import torch

from bigmodel.compress import int8_kernels, quantize
from bigmodel.generation import GenerationConfig, cast_for_inference, compiled_decoder, decode
from bigmodel.models.gpt import GPT
from conftest import tiny_gpt

pytestmark = pytest.mark.skipif(not int8_kernels.available(), reason="needs numba")

V = 50
PROMPTS = [[3, 14, 15, 9, 2], [6, 5], [35, 8, 9, 7, 9, 3, 2, 3], [1]]  # ragged: left-padded rows


def _model(dtype: str, bias: bool = True) -> GPT:
    model = tiny_gpt(V, block_size=48, n_layer=2, n_head=4, n_embd=32, bias=bias, scale=3.0, pos_scale=10.0)
    return cast_for_inference(model, dtype)


def _run(model: GPT, prompts: list[list[int]], compiled: bool, monkeypatch: pytest.MonkeyPatch, **kw) -> tuple:
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", "1" if compiled else "0")
    steps = list(decode(model, prompts, GenerationConfig(max_new_tokens=20, **kw)))
    return torch.stack([s.tokens for s in steps]), torch.stack([s.logprobs for s in steps])


@pytest.mark.parametrize("dtype", ["fp32", "int8"])
@pytest.mark.parametrize("bias", [True, False])
def test_compiled_steps_equal_op_by_op_steps(dtype: str, bias: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model(dtype, bias)
    from bigmodel.models.gpt_numba import CompiledDecoder

    calls = []
    step = CompiledDecoder.__call__
    monkeypatch.setattr(CompiledDecoder, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    for prompts in (PROMPTS, PROMPTS[:1], [PROMPTS[2]] * 5):  # padded batch, one row, 5 rows (4-row blocks + 1)
        calls.clear()
        ref_tokens, ref_logprobs = _run(model, prompts, False, monkeypatch)
        assert not calls
        tokens, logprobs = _run(model, prompts, True, monkeypatch)
        assert len(calls) == 19  # every step after the prefill
        assert torch.equal(tokens, ref_tokens)
        torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


def test_compiled_step_logits_equal_the_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    """One step for three rows at different cache positions' worth of history, logits compared directly."""
    model = _model("fp32")
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache, ref_cache = model.new_cache(3, 16), model.new_cache(3, 16)
        model(ids, cache=cache)
        model(ids, cache=ref_cache)
        decoder = compiled_decoder(model, cache, torch.ones(3, 9, dtype=torch.bool))
        assert decoder is not None
        tok = torch.tensor([4, 0, 49])
        for step in range(5):
            got = decoder(tok, torch.full((3,), 9 + step))
            expected, _ = model(tok[:, None], cache=ref_cache, last_only=True)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            assert cache.pos == ref_cache.pos == 10 + step
            tok = expected[:, -1].argmax(-1)
        torch.testing.assert_close(cache.k, ref_cache.k, rtol=1e-5, atol=1e-6)  # the cache is shared with torch
        torch.testing.assert_close(cache.v, ref_cache.v, rtol=1e-5, atol=1e-6)


def test_compiled_decoder_declines_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    visible = torch.ones(1, 4, dtype=torch.bool)
    fp32 = _model("fp32")
    assert compiled_decoder(fp32, fp32.new_cache(1, 8), visible) is not None
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert compiled_decoder(bf16, bf16.new_cache(1, 8), visible) is None  # numba has no bf16
    rows = torch.ones(17, 4, dtype=torch.bool)
    assert compiled_decoder(fp32, fp32.new_cache(17, 8), rows) is None  # more rows run faster through BLAS

    class Custom(GPT):
        def forward(self, idx, targets=None, **kw):  # type: ignore[no-untyped-def]
            return super().forward(idx, targets, **kw)

    custom = Custom(fp32.config).eval()
    assert compiled_decoder(custom, custom.new_cache(1, 8), visible) is None  # its forward may differ
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", "0")
    assert compiled_decoder(fp32, fp32.new_cache(1, 8), visible) is None
    monkeypatch.delenv("BIGMODEL_COMPILED_STEP")
    if quantize.fbgemm_available():
        monkeypatch.setenv("BIGMODEL_INT8_KERNEL", "fbgemm")
        q = _model("int8")
        assert compiled_decoder(q, q.new_cache(1, 8), visible) is None  # the kernel the user asked for


def test_a_failing_compiled_step_warns_and_continues_op_by_op(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("int8")
    ref_tokens, ref_logprobs = _run(model, PROMPTS, False, monkeypatch)
    from bigmodel.models.gpt_numba import CompiledDecoder

    def broken(self, tokens, positions):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(CompiledDecoder, "__call__", broken)
    with pytest.warns(UserWarning, match="simulated kernel failure"):
        tokens, logprobs = _run(model, PROMPTS, True, monkeypatch)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs)


def test_sampling_with_a_seed_is_reproducible_on_the_compiled_path(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("int8")
    a, _ = _run(model, PROMPTS, True, monkeypatch, do_sample=True, seed=7, top_k=10)
    b, _ = _run(model, PROMPTS, True, monkeypatch, do_sample=True, seed=7, top_k=10)
    assert torch.equal(a, b)


def test_nan_activations_propagate_to_their_row_only() -> None:
    """The kernels may reassociate sums but not assume finite values: a NaN must not vanish or spread."""
    model = _model("int8")
    with torch.no_grad():
        model.transformer.wte.weight[5] = float("nan")
    ids = torch.tensor([[1, 2, 3], [4, 6, 7]])
    with torch.inference_mode():
        cache = model.new_cache(2, 8)
        model(ids, cache=cache)
        decoder = compiled_decoder(model, cache, torch.ones(2, 3, dtype=torch.bool))
        assert decoder is not None
        logits = decoder(torch.tensor([5, 6]), torch.tensor([3, 3]))
    assert torch.isnan(logits[0]).all() and torch.isfinite(logits[1]).all()
