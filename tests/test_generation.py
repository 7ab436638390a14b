"""generate(): greedy and sampled decoding with a KV cache, as transformers' generate() behaves."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from bigmodel.generation import GenerationConfig, generate, process_logits
from bigmodel.models.gpt import GPT
from conftest import tiny_gpt

V = 50


@pytest.fixture(scope="module")
def model() -> GPT:
    return tiny_gpt(V, block_size=48, scale=3.0, pos_scale=10.0)


def _prompt(b: int = 2, t: int = 5, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _reference_greedy(model: GPT, idx: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding without a cache: a full forward per token."""
    for _ in range(n):
        logits, _ = model(idx)
        idx = torch.cat([idx, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


def test_greedy_is_deterministic_and_matches_full_forward_decoding(model: GPT) -> None:
    idx = _prompt()
    a = generate(model, idx, max_new_tokens=25)
    b = model.generate(idx, max_new_tokens=25)
    assert a.shape == (2, 30)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], idx)
    assert torch.equal(a, _reference_greedy(model, idx, 25))


def test_input_forms_and_lengths(model: GPT) -> None:
    out = generate(model, [3, 4, 5], max_new_tokens=4)
    assert out.shape == (1, 7) and out[0, :3].tolist() == [3, 4, 5]
    assert generate(model, [[3, 4, 5]], max_length=10).shape == (1, 10)  # prompt + new = max_length
    assert generate(model, [3, 4, 5]).shape == (1, 20)  # transformers' default max_length
    assert generate(model, [3, 4, 5], max_new_tokens=2, max_length=40).shape == (1, 5)  # max_new_tokens wins
    assert generate(model, [1] * 40, max_new_tokens=8).shape == (1, 48)  # exactly fills the context


def test_seed_makes_sampling_reproducible(model: GPT) -> None:
    idx = _prompt()
    kwargs: dict[str, Any] = dict(max_new_tokens=30, do_sample=True, temperature=1.5)
    a = generate(model, idx, seed=1, **kwargs)
    b = generate(model, idx, seed=1, **kwargs)
    c = generate(model, idx, seed=2, **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, generate(model, idx, max_new_tokens=30))  # sampling is not greedy here
    torch.manual_seed(5)  # without a seed, the global generator is used
    d = generate(model, idx, **kwargs)
    torch.manual_seed(5)
    assert torch.equal(d, generate(model, idx, **kwargs))


def test_top_k_1_and_tiny_top_p_equal_greedy(model: GPT) -> None:
    idx = _prompt()
    greedy = generate(model, idx, max_new_tokens=20)
    assert torch.equal(generate(model, idx, max_new_tokens=20, do_sample=True, top_k=1, seed=3), greedy)
    assert torch.equal(generate(model, idx, max_new_tokens=20, do_sample=True, top_p=1e-6, seed=3), greedy)
    assert torch.equal(generate(model, idx, max_new_tokens=20, do_sample=True, temperature=1e-4, seed=3), greedy)


def test_num_return_sequences(model: GPT) -> None:
    idx = _prompt(b=2, t=4)
    out = generate(model, idx, max_new_tokens=12, do_sample=True, temperature=2.0, num_return_sequences=3, seed=0)
    assert out.shape == (6, 16)
    for i in range(2):
        for j in range(3):
            assert torch.equal(out[i * 3 + j, :4], idx[i])  # rows grouped per prompt, as in transformers
    assert len({tuple(r) for r in out[:3, 4:].tolist()}) > 1, "samples of one prompt should differ"
    greedy = generate(model, idx, max_new_tokens=12, num_return_sequences=2)
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[2], greedy[3])


def test_eos_stops_a_single_row(model: GPT) -> None:
    idx = _prompt(b=1)
    free = generate(model, idx, max_new_tokens=20)[0, 5:].tolist()
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    out = generate(model, idx, max_new_tokens=20, eos_token_id=free[k])
    assert out.shape == (1, 5 + k + 1)
    assert out[0, 5:].tolist() == free[: k + 1]


def test_eos_pads_finished_rows(model: GPT) -> None:
    idx = _prompt(b=3, t=5, seed=4)
    free = generate(model, idx, max_new_tokens=20)[:, 5:].tolist()
    row = free[0]
    k = next(i for i in range(2, len(row)) if row[i] not in row[:i])
    eos = row[k]
    # expected: each row cut at its first eos and padded with eos; stop once every row has finished
    ends = [r.index(eos) + 1 if eos in r else len(r) for r in free]
    n = max(ends)
    expected = [r[:e] + [eos] * (n - e) for r, e in zip(free, ends, strict=True)]
    out = generate(model, idx, max_new_tokens=20, eos_token_id=eos)
    assert out[:, 5:].tolist() == expected
    assert torch.equal(out[:, :5], idx)


def test_training_mode_is_restored(model: GPT) -> None:
    model.train()
    try:
        generate(model, [1, 2], max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True, temperature=0.0), "temperature=0.0 must be > 0"),
        (dict(do_sample=True, temperature=-1.0), "temperature=-1.0 must be > 0"),
        (dict(do_sample=True, top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p=1.5 must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=0), "top_k=0 must be >= 1"),
        (dict(max_new_tokens=44), r"prompt \(5 tokens\) \+ max_new_tokens \(44\) exceeds the context window of 48"),
        (dict(max_length=49), "exceeds the context window"),
        (dict(max_new_tokens=0), "max_new_tokens=0 must be >= 1"),
        (dict(max_length=5), "nothing to generate"),
        (dict(num_return_sequences=0), "num_return_sequences=0"),
    ],
)
def test_invalid_parameters(model: GPT, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate(model, _prompt(b=1), **kwargs)


def test_invalid_input_shape(model: GPT) -> None:
    with pytest.raises(ValueError, match="input_ids must be"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)


def test_greedy_ignores_sampling_parameters(model: GPT) -> None:
    idx = _prompt(b=1)
    assert torch.equal(generate(model, idx, max_new_tokens=5, temperature=0.0), generate(model, idx, max_new_tokens=5))


def _filtered(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    return process_logits(logits, None, GenerationConfig(do_sample=True, top_k=top_k, top_p=top_p))


def _draw(logits: torch.Tensor, temperature: float, top_p: float | None, g: torch.Generator) -> torch.Tensor:
    cfg = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p)
    return torch.multinomial(process_logits(logits, None, cfg).softmax(-1), 1, generator=g).squeeze(-1)


def test_filter_logits() -> None:
    logits = torch.log(torch.tensor([[0.1, 0.5, 0.15, 0.25], [0.4, 0.3, 0.2, 0.1]]))
    inf = float("-inf")
    k2 = _filtered(logits, top_k=2, top_p=None)
    assert torch.isinf(k2).tolist() == [[True, False, True, False], [False, False, True, True]]
    p = _filtered(logits, top_k=None, top_p=0.65)  # the smallest prefix whose mass reaches top_p
    assert torch.isinf(p).tolist() == [[True, False, True, False], [False, False, True, True]]
    p = _filtered(logits, top_k=None, top_p=0.8)
    assert torch.isinf(p).tolist() == [[True, False, False, False], [False, False, False, True]]
    assert torch.equal(_filtered(logits, None, 1.0), logits)
    assert torch.equal(_filtered(logits, 4, None), logits)
    assert (_filtered(logits, 1, None) == inf).sum().item() == 6


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1, 0.0])
    logits = torch.log(probs).expand(4000, 4)
    g = torch.Generator().manual_seed(0)
    draws = _draw(logits, 1.0, None, g)
    freq = torch.bincount(draws, minlength=4).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    hot = _draw(logits, 2.0, None, g)  # temperature 2 flattens: p ~ sqrt(p)
    flat = probs.sqrt() / probs.sqrt().sum()
    torch.testing.assert_close(torch.bincount(hot, minlength=4).float() / 4000, flat, atol=0.03, rtol=0)
    nucleus = _draw(logits, 1.0, 0.8, g)
    assert set(nucleus.tolist()) == {0, 1}
    assert math.isclose((nucleus == 0).float().mean().item(), 2 / 3, abs_tol=0.04)
