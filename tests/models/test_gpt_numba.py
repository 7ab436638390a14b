"""The compiled decoding step (models/gpt_numba.py) against the model's own forward, op by op."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel.compress import int8_kernels, quantize
from bigmodel.generation import GenerationConfig, cast_for_inference, compiled_decoder, decode
from bigmodel.models.gpt import GPT
from conftest import tiny_gpt

pytestmark = pytest.mark.skipif(not int8_kernels.available(), reason="needs numba")
gpt_numba = int8_kernels.compiled()  # models/gpt_numba.py (None without numba: every test is skipped)

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
    CompiledDecoder = gpt_numba.CompiledDecoder
    calls = []
    step = CompiledDecoder.__call__
    monkeypatch.setattr(CompiledDecoder, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    five = [[(7 * i + j) % V for j in range(6)] for i in range(5)]  # distinct rows: a 4-row block + 1
    for prompts in (PROMPTS, PROMPTS[:1], five):  # padded batch, one row, 5 rows
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
        for tokens, positions in (([4, V, 1], [14, 14, 14]), ([4, -1, 1], [14, 14, 14]), ([4, 0, 1], [14, 48, 14])):
            with pytest.raises(IndexError, match="outside the embedding tables"):  # not a read past the table
                decoder(torch.tensor(tokens), torch.tensor(positions))
        assert cache.pos == 14  # nothing stored


def test_compiled_decoder_declines_what_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    visible = torch.ones(1, 4, dtype=torch.bool)
    fp32 = _model("fp32")
    assert compiled_decoder(fp32, fp32.new_cache(1, 8), visible) is not None
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert compiled_decoder(bf16, bf16.new_cache(1, 8), visible) is not None  # read as bits, widened
    fp16 = copy.deepcopy(fp32).half()
    assert compiled_decoder(fp16, fp16.new_cache(1, 8), visible) is None
    rows = torch.ones(17, 4, dtype=torch.bool)
    assert compiled_decoder(fp32, fp32.new_cache(17, 8), rows) is None  # more rows run faster through BLAS

    class Custom(GPT):
        def forward(self, idx, targets=None, **kw):  # type: ignore[no-untyped-def]
            return super().forward(idx, targets, **kw)

    custom = Custom(fp32.config).eval()
    assert compiled_decoder(custom, custom.new_cache(1, 8), visible) is None  # its forward may differ
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", "0")
    assert compiled_decoder(fp32, fp32.new_cache(1, 8), visible) is None
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", "Off")  # the values every BIGMODEL_ switch takes
    assert compiled_decoder(fp32, fp32.new_cache(1, 8), visible) is None
    monkeypatch.delenv("BIGMODEL_COMPILED_STEP")
    if quantize.fbgemm_available():
        monkeypatch.setenv("BIGMODEL_INT8_KERNEL", "fbgemm")
        q = _model("int8")
        assert compiled_decoder(q, q.new_cache(1, 8), visible) is None  # the kernel the user asked for


def test_bf16_batches_past_eight_rows_decode_op_by_op_where_bf16_is_native(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the CPU multiplies in bf16, its bf16 matmuls outrun the compiled step's float32 products
    beyond NATIVE_BF16_MAX_ROWS rows; float32 and int8 weights, and emulated bf16, keep the compiled step."""
    from bigmodel import hardware

    limit = gpt_numba.NATIVE_BF16_MAX_ROWS
    fp32 = _model("fp32")
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    int8 = _model("int8")

    def decoder(model: GPT, rows: int) -> object:
        return compiled_decoder(model, model.new_cache(rows, 8), torch.ones(rows, 4, dtype=torch.bool))

    for native in (True, False):
        monkeypatch.setattr(hardware, "cpu_has_bf16", lambda native=native: native)
        assert decoder(bf16, limit) is not None
        assert (decoder(bf16, limit + 1) is None) == native
        assert decoder(fp32, limit + 1) is not None and decoder(int8, limit + 1) is not None
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)
    calls = []
    step = gpt_numba.CompiledDecoder.__call__
    monkeypatch.setattr(gpt_numba.CompiledDecoder, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    prompts = [[(5 * i + j) % V for j in range(4)] for i in range(limit + 1)]
    steps = list(decode(bf16, prompts, GenerationConfig(max_new_tokens=3)))
    assert len(steps) == 3 and steps[-1].tokens.shape == (limit + 1,) and not calls  # op by op, to the end
    list(decode(bf16, prompts[:limit], GenerationConfig(max_new_tokens=3)))
    assert len(calls) == 2  # the compiled step, after the prefill


def test_a_failing_compiled_step_warns_and_continues_op_by_op(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _model("int8")
    ref_tokens, ref_logprobs = _run(model, PROMPTS, False, monkeypatch)
    CompiledDecoder = gpt_numba.CompiledDecoder

    def broken(self, tokens, positions):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(CompiledDecoder, "__call__", broken)
    with pytest.warns(UserWarning, match="simulated kernel failure"):
        tokens, logprobs = _run(model, PROMPTS, True, monkeypatch)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs)


def test_a_step_failing_in_the_head_leaves_the_cache_for_the_op_by_op_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers have written this step's keys and values when the head fails: the fallback must redo the
    step at the same cache position."""
    model = _model("int8")
    ref_tokens, ref_logprobs = _run(model, PROMPTS, False, monkeypatch)
    head_step, calls = gpt_numba.head_step, []

    def failing_third(*args):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated head failure")
        return head_step(*args)

    monkeypatch.setattr(gpt_numba, "head_step", failing_third)
    with pytest.warns(UserWarning, match="simulated head failure"):
        tokens, logprobs = _run(model, PROMPTS, True, monkeypatch)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=1e-5, atol=1e-5)


def test_hooks_and_swapped_layers_decode_op_by_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the compiled layer does not know about (hooks, a Linear subclass, another norm) must not be skipped."""
    visible = torch.ones(1, 4, dtype=torch.bool)
    model = _model("fp32")
    handle = model.transformer.h[1].mlp.register_forward_hook(lambda mod, i, o: o * 0)
    assert compiled_decoder(model, model.new_cache(1, 8), visible) is None
    op_by_op, _ = _run(model, PROMPTS, False, monkeypatch)
    hooked, _ = _run(model, PROMPTS, True, monkeypatch)  # leaves BIGMODEL_COMPILED_STEP=1 set
    assert torch.equal(hooked, op_by_op)  # the hook took effect in every step
    handle.remove()
    assert compiled_decoder(model, model.new_cache(1, 8), visible) is not None

    class LoRALike(torch.nn.Linear):
        pass

    old = model.transformer.h[0].attn.c_proj
    model.transformer.h[0].attn.c_proj = LoRALike(old.in_features, old.out_features)
    assert compiled_decoder(model, model.new_cache(1, 8), visible) is None
    model.transformer.h[0].attn.c_proj = old
    model.transformer.h[0].ln_2 = torch.nn.LayerNorm(32)
    assert compiled_decoder(model, model.new_cache(1, 8), visible) is None


def test_unusable_kernels_fall_back_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """In a child forked after the kernels ran (numba's OpenMP would terminate it) nothing calls numba."""
    model = _model("int8")
    ref_tokens, _ = _run(model, PROMPTS, False, monkeypatch)
    monkeypatch.setattr(gpt_numba, "_usable", False)
    assert not int8_kernels.usable()
    assert compiled_decoder(model, model.new_cache(1, 8), torch.ones(1, 4, dtype=torch.bool)) is None
    tokens, _ = _run(model, PROMPTS, True, monkeypatch)
    assert torch.equal(tokens, ref_tokens)


def test_gelu_matches_torch_over_the_whole_range() -> None:
    x = torch.cat([torch.linspace(-40, 40, 20001), torch.tensor([-1e30, 1e30, float("nan")])])[None, :]
    got = x.clone()
    gpt_numba._gelu_tanh(got.numpy())
    expected = torch.nn.functional.gelu(x, approximate="tanh")
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-6, equal_nan=True)
    assert got[0, 0] == 0 and got[0, -3] == 0  # saturates exactly: GELU(-40) and GELU(-1e30) are 0


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


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    """A tensor rounded to bf16, as the bits the compiled code reads (uint16)."""
    return t.to(torch.bfloat16).view(torch.uint16).numpy()


def _widened(bits: np.ndarray) -> torch.Tensor:
    """The float32 values of bf16 bits."""
    return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()


def test_bf16_steps_compute_in_float32_with_the_rounded_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bf16 model's compiled steps widen its weights and KV cache to float32: their logits match the
    float32 forward of the same (rounded) weights up to the cache's bf16 rounding, ~20x closer than the
    model's own bf16 forward gets; and `decode` takes them on every step."""
    model = _model("bf16")
    reference = copy.deepcopy(model).float()  # the same weights exactly, computed in float32
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(3, 20)
        model(ids, cache=cache)
        decoder = compiled_decoder(model, cache, torch.ones(3, 9, dtype=torch.bool))
        assert decoder is not None
        tok, seq = torch.tensor([4, 0, 49]), ids
        for i in range(6):
            got = decoder(tok, torch.full((3,), 9 + i))
            assert got.dtype == torch.float32 and cache.pos == 10 + i
            seq = torch.cat([seq, tok[:, None]], 1)
            expected = reference(seq)[0][:, -1:]
            own = model(seq)[0][:, -1:].float()  # bf16 arithmetic
            error, own_error = float((got - expected).abs().max()), float((own - expected).abs().max())
            assert error < 1e-3 and error < own_error / 5, (error, own_error)
            tok = got[:, -1].argmax(-1)
        assert cache.k.dtype == torch.bfloat16 and bool(cache.k[:, :, :, 9:15].abs().sum(-1).gt(0).all())

    calls = []
    step = gpt_numba.CompiledDecoder.__call__
    monkeypatch.setattr(gpt_numba.CompiledDecoder, "__call__", lambda self, *a: calls.append(1) or step(self, *a))
    tokens, _ = _run(model, PROMPTS, True, monkeypatch)
    assert len(calls) == 19 and tokens.shape == (20, len(PROMPTS))


def test_attention_stores_keys_and_values_rounded_as_torch_rounds_to_bf16() -> None:
    """Into a bf16 cache (bits) this step's keys and values go rounded to nearest even, as torch's
    .to(torch.bfloat16): halfway cases both ways, values past bf16's largest to inf, subnormals, -0 and
    NaN; attention then reads every position widened back to float32."""
    M, nh, S, hd = 2, 3, 6, 16
    C = nh * hd
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((M, 3 * C)).astype(np.float32)
    bits = qkv.view(np.uint32)
    bits[0, C : C + 8] = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0x7F7FFFFF, 0x00000001, 0x80000000, 0]
    keys_and_values = np.r_[C : 3 * C]
    k = _bf16_bits(torch.randn(M, nh, S, hd, generator=torch.Generator().manual_seed(1)))
    v = _bf16_bits(torch.randn(M, nh, S, hd, generator=torch.Generator().manual_seed(2)))
    visible = np.ones((M, S), dtype=np.bool_)
    visible[1, 1] = False
    out = np.empty((M, C), dtype=np.float32)
    pos = 4
    gpt_numba._attend(qkv, k, v, pos, visible, out)
    stored = np.concatenate([k[:, :, pos].reshape(M, C), v[:, :, pos].reshape(M, C)], 1)
    np.testing.assert_array_equal(stored, _bf16_bits(torch.from_numpy(qkv[:, keys_and_values])))
    assert stored[0, 4] == 0x7F80  # float32's largest rounds up to inf
    # attention over positions 0..pos of the widened cache, in float32
    keys, values = _widened(k)[:, :, : pos + 1], _widened(v)[:, :, : pos + 1]
    q = torch.from_numpy(qkv[:, :C]).view(M, nh, 1, hd)
    mask = torch.from_numpy(visible[:, None, None, : pos + 1])
    expected = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask).reshape(M, C)
    torch.testing.assert_close(torch.from_numpy(out), expected, rtol=1e-5, atol=1e-5)
    qkv[1, C] = np.nan  # a NaN key: stored as a NaN, and it reaches that head's output only
    gpt_numba._attend(qkv, k, v, pos, visible, out)
    assert k[1, 0, pos, 0] == 0x7FC0
    assert np.isnan(out[1, :hd]).all() and np.isfinite(out[0]).all() and np.isfinite(out[1, hd:]).all()


@pytest.mark.parametrize("K", [3, 48, 771])
@pytest.mark.parametrize("M", [1, 2, 4, 5, 9])  # 1-3 rows one at a time, blocks of four, and rows left
def test_bf16_matmul_rows_equals_float32_products_of_the_widened_weights(K: int, M: int) -> None:
    rng = np.random.default_rng(K * 10 + M)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = torch.from_numpy(rng.standard_normal((29, K)).astype(np.float32)).bfloat16()
    bias = rng.standard_normal(29).astype(np.float32)
    out = np.empty((M, 29), dtype=np.float32)
    gpt_numba.matmul_rows(x, _bf16_bits(w), np.ones(29, np.float32), bias, out)
    expected = torch.from_numpy(x).double() @ w.double().T + torch.from_numpy(bias).double()
    torch.testing.assert_close(torch.from_numpy(out).double(), expected, rtol=1e-5, atol=1e-5 * K**0.5)


def _int16_reference(x: np.ndarray, q: np.ndarray, scales: np.ndarray, bias: np.ndarray) -> tuple:
    """What the int8 kernel computes, in float64: each row of x rounded to int16 on its own step
    (max|x| / 32767), exact integer dot products with the int8 rows, then the two scales and the bias.
    Also (M, N) how far the kernel may be from it: the kernel scales in float32 (relative error ~1e-7 of
    values up to 32767), so values within 0.01 of halfway between two integers may round either way."""
    step = np.abs(x).max(1, keepdims=True).astype(np.float64) / 32767
    scaled = x / step
    xq = np.rint(scaled)
    assert np.abs(xq).max() <= 32767
    halfway = np.abs(np.abs(scaled - np.trunc(scaled)) - 0.5) < 0.01  # (M, K)
    slack = (halfway.astype(np.float64) @ np.abs(q.T.astype(np.float64))) * step * scales[None, :]
    return (xq @ q.T.astype(np.float64)) * step * scales[None, :] + bias[None, :], slack


def _int8_and_float(x: np.ndarray, q: np.ndarray, scales: np.ndarray, bias: np.ndarray) -> tuple:
    """matmul_rows' output for these int8 weights, and the float kernel's (float32 products) beside it."""
    out, float_out = np.empty((x.shape[0], q.shape[0]), np.float32), np.empty((x.shape[0], q.shape[0]), np.float32)
    gpt_numba.matmul_rows(x, q, scales, bias, out)
    gpt_numba._matmul_float(x, q, scales, bias, float_out)
    return out, float_out


# K: one vectorised call (multiples of 16 up to 4096; for M < 4 in segments of SEGMENT, with a shorter last
# one at 800); a tail of K % 16; chunks of 4096 plus a tail.
# M: 1-3 rows (the segmented path), one block of four, blocks of four plus 1-3 rows left (3: shared loads).
@pytest.mark.parametrize("K", [16, 48, 40, 3, 800, 3072, 4096, 4112, 8200])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 9])  # 5-7, 9: 1-3 rows left after blocks of 4
def test_int8_matmul_rows_computes_exact_int16_products(K: int, M: int) -> None:
    rng = np.random.default_rng(K * 10 + M)
    N = 37
    x = (rng.standard_normal((M, K)) * rng.uniform(0.01, 100, (M, 1))).astype(np.float32)
    x[0, 0] = np.abs(x[0]).max() * 3  # the row's largest value lands exactly on +32767
    q = rng.integers(-127, 128, (N, K)).astype(np.int8)
    q[:, :16] = 127 * np.sign(x[:, :16].sum(0)).astype(np.int8)  # sums near the int32 bound within a chunk
    scales = rng.uniform(1e-3, 1.0, N).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    out = np.empty((M, N), dtype=np.float32)
    gpt_numba.matmul_rows(x, q, scales, bias, out)
    expected, slack = _int16_reference(x, q, scales, bias)
    magnitude = np.abs(x).max(1, keepdims=True) * np.abs(q).sum(1)[None, :] * scales[None, :]
    # float32 scaling only (the sums are exact), plus halfway values rounded the other way
    assert np.all(np.abs(out - expected) <= 1e-6 * magnitude + slack + 1e-6)


def test_int8_kernel_saturated_rows_do_not_overflow() -> None:
    """Every product at its largest, all of one sign, over 4096 elements (one int32 chunk) and beyond."""
    # M = 2: the segmented path of 1-3 rows; 5: a block of 4 rows and one left; 7: blocks of 4 and of 3
    for K, M in ((4096, 5), (4096, 2), (4096, 7), (8192 + 16, 5)):
        x = np.ones((M, K), dtype=np.float32)
        x[1::2] *= -1
        q = np.full((3, K), 127, dtype=np.int8)
        q[2] = -127
        out = np.empty((M, 3), dtype=np.float32)
        gpt_numba.matmul_rows(x, q, np.ones(3, np.float32), np.zeros(3, np.float32), out)
        sign = np.where(np.arange(M) % 2 == 0, 1.0, -1.0)[:, None]
        assert np.allclose(out, sign * np.array([127 * K, 127 * K, -127 * K]), rtol=1e-6)


@pytest.mark.skipif(not gpt_numba or not gpt_numba._compiles_for_avx512(), reason="AVX2 code is what this file ran")
def test_int8_kernel_compiled_for_avx2_on_an_avx512_cpu(tmp_path: Path) -> None:
    """The int8 sums' block width depends on the vector registers the code is compiled for (`_block`): on
    an AVX-512 host, the exactness and overflow tests run again in a process that compiles for AVX2 only."""
    import llvmlite.binding as llvm

    from conftest import REPO, SUBPROCESS_ENV

    wide = ("avx512", "avx10", "vnni", "amx", "evex512")
    features = [
        ("-" if not on or name.startswith(wide) or "vnni" in name else "+") + name
        for name, on in llvm.get_host_cpu_features().items()
    ]
    env = {
        **os.environ,
        **SUBPROCESS_ENV,
        "NUMBA_CPU_NAME": "haswell",
        "NUMBA_CPU_FEATURES": ",".join(features),
        "NUMBA_CACHE_DIR": str(tmp_path),
    }
    script = (
        "import sys, pytest\n"
        "from bigmodel.models import gpt_numba\n"
        "assert not gpt_numba._compiles_for_avx512() and gpt_numba._block(1) == gpt_numba._block(4) == 16\n"
        "sys.exit(pytest.main(['-q', '-o', 'addopts=', '-p', 'no:cacheprovider', 'tests/models/test_gpt_numba.py',\n"
        "    '-k', 'exact_int16_products or saturated_rows_do_not_overflow']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\n\d+ passed", done.stdout) and "failed" not in done.stdout, done.stdout[-3000:]


def test_int8_kernel_zero_tiny_and_non_finite_rows() -> None:
    """A zero row gives the bias; rows with NaN or inf, or too small to scale to int16 (their step would
    underflow), take float32 products, as the float kernel computes them."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((7, 64)).astype(np.float32)
    x[0] = 0.0
    x[2, 5] = np.nan
    x[3, 7] = np.inf
    x[4, 1] = -np.inf
    x[6] *= 1e-41  # denormal values: max|x| / 32767 would round to 0 or nearly
    q = rng.integers(-127, 128, (9, 64)).astype(np.int8)
    scales, bias = rng.uniform(0.1, 1, 9).astype(np.float32), rng.standard_normal(9).astype(np.float32)
    out, float_out = _int8_and_float(x, q, scales, bias)
    assert np.array_equal(out[0], bias)
    assert np.isnan(out[2]).all()
    np.testing.assert_array_equal(out[3:5], float_out[3:5])  # +-inf or NaN, element by element as float32
    # row 6 again without a bias, which would swamp its tiny products
    out[6:], float_out[6:] = _int8_and_float(x[6:], q, scales, np.zeros(9, np.float32))
    assert np.abs(float_out[6]).max() > 0
    np.testing.assert_array_equal(out[6], float_out[6])
    assert np.isfinite(out[[0, 1, 5]]).all()
    np.testing.assert_allclose(out[[1, 5]], _int16_reference(x[[1, 5]], q, scales, bias)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [3, 19, 771])
def test_int8_kernel_rows_with_huge_values_stay_right(K: int) -> None:
    """Values above 1e30 (x * 32767 would overflow float32) take the float kernel instead of rounding."""
    x = np.zeros((2, K), dtype=np.float32)
    x[:, -1] = [2e34, -3e35]  # last column: the scalar tail of the vector loops
    x[:, 0] = 1.0
    q = np.zeros((4, K), dtype=np.int8)
    q[:, -1], q[:, 0] = [100, -100, 1, 0], 7
    out, expected = _int8_and_float(x, q, np.full(4, 1e-30, np.float32), np.zeros(4, np.float32))
    np.testing.assert_array_equal(out, expected)
    assert out[0, 0] == pytest.approx(2e6) and out[1, 1] == pytest.approx(3e7)


def test_int8_weights_in_another_layout_take_the_float_path() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 40)).astype(np.float32)
    q = np.asfortranarray(rng.integers(-127, 128, (24, 40)).astype(np.int8))
    out, expected = _int8_and_float(x, q, np.ones(24, np.float32), np.zeros(24, np.float32))
    np.testing.assert_array_equal(out, expected)


def test_int8_linear_with_a_non_contiguous_weight_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 kernel reads contiguous rows: a weight buffer replaced by a strided view takes the float
    path (no wrong reads, no typing error)."""
    monkeypatch.setenv("BIGMODEL_INT8_KERNEL", "numba")
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    lin = quantize.Int8Linear(w, None)
    lin.weight_int8 = lin.weight_int8.t().contiguous().t()  # same values, column-major
    assert not lin.weight_int8.is_contiguous()
    x = torch.randn(3, 40)
    expected = torch.nn.functional.linear(x, lin.dequantized())
    torch.testing.assert_close(lin(x), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
