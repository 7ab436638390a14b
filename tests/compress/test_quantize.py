"""Int8 weights: the per-row rounding bound, Int8Linear against F.linear with the dequantized weight, whole
models against fp32, and the dtypes generation and eval accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bigmodel.cli import main
from bigmodel.compress import int8_kernels, quantize
from bigmodel.compress.quantize import Int8Linear, int8_error, quantize_int8, quantize_rows
from bigmodel.generation import cast_for_inference, generate
from bigmodel.models.gpt import GPT
from bigmodel.train.loop import TrainResult
from conftest import tiny_gpt

V = 64
FBGEMM = pytest.mark.skipif(not quantize.fbgemm_available(), reason="needs torch's x86/fbgemm quantized engine")


@pytest.fixture(params=quantize.KERNELS)
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every int8 kernel this installation has: numba and int8pack are weight-only, fbgemm rounds activations."""
    name = str(request.param)
    if (name == "numba" and not int8_kernels.available()) or (name == "fbgemm" and not quantize.fbgemm_available()):
        pytest.skip(f"the {name} int8 kernel is not available here")
    monkeypatch.setenv("BIGMODEL_INT8_KERNEL", name)
    return name


def _weight(seed: int = 0) -> torch.Tensor:
    w = torch.randn(48, 40, generator=torch.Generator().manual_seed(seed))
    w[3] *= 100.0  # rows of very different ranges: one scale per row
    w[5] = 0.0  # an all-zero row must not divide by zero
    w[7, 11] = -w[7].abs().max() * 2  # a row whose extreme is negative
    return w


def test_quantize_rows_error_bound() -> None:
    w = _weight()
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scales.shape == (48,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    torch.testing.assert_close(scales[w.abs().amax(1) > 0], w.abs().amax(1)[w.abs().amax(1) > 0] / 127)
    deq = q.float() * scales[:, None]
    assert torch.isfinite(deq).all() and (deq[5] == 0).all()
    err = (w - deq).abs()
    assert (err <= scales[:, None] / 2 * (1 + 1e-5)).all()  # round to nearest: at most half a step per row
    assert err.max() > scales.min()  # the bound is per row: one global step would be much coarser
    assert int(q[7, 11]) == -127
    assert 0 < int8_error(w) < 0.01


def _int16_rounding_bound(x: torch.Tensor, lin: Int8Linear) -> torch.Tensor:
    """(rows, out): the most that rounding each activation row to int16 on its own scale (step
    max|x| / 32767, error at most half a step per activation) can move each output of the layer."""
    half_step = x.abs().amax(-1, keepdim=True) / 32767 / 2
    return half_step * (lin.weight_int8.float().abs().sum(1) * lin.scales)[None, :]


@pytest.mark.parametrize("rows", [1, 5, 21, 32, 33])  # numba: 4-row blocks, single rows, up to 32; then BLAS
def test_int8_linear_weight_only_kernels_match_dequantized_linear(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("numba", "int8pack"):
        if name == "numba" and not int8_kernels.available():
            continue
        monkeypatch.setenv("BIGMODEL_INT8_KERNEL", name)
        g = torch.Generator().manual_seed(rows)
        w, b = _weight(), torch.randn(48, generator=g)
        lin = Int8Linear(w, b)
        assert lin.kernel == name and lin.packed is None  # no second (fbgemm) copy of the weights
        x = torch.randn(rows, 7, 40, generator=g)[:, 3]  # (rows, 40), not contiguous
        y = lin(x)
        expected = F.linear(x, lin.dequantized(), b)
        assert y.shape == (rows, 48)
        close = 1e-5 * float(expected.abs().max())  # float32 rounding
        if name == "numba" and rows <= int8_kernels.MAX_ROWS:  # + rounding the activations to int16
            assert ((y - expected).abs() <= _int16_rounding_bound(x, lin) + close).all()
        else:
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=close)
        no_bias = Int8Linear(w, None)
        x3 = torch.randn(2, rows, 40, generator=g)  # any leading shape
        expected3 = F.linear(x3, no_bias.dequantized())
        bound = _int16_rounding_bound(x3.reshape(-1, 40), no_bias).reshape(expected3.shape)
        assert ((no_bias(x3) - expected3).abs() <= bound + 1e-5 * float(expected3.abs().max())).all()
        y16 = lin(x.bfloat16())
        assert y16.dtype == torch.bfloat16
        torch.testing.assert_close(y16.float(), expected, rtol=0, atol=0.03 * float(expected.abs().max()))


@pytest.mark.parametrize("inner", [8, 24, 40, 64, 100])
def test_int8pack_bf16_inputs_of_any_inner_size(inner: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's bf16 int8pack kernel on AVX512-BF16 CPUs returns garbage (or crashes) unless the inner size
    is a multiple of 16: those products must still come out right."""
    monkeypatch.setenv("BIGMODEL_INT8_KERNEL", "int8pack")
    g = torch.Generator().manual_seed(inner)
    lin = Int8Linear(torch.randn(50, inner, generator=g), torch.randn(50, generator=g))
    for rows in (1, 3, 17):
        x = torch.randn(rows, inner, generator=g).bfloat16()
        expected = F.linear(x.float(), lin.dequantized(), lin.bias)
        y = lin(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), expected, rtol=0, atol=0.02 * float(expected.abs().max()))


def test_forced_int8_kernel_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGMODEL_INT8_KERNEL", "vnni")
    with pytest.raises(ValueError, match="not one of numba, fbgemm, int8pack"):
        Int8Linear(_weight(), None)
    monkeypatch.setenv("BIGMODEL_INT8_KERNEL", "fbgemm")
    monkeypatch.setattr(quantize, "fbgemm_available", lambda: False)
    with pytest.raises(ValueError, match="not available"):
        Int8Linear(_weight(), None)


def test_int8_weights_where_torch_has_no_kernel_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU whose torch lacks a _weight_int8pack_mm kernel (CUDA's is recent): a clear error at quantization."""
    assert quantize.int8pack_runs_on(torch.device("cpu"))
    monkeypatch.setattr(quantize, "int8pack_runs_on", lambda device: device.type == "cpu")
    for forced in ("", "int8pack"):
        monkeypatch.setenv("BIGMODEL_INT8_KERNEL", forced)
        with pytest.raises(ValueError, match="no cuda kernel for int8 weights"):
            quantize.int8_kernel(torch.device("cuda"))
    assert quantize.int8_kernel(torch.device("cpu")) == "int8pack"  # (forced)


@FBGEMM
def test_int8_linear_fbgemm_error_within_activation_rounding(monkeypatch: pytest.MonkeyPatch) -> None:
    """fbgemm quantizes activations per call (7-bit range): the error is bounded by that rounding alone."""
    monkeypatch.setenv("BIGMODEL_INT8_KERNEL", "fbgemm")
    g = torch.Generator().manual_seed(2)
    w, b = _weight(), torch.randn(48, generator=g)
    lin = Int8Linear(w, b)
    x = torch.randn(21, 40, generator=g) * 3
    y = lin(x)
    expected = F.linear(x, lin.dequantized(), b)
    step = (x.max().clamp(min=0) - x.min().clamp(max=0)) / 127  # per-tensor activation step
    bound = step / 2 * lin.dequantized().abs().sum(1)  # (48,): half a step on every input
    assert ((y - expected).abs() <= bound * 1.01 + 1e-4).all()
    assert (y - expected).abs().max() < 0.02 * expected.abs().max()
    y16 = lin(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), expected, rtol=0, atol=0.03 * float(expected.abs().max()))


def test_quantize_int8_model_logits_close_to_fp32(kernel: str) -> None:
    model = tiny_gpt(V, scale=3.0)
    idx = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, _ = model(idx)
    q = quantize_int8(tiny_gpt(V, scale=3.0))
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert isinstance(q.lm_head, Int8Linear)
    assert q.transformer.wte.weight.dtype == torch.float32  # the embedding lookup stays float
    with torch.no_grad():
        got, _ = q(idx)
    assert got.dtype == torch.float32
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
    if kernel != "fbgemm":  # weight-only: exactly the fp32 model with every Linear weight rounded to int8
        ref = tiny_gpt(V, scale=3.0)
        with torch.no_grad():
            for name, m in ref.named_modules():
                if isinstance(m, nn.Linear):
                    m.weight = nn.Parameter(q.get_submodule(name).dequantized())  # unties lm_head too
            rounded, _ = ref(idx)
        torch.testing.assert_close(got, rounded, rtol=1e-4, atol=1e-4)


def test_int8_generation(kernel: str) -> None:
    model = tiny_gpt(V, block_size=48, scale=3.0, pos_scale=10.0)
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    fp32 = generate(model, idx, max_new_tokens=20)
    q = cast_for_inference(tiny_gpt(V, block_size=48, scale=3.0, pos_scale=10.0), "int8")
    assert isinstance(q.lm_head, Int8Linear)
    out, lps = generate(q, idx, max_new_tokens=20, output_logprobs=True)
    assert out.shape == (2, 25) and torch.equal(out[:, :5], idx)
    assert (out == fp32).float().mean() > 0.8 and torch.isfinite(lps).all()
    sampled = generate(q, idx, max_new_tokens=20, do_sample=True, seed=0)
    assert torch.equal(sampled, generate(q, idx, max_new_tokens=20, do_sample=True, seed=0))


def test_bf16_generation() -> None:
    model = tiny_gpt(V, block_size=48, scale=3.0, pos_scale=10.0)
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, _ = model(idx)
    fp32_tokens = generate(model, idx, max_new_tokens=20)
    b16 = cast_for_inference(model, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in b16.parameters())
    with torch.no_grad():
        got, _ = b16(idx)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=0.03 * float(expected.abs().max()))
    out, lps = generate(b16, idx, max_new_tokens=20, output_logprobs=True)
    assert out.shape == (2, 25) and lps.dtype == torch.float32 and torch.isfinite(lps).all()
    assert (out == fp32_tokens).float().mean() > 0.8
    assert cast_for_inference(b16, "fp32").transformer.wte.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="int4"):
        cast_for_inference(b16, "int4")


def test_int8_model_stays_causal(kernel: str) -> None:
    q = quantize_int8(tiny_gpt(V, scale=3.0))
    a = torch.randint(0, V, (1, 16), generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 7) % V
    with torch.no_grad():
        la, _ = q(a)
        lb, _ = q(b)
    torch.testing.assert_close(la[:, :10], lb[:, :10])  # changing the future must not change the past


def test_int8_batch_rows_equal_each_prompt_alone(kernel: str) -> None:
    q = quantize_int8(tiny_gpt(50, block_size=48, scale=3.0, pos_scale=10.0))
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [0, 4, 0, 2]]
    _, lps = generate(q, prompts, max_new_tokens=8, output_logprobs=True)
    for i, p in enumerate(prompts):
        _, alone = generate(q, [p], max_new_tokens=8, output_logprobs=True)
        torch.testing.assert_close(lps[i], alone[0], rtol=1e-4, atol=1e-4)


def test_eval_with_int8_weights(
    tiny_run: tuple[TrainResult, object], bpe_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = str(tiny_run[0].run_dir)
    scores = {}
    for dtype in ("fp32", "int8"):
        assert main(["eval", run, "--data", str(bpe_data), "--dtype", dtype, "--max-tokens", "1024"]) == 0
        out = capsys.readouterr().out
        assert len(out.strip().splitlines()) == 1
        scores[dtype] = json.loads(out)
        assert set(scores[dtype]) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert scores["int8"]["tokens"] == scores["fp32"]["tokens"]
    assert scores["int8"]["loss"] != scores["fp32"]["loss"]  # the weights really were quantized
    assert scores["int8"]["loss"] == pytest.approx(scores["fp32"]["loss"], rel=0.01)


def test_quantized_model_is_a_gpt() -> None:
    q = quantize_int8(tiny_gpt(V))
    assert isinstance(q, GPT) and not q.training
    assert all(not p.requires_grad for m in q.modules() if isinstance(m, Int8Linear) for p in m.parameters())


def test_int8_model_cast_to_bf16_after_quantization_still_runs(kernel: str) -> None:
    """model.to(bfloat16) after quantization turns the scales and biases bf16: the kernels take fp32 copies."""
    q = quantize_int8(tiny_gpt(V, scale=3.0))
    idx = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected, _ = q(idx)
        q.to(torch.bfloat16)
        got, _ = q(idx)
        step, _ = q(idx[:, :1])  # one row: the decoding kernels
    assert got.dtype == torch.bfloat16 and torch.isfinite(got.float()).all() and torch.isfinite(step.float()).all()
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=0.05 * float(expected.abs().max()))


def test_int8_kernels_propagate_nan(kernel: str) -> None:
    if kernel == "fbgemm":
        pytest.skip("fbgemm quantizes activations: a NaN has no int8 value")
    lin = Int8Linear(_weight(), torch.zeros(48))
    for rows in (1, 3):
        x = torch.randn(rows, 40)
        x[0, 5] = float("nan")
        y = lin(x)
        assert torch.isnan(y[0]).all() and not torch.isnan(y[1:]).any()


def test_dequantized_linear_in_chunks_equals_the_whole_weight() -> None:
    """Long inputs dequantize 256 weight rows at a time: several chunks, a partial last one, bias or none."""
    g = torch.Generator().manual_seed(0)
    w, b, x = torch.randn(600, 40, generator=g), torch.randn(600, generator=g), torch.randn(50, 40, generator=g)
    q, scales = quantize_rows(w)
    deq = q.float() * scales[:, None]
    torch.testing.assert_close(quantize._dequantized_linear(x, q, scales, b), F.linear(x, deq, b))
    torch.testing.assert_close(quantize._dequantized_linear(x, q, scales, None, chunk=7), F.linear(x, deq))


def test_int8_model_forward_with_gradients_enabled() -> None:
    """Outside no_grad the embeddings require grad: the kernels cannot take such inputs, BLAS can."""
    model = quantize_int8(tiny_gpt(V, block_size=48))
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(0))
    for length in (3, 40):  # rows the kernel would take, and rows for the chunked path
        logits, loss = model(ids[:, :length], ids[:, :length])
        assert loss is not None and loss.requires_grad
        loss.backward()
        with torch.no_grad():
            expected, _ = model(ids[:, :length])
        torch.testing.assert_close(logits.detach(), expected, rtol=1e-5, atol=1e-5)
