"""GPT: shapes, loss, KV-cache decoding equals a full forward, tied weights, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bigmodel.config import GPTConfig
from bigmodel.models.gpt import GPT
from bigmodel.nn.attention import KVCache
from conftest import tiny_gpt

V = 64


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_forward_shapes_and_loss() -> None:
    model = tiny_gpt(V)
    idx, targets = _ids(3, 20), _ids(3, 20, seed=2)
    logits, loss = model(idx)
    assert logits.shape == (3, 20, V) and loss is None
    logits, loss = model(idx, targets)
    assert loss is not None and loss.shape == () and torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()))
    last, _ = model(idx, last_only=True)
    assert last.shape == (3, 1, V)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


def test_fresh_model_loss_is_near_uniform() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    _, loss = model(_ids(2, 32), _ids(2, 32, seed=3))
    assert loss is not None
    assert abs(loss.item() - math.log(V)) < 0.1  # std-0.02 init: nearly uniform predictions


def test_ignore_index() -> None:
    model = tiny_gpt(V)
    idx, targets = _ids(1, 10), _ids(1, 10, seed=2)
    masked = targets.clone()
    masked[0, 5:] = -1
    _, loss = model(idx, masked)
    logits, _ = model(idx)
    torch.testing.assert_close(loss, F.cross_entropy(logits[0, :5], targets[0, :5]))


def test_causal_future_tokens_do_not_change_the_past() -> None:
    model = tiny_gpt(V)
    a = _ids(1, 16)
    b = a.clone()
    b[0, 10:] = (b[0, 10:] + 1) % V
    la, _ = model(a)
    lb, _ = model(b)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_too_long_sequence_is_refused() -> None:
    model = tiny_gpt(V, block_size=16)
    with pytest.raises(ValueError, match=r"17 tokens is longer than the context window \(block_size=16\)"):
        model(_ids(1, 17))


@pytest.mark.parametrize("bias", [True, False])
def test_kv_cache_token_by_token_equals_full_forward(bias: bool) -> None:
    model = tiny_gpt(V, bias=bias)
    idx = _ids(2, 24)
    full, _ = model(idx)
    cache = model.new_cache(batch=2)
    steps = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(24)]
    assert cache.pos == 24
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_prefill_then_chunks_equals_full_forward() -> None:
    model = tiny_gpt(V)
    idx = _ids(2, 30)
    full, _ = model(idx)
    cache = model.new_cache(batch=2, max_len=30)
    parts = []
    for start, end in [(0, 7), (7, 8), (8, 13), (13, 14), (14, 30)]:  # a prompt, single tokens, chunks
        parts.append(model(idx[:, start:end], cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    last, _ = model(idx[:, :5], cache=model.new_cache(2), last_only=True)
    torch.testing.assert_close(last[:, 0], model(idx[:, :5])[0][:, -1], rtol=1e-5, atol=1e-5)


def test_kv_cache_limits() -> None:
    model = tiny_gpt(V, block_size=32)
    cache = model.new_cache(batch=1, max_len=8)
    model(_ids(1, 8), cache=cache)
    with pytest.raises(ValueError, match="KV cache holds 8 positions"):
        model(_ids(1, 1), cache=cache)
    big = KVCache(2, 1, 2, 64, 16)  # room for more positions than the model has
    model(_ids(1, 32), cache=big)
    with pytest.raises(ValueError, match="33 tokens is longer than the context window"):
        model(_ids(1, 1), cache=big)


def test_tied_weights_are_one_tensor() -> None:
    model = tiny_gpt(V)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names  # listed once
    with torch.no_grad():
        model.transformer.wte.weight[3].fill_(0.5)
    assert torch.all(model.lm_head.weight[3] == 0.5)
    _, loss = model(_ids(1, 8), _ids(1, 8, seed=2))
    loss.backward()
    assert model.lm_head.weight.grad is model.transformer.wte.weight.grad


@pytest.mark.parametrize("bias", [True, False])
def test_num_params(bias: bool) -> None:
    L, C, block = 3, 48, 40
    model = GPT(GPTConfig(vocab_size=V, block_size=block, n_layer=L, n_head=4, n_embd=C, bias=bias))
    per_block = 12 * C * C + (13 * C if bias else 2 * C)  # qkv, proj, mlp matrices (+ biases) and 2 LayerNorms
    expected = V * C + L * per_block + (2 * C if bias else C)  # + wte and ln_f, without wpe
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + block * C
    unique = {p.data_ptr(): p.numel() for p in model.parameters()}
    assert model.num_params(non_embedding=False) == sum(unique.values())


def test_num_params_matches_transformers() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=40, n_embd=48, n_layer=3, n_head=4))
    ours = GPT(GPTConfig(vocab_size=V, block_size=40, n_layer=3, n_head=4, n_embd=48))
    assert ours.num_params(non_embedding=False) == hf.num_parameters()


def test_vocab_size_required() -> None:
    with pytest.raises(ValueError, match="vocab_size is None"):
        GPT(GPTConfig(block_size=8, n_layer=1, n_head=1, n_embd=8))


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    idx = _ids(1, 16)
    model.eval()
    torch.testing.assert_close(model(idx)[0], model(idx)[0])
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
