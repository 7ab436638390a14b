"""generate(): greedy and sampled decoding with a KV cache, as transformers' generate() behaves."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from bigmodel import hardware
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.generation import (
    GenerationConfig,
    TextStream,
    decode,
    generate,
    generate_text,
    process_logits,
    stream_text,
)
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
    assert generate(model, [3, 4, 5]).shape == (1, 23)  # transformers 5's default: 20 new tokens
    assert generate(model, [1] * 40).shape == (1, 48)  # ... within the context window
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
        (dict(do_sample=True, top_k=-1), r"top_k=-1 must be >= 0 \(0 = off\)"),
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


def test_sampling_keeps_the_50_most_likely_tokens_unless_told_as_transformers_does() -> None:
    """transformers samples among the top 50 tokens when top_k is not given (or None: unset), and top_k=0
    turns that off; the examples users copy (`do_sample=True, top_k=0, top_p=0.92`) rely on both."""
    import transformers

    theirs = transformers.GenerationConfig()
    default = getattr(theirs, "_get_default_generation_params", lambda: {"top_k": theirs.top_k})()["top_k"]
    assert GenerationConfig().top_k is None and GenerationConfig().resolved().top_k == default == 50  # unset
    logits = torch.randn(3, 96, generator=torch.Generator().manual_seed(0))
    kept = lambda **kw: torch.isfinite(process_logits(logits, None, GenerationConfig(do_sample=True, **kw)))  # noqa: E731
    assert kept().sum(-1).tolist() == [50, 50, 50]
    assert kept(top_k=0).all() and kept(top_k=None).sum(-1).tolist() == [50, 50, 50]  # None in a config: unset
    assert kept(top_k=0, top_p=0.5).sum() < logits.numel()  # top-p alone
    assert torch.equal(process_logits(logits, None, GenerationConfig()), logits)  # greedy: untouched


def test_keywords_come_after_the_defaults_as_in_transformers(model: GPT) -> None:
    """A keyword of None is a setting, applied after transformers' defaults: top_k=None keeps every token,
    as transformers' generate(top_k=None) does; its harmless settings at their defaults are taken; invalid
    keywords raise even over a model whose config is already resolved."""
    from bigmodel.generation import config_for

    m = copy.deepcopy(model)
    m.generation_config = GenerationConfig(do_sample=True, top_k=5)
    assert config_for(m, {}).top_k == 5 and config_for(m, {"top_k": None}).top_k == 0
    assert config_for(m, {"temperature": None}).temperature == 1.0  # (None does what the default does)
    assert config_for(m, {"epsilon_cutoff": 0.0, "num_beam_groups": 1, "bos_token_id": 3}).top_k == 5
    m.generation_config = m.generation_config.resolved()
    for bad in [{"temperature": -1.0}, {"top_k": -3}, {"num_return_sequences": 0}]:
        with pytest.raises(ValueError, match="must be"):
            config_for(m, bad)
    with pytest.raises(ValueError, match="unknown generation argument.*epsilon_cutoff"):
        config_for(m, {"epsilon_cutoff": 0.1})
    m.generation_config = GenerationConfig(do_sample=True, temperature=0.0, num_return_sequences=0)
    assert config_for(m, {"eos_token_id": -1, "pad_token_id": 0, "temperature": 0.7, "num_return_sequences": 1})
    for bad, message in [
        ({"eos_token_id": -1}, r"the pad id -1 \(pad_token_id, else the first eos id\) must be in"),
        ({"temperature": 10**400}, "temperature=.* must be a number"),
        ({"max_new_tokens": 5.0}, "max_new_tokens=5.0 must be an integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            config_for(m, {"temperature": 0.7, "num_return_sequences": 1, **bad})
    mended = config_for(m, {"temperature": 0.7, "num_return_sequences": 1})  # keywords mend the model's
    assert (mended.temperature, mended.num_return_sequences) == (0.7, 1)
    assert not config_for(m, {"do_sample": False, "num_return_sequences": 1}).do_sample


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


# ----- logits processing against transformers' processors -----------------------------------------------------
def _transformers_processors(cfg: GenerationConfig) -> Any:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    cfg = cfg.resolved()
    procs = LogitsProcessorList()
    if cfg.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
    if cfg.do_sample:
        procs.append(TemperatureLogitsWarper(cfg.temperature))
        if cfg.top_k:
            procs.append(TopKLogitsWarper(cfg.top_k))
        if cfg.top_p is not None:
            procs.append(TopPLogitsWarper(cfg.top_p))
        if cfg.min_p is not None:
            procs.append(MinPLogitsWarper(cfg.min_p))
    return procs


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(repetition_penalty=1.3),
        dict(repetition_penalty=0.7),  # < 1 encourages repeats
        dict(do_sample=True, temperature=1.7, min_p=0.2),
        dict(do_sample=True, top_p=0.5, min_p=0.3),
        dict(do_sample=True, repetition_penalty=1.2, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05),
    ],
)
def test_process_logits_equals_transformers_processors(kwargs: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 40, generator=g) * 3  # positive and negative logits: both penalty branches
    input_ids = torch.randint(0, 40, (4, 9), generator=g)
    seen = torch.zeros(4, 40, dtype=torch.bool).scatter_(1, input_ids, True)
    cfg = GenerationConfig(**kwargs)
    ours = process_logits(scores.clone(), seen, cfg)
    theirs = _transformers_processors(cfg)(input_ids, scores.clone())
    assert not torch.equal(theirs, scores)  # the processors did something
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    torch.testing.assert_close(ours[torch.isfinite(ours)], theirs[torch.isfinite(theirs)])


def test_repetition_penalty_semantics() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = process_logits(logits, seen, GenerationConfig(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.0]]  # seen tokens: positive halved, negative doubled
    assert torch.equal(process_logits(logits, seen, GenerationConfig()), logits)  # 1.0 = off


def _min_p(logits: torch.Tensor, min_p: float, temperature: float = 1.0) -> torch.Tensor:
    return process_logits(logits, None, GenerationConfig(do_sample=True, min_p=min_p, temperature=temperature))


def test_min_p_filtering() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.08]]))
    # keep tokens whose probability is at least min_p * the top probability
    assert torch.isinf(_min_p(logits, 0.3)).tolist() == [[False, False, True, True]]  # threshold 0.15
    assert torch.isinf(_min_p(logits, 0.2)).tolist() == [[False, False, False, True]]  # threshold 0.10
    assert torch.isinf(_min_p(logits, 1.0)).tolist() == [[False, True, True, True]]  # only the top token
    assert torch.equal(_min_p(logits, 0.0), logits)
    # applied after temperature (transformers' order): T=2 flattens to p ~ sqrt(p), so all four survive 0.3
    assert not torch.isinf(_min_p(logits, 0.3, temperature=2.0)).any()
    g = torch.Generator().manual_seed(0)
    draws = torch.multinomial(_min_p(logits.expand(4000, 4), 0.3).softmax(-1), 1, generator=g).squeeze(-1)
    assert set(draws.tolist()) == {0, 1}
    assert math.isclose((draws == 0).float().mean().item(), 0.5 / 0.8, abs_tol=0.04)  # renormalised


def test_min_p_1_samples_the_greedy_sequence(model: GPT) -> None:
    idx = _prompt()
    greedy = generate(model, idx, max_new_tokens=15)
    assert torch.equal(
        generate(model, idx, max_new_tokens=15, do_sample=True, temperature=3.0, min_p=1.0, seed=0), greedy
    )
    assert not torch.equal(generate(model, idx, max_new_tokens=15, do_sample=True, temperature=3.0, seed=0), greedy)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(do_sample=True, min_p=-0.1), r"min_p=-0.1 must be in \[0, 1\]"),
        (dict(do_sample=True, min_p=1.5), r"min_p=1.5 must be in \[0, 1\]"),
        (dict(repetition_penalty=0.0), "repetition_penalty=0.0 must be > 0"),
        (dict(repetition_penalty=-1.0), "repetition_penalty=-1.0 must be > 0"),
        (dict(temprature=0.5), "unknown generation argument.*temprature"),
        (dict(num_beams=4), "num_beams.*beam search is not built"),
        (dict(output_scores=True), "output_scores.*output_logprobs=True"),
        (dict(return_dict_in_generate=True), "return_dict_in_generate.*\\(ids, logprobs\\)"),
        (dict(num_beams=None, output_scores=True), "output_scores"),
    ],
)
def test_invalid_new_parameters(model: GPT, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        generate(model, _prompt(b=1), max_new_tokens=2, **kwargs)


def test_transformers_arguments_that_change_nothing_are_taken(model: GPT) -> None:
    """use_cache (bigmodel always decodes with its KV cache: the same tokens), and transformers' defaults
    passed explicitly (num_beams=1, output_scores=False, return_dict_in_generate=False)."""
    idx = _prompt(b=2)
    expected = generate(model, idx, max_new_tokens=5)
    for extra in (
        dict(use_cache=True),
        dict(use_cache=False),
        dict(num_beams=1, output_scores=False, return_dict_in_generate=False),
        dict(num_beams=None),
    ):
        assert torch.equal(generate(model, idx, max_new_tokens=5, **extra), expected)


def test_greedy_repetition_penalty_matches_transformers(model: GPT, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model.save_pretrained(tmp_path)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = _prompt(b=2, t=6, seed=3)
    for penalty in (1.3, 2.0):
        expected = theirs.generate(
            idx,
            attention_mask=torch.ones_like(idx),
            max_new_tokens=30,
            do_sample=False,
            repetition_penalty=penalty,
            pad_token_id=0,
        )
        got = generate(model, idx, max_new_tokens=30, repetition_penalty=penalty)
        assert got.tolist() == expected.tolist(), penalty
        assert not torch.equal(got, generate(model, idx, max_new_tokens=30))  # the penalty changed the text


# ----- batches of prompts of different lengths ------------------------------------------------------------------
RAGGED = [[1, 2, 3, 4, 5, 6, 7], [9], [0, 4, 0, 2]]  # the last holds 0, the default pad id, twice


def _alone(model: GPT, prompt: list[int], **kwargs: Any) -> tuple[list[int], torch.Tensor]:
    out, lps = generate(model, [prompt], output_logprobs=True, **kwargs)
    return out[0, len(prompt) :].tolist(), lps[0]


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_ragged_batch_rows_equal_each_prompt_alone(model: GPT, penalty: float) -> None:
    # pad with the token the shortest prompt continues with: were padding counted as seen, it would be penalised
    pad = _alone(model, RAGGED[1], max_new_tokens=1)[0][0]
    kwargs: dict[str, Any] = dict(max_new_tokens=16, repetition_penalty=penalty, pad_token_id=pad)
    out, lps = generate(model, RAGGED, output_logprobs=True, **kwargs)
    L = max(map(len, RAGGED))
    assert out.shape == (3, L + 16) and lps.shape == (3, 16)
    for i, p in enumerate(RAGGED):
        assert out[i, L - len(p) : L].tolist() == p  # left-padded prompt
        assert (out[i, : L - len(p)] == pad).all()
        tokens, logprobs = _alone(model, p, **kwargs)
        assert out[i, L:].tolist() == tokens, i
        torch.testing.assert_close(lps[i], logprobs, rtol=1e-4, atol=1e-4)
    assert len({tuple(r) for r in out[:, L:].tolist()}) == 3


def test_left_padded_tensor_with_attention_mask_equals_ragged_lists(model: GPT) -> None:
    L = 7
    ids = torch.full((3, L), 33, dtype=torch.long)  # pad with a real-looking token: the mask must hide it
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(RAGGED):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = 1
    got, lps = generate(model, ids, attention_mask=mask, max_new_tokens=12, output_logprobs=True)
    expected, expected_lps = generate(model, RAGGED, max_new_tokens=12, output_logprobs=True)
    assert torch.equal(got[:, L:], expected[:, L:])
    torch.testing.assert_close(lps, expected_lps)
    unmasked = generate(model, ids, max_new_tokens=12)  # without the mask the padding is read as text
    assert not torch.equal(unmasked[:, L:], expected[:, L:])


def test_padded_batch_matches_transformers(model: GPT, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model.save_pretrained(tmp_path)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    L = 7
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, p in enumerate(RAGGED):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = 1
    expected = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert generate(model, ids, attention_mask=mask, max_new_tokens=12).tolist() == expected.tolist()


@torch.no_grad()
def test_output_logprobs_equal_log_softmax_of_a_full_forward(model: GPT) -> None:
    idx = _prompt(b=2, t=5)
    # sampled at a high temperature with a penalty: logprobs are still the model's own (unprocessed) ones
    kwargs: dict[str, Any] = dict(do_sample=True, temperature=2.0, repetition_penalty=1.5, top_k=10, seed=4)
    out, lps = generate(model, idx, max_new_tokens=20, output_logprobs=True, **kwargs)
    assert torch.equal(out, generate(model, idx, max_new_tokens=20, **kwargs))
    logits, _ = model(out)
    expected = logits[:, 4:-1].log_softmax(-1).gather(-1, out[:, 5:, None]).squeeze(-1)  # (B, 20)
    assert lps.shape == (2, 20) and (lps < 0).all()
    torch.testing.assert_close(lps, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def log_softmax_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at every Tensor.log_softmax call while the test runs."""
    calls: list[int] = []
    log_softmax = torch.Tensor.log_softmax
    monkeypatch.setattr(torch.Tensor, "log_softmax", lambda t, *a, **k: calls.append(1) or log_softmax(t, *a, **k))
    return calls


def test_logprobs_are_computed_only_when_asked_for(model: GPT, log_softmax_calls: list[int]) -> None:
    """A log-softmax over the vocabulary per step is skipped by generate without output_logprobs and by
    decode(logprobs=False) (stream_text: below); the tokens are the same."""
    calls = log_softmax_calls
    idx = _prompt(b=2, t=5)
    ids, _ = generate(model, idx, max_new_tokens=6, output_logprobs=True)
    assert len(calls) == 6
    calls.clear()
    assert torch.equal(generate(model, idx, max_new_tokens=6), ids) and not calls
    steps = list(decode(model, idx.tolist(), GenerationConfig(max_new_tokens=6), logprobs=False))
    assert all(s.logprobs is None for s in steps) and not calls
    assert torch.equal(torch.stack([s.tokens for s in steps], 1), ids[:, 5:])


def test_eos_token_id_list_stops_on_any(model: GPT) -> None:
    idx = _prompt(b=3, t=5, seed=4)
    free = generate(model, idx, max_new_tokens=20)[:, 5:].tolist()
    row = free[0]
    firsts = [i for i in range(1, len(row)) if row[i] not in row[:i]]
    early, late = row[firsts[1]], row[firsts[-1]]
    for stops in ([early, late], [late, early]):  # either order; finished rows are padded with the first id
        ends = [min([r.index(s) + 1 for s in stops if s in r] or [len(r)]) for r in free]
        n = max(ends)
        expected = [r[:e] + [stops[0]] * (n - e) for r, e in zip(free, ends, strict=True)]
        out = generate(model, idx, max_new_tokens=20, eos_token_id=stops)
        assert out[:, 5:].tolist() == expected, stops
        assert ends[0] == firsts[1] + 1 < 20  # row 0 stopped early, at its first `early`


def test_seeded_sampling_of_a_ragged_batch_is_reproducible(model: GPT) -> None:
    kwargs: dict[str, Any] = dict(max_new_tokens=16, do_sample=True, temperature=1.5, num_return_sequences=2)
    a = generate(model, RAGGED, seed=11, **kwargs)
    assert torch.equal(a, generate(model, RAGGED, seed=11, **kwargs))
    assert not torch.equal(a, generate(model, RAGGED, seed=12, **kwargs))
    assert a.shape == (6, 7 + 16)
    for i, p in enumerate(RAGGED):
        for j in range(2):
            assert a[2 * i + j, 7 - len(p) : 7].tolist() == p
    assert a[0, 7:].tolist() != a[1, 7:].tolist()


# ----- text: stop strings and streaming -------------------------------------------------------------------------
TEXT_PROMPT = "ab"


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.char()


@pytest.fixture(scope="module")
def char_model() -> GPT:
    """A byte-level model whose greedy continuation of TEXT_PROMPT holds ASCII runs and multi-byte characters."""
    return tiny_gpt(257, block_size=64, scale=3.0, pos_scale=10.0, seed=3)


@pytest.fixture(scope="module")
def greedy_text(char_model: GPT, char_tok: Tokenizer) -> tuple[list[int], str, str]:
    """(generated ids, their text, a 3-byte stop string that greedy decoding produces after a few tokens)."""
    ids = generate(char_model, char_tok.encode(TEXT_PROMPT), max_new_tokens=40)[0, 2:].tolist()
    k = next(k for k in range(3, len(ids) - 3) if all(32 <= b < 127 for b in ids[k : k + 3]))
    stop = bytes(ids[k : k + 3]).decode()
    text = char_tok.decode(ids)
    assert text.index(stop) > 3 and any(b >= 128 for b in ids[:k])  # a prefix with non-ASCII bytes in it
    return ids, text, stop


def test_generate_text_cuts_before_a_stop_string_split_across_tokens(
    char_model: GPT, char_tok: Tokenizer, greedy_text: tuple[list[int], str, str]
) -> None:
    ids, text, stop = greedy_text
    prefix = text[: text.index(stop)]
    [r] = generate_text(char_model, char_tok, TEXT_PROMPT, max_new_tokens=40, stop_strings=[stop])
    assert r.text == prefix and stop not in r.text
    assert r.finish_reason == "stop"
    assert r.token_ids == ids[: len(r.token_ids)] and char_tok.decode(r.token_ids) == prefix
    assert len(r.logprobs) == len(r.token_ids)
    [free] = generate_text(char_model, char_tok, TEXT_PROMPT, max_new_tokens=40, stop_strings=["\x00never"])
    assert free.text == text and free.token_ids == ids and free.finish_reason == "length"


def test_generate_with_stop_strings_drops_the_stop_tokens(
    char_model: GPT, char_tok: Tokenizer, greedy_text: tuple[list[int], str, str]
) -> None:
    ids, text, stop = greedy_text
    prompt = char_tok.encode(TEXT_PROMPT)
    out = generate(char_model, prompt, max_new_tokens=40, stop_strings=[stop], tokenizer=char_tok)
    new = out[0, 2:].tolist()
    assert char_tok.decode(new) == text[: text.index(stop)]
    assert new == ids[: len(new)]
    with pytest.raises(ValueError, match="tokenizer"):
        generate(char_model, prompt, max_new_tokens=4, stop_strings=[stop])


def test_stop_strings_in_a_batch(char_model: GPT, char_tok: Tokenizer, greedy_text: tuple[list[int], str, str]) -> None:
    _, text, stop = greedy_text
    results = generate_text(
        char_model, char_tok, [TEXT_PROMPT, "zz top"], max_new_tokens=40, stop_strings=[stop], num_return_sequences=2
    )
    assert [r.text for r in results[:2]] == [text[: text.index(stop)]] * 2
    [other] = generate_text(char_model, char_tok, "zz top", max_new_tokens=40, stop_strings=[stop])
    assert results[2].text == results[3].text == other.text and stop not in other.text


def test_stream_text_concatenates_to_generate_text(
    char_model: GPT, char_tok: Tokenizer, greedy_text: tuple[list[int], str, str]
) -> None:
    _, text, stop = greedy_text
    for stops in (None, [stop]):
        stats: dict[str, int] = {}
        chunks = list(
            stream_text(char_model, char_tok, TEXT_PROMPT, max_new_tokens=40, stop_strings=stops, stats=stats)
        )
        [r] = generate_text(char_model, char_tok, TEXT_PROMPT, max_new_tokens=40, stop_strings=stops)
        assert "".join(chunks) == r.text
        assert len(chunks) > 5  # streamed, not returned at the end
        assert stats["tokens"] >= len(r.token_ids)
    assert "".join(stream_text(char_model, char_tok, TEXT_PROMPT, max_new_tokens=40)) == text


def test_the_text_api_starts_from_the_models_generation_config(
    char_model: GPT, char_tok: Tokenizer, greedy_text: tuple[list[int], str, str]
) -> None:
    """generate_text and stream_text take what the model's generation_config says unless told otherwise
    (its eos, sampling, number of sequences), and stream_text streams one sequence whatever it says."""
    ids, text, _ = greedy_text
    model = copy.deepcopy(char_model)
    model.generation_config = GenerationConfig(eos_token_id=ids[5], num_return_sequences=2)
    results = generate_text(model, char_tok, TEXT_PROMPT, max_new_tokens=40)
    assert len(results) == 2 and all(r.token_ids == ids[:5] and r.finish_reason == "stop" for r in results)
    assert "".join(stream_text(model, char_tok, TEXT_PROMPT, max_new_tokens=40)) == char_tok.decode(ids[:5])
    [free] = generate_text(model, char_tok, TEXT_PROMPT, max_new_tokens=40, eos_token_id=None, num_return_sequences=1)
    assert free.text == text


def test_stream_text_skips_log_probabilities(
    char_model: GPT, char_tok: Tokenizer, greedy_text: tuple[list[int], str, str], log_softmax_calls: list[int]
) -> None:
    calls = log_softmax_calls
    assert "".join(stream_text(char_model, char_tok, TEXT_PROMPT, max_new_tokens=40)) == greedy_text[1]
    assert not calls
    [r] = generate_text(char_model, char_tok, TEXT_PROMPT, max_new_tokens=40)  # its completions carry them
    assert len(r.logprobs) == len(r.token_ids) and calls


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_return_sequences=2), "num_return_sequences"),
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(max_new_tokens=80), "context window"),
        (dict(bogus=1), "unknown generation argument"),
    ],
)
def test_stream_text_checks_parameters_before_iteration(
    char_model: GPT, char_tok: Tokenizer, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        stream_text(char_model, char_tok, TEXT_PROMPT, **{"max_new_tokens": 4, **kwargs})  # not iterated


def _push_all(stream: TextStream, data: bytes) -> list[str]:
    return [stream.push(b) for b in data]


def test_text_stream_never_splits_a_utf8_character(char_tok: Tokenizer) -> None:
    text = "héllo wörld ✓ 😀"
    stream = TextStream(char_tok)
    chunks = _push_all(stream, text.encode())
    assert chunks[1] == "" and chunks[2] == "é"  # the first byte of é is held until the second arrives
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) + stream.finish() == text


def test_text_stream_holds_back_a_split_stop_string_then_drops_it(char_tok: Tokenizer) -> None:
    stream = TextStream(char_tok, ["wor"])
    chunks = _push_all(stream, b"hello world")
    assert chunks[:6] == ["h", "e", "l", "l", "o", " "]
    assert chunks[6:9] == ["", "", ""]  # "w", "o": could be the stop string; "r": it is
    assert stream.stopped and stream.tokens_before_stop == 6
    assert chunks[9:] == ["", ""] and stream.finish() == ""  # nothing after a stop


def test_text_stream_emits_a_held_back_prefix_that_is_not_a_stop(char_tok: Tokenizer) -> None:
    stream = TextStream(char_tok, ["wax", "ld!"])
    chunks = _push_all(stream, b"hello world")
    assert chunks[6:8] == ["", "wo"]  # "w" held back; "wo" cannot start "wax": released
    assert chunks[-2:] == ["", ""]  # "l", "ld" could start "ld!"
    assert not stream.stopped
    assert "".join(chunks) + stream.finish() == "hello world"


def test_text_stream_stop_split_inside_a_multibyte_character(char_tok: Tokenizer) -> None:
    stream = TextStream(char_tok, ["✓!"])
    chunks = _push_all(stream, "ok ✓ ✓!".encode())
    assert "".join(chunks) == "ok ✓ " and stream.stopped
    assert stream.tokens_before_stop == len("ok ✓ ".encode())


def test_text_stream_cuts_at_the_earliest_of_several_stop_strings(char_tok: Tokenizer) -> None:
    for stops in (["ab", "b"], ["b", "ab"]):  # the order of the list must not matter
        stream = TextStream(char_tok, stops)
        assert "".join(_push_all(stream, b"xab")) == "x", stops
        assert stream.tokens_before_stop == 1


def _metaspace_tokenizer(texts: list[str]) -> Tokenizer:
    """A SentencePiece-style tokenizer ("▁" for spaces; its decoder drops the space a sequence starts with)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"]))
    return Tokenizer(tok)


@pytest.mark.parametrize("kind", ["bpe", "metaspace"])
def test_text_stream_equals_decoding_the_whole_sequence(kind: str) -> None:
    """The stream decodes a window of the latest ids; its text must be the whole sequence's, wherever
    characters split across tokens (random ids: stray bytes and special tokens included)."""
    texts = ["héllo wörld ✓ 😀 naïve café", "the quick brown fox jumps over the lazy dog", "日本語のテキスト ok"] * 20
    tok = Tokenizer.train_bpe(texts, vocab_size=400) if kind == "bpe" else _metaspace_tokenizer(texts)
    gen = torch.Generator().manual_seed(0)
    sequences = [tok.encode(" ".join(texts[:3]))] + [
        torch.randint(0, tok.vocab_size, (int(n),), generator=gen).tolist()
        for n in torch.randint(1, 200, (30,), generator=gen)
    ]
    for ids in sequences:
        stream = TextStream(tok)
        streamed = ""
        for i, t in enumerate(ids):
            streamed += stream.push(t)
            whole = tok.decode(ids[: i + 1], skip_special_tokens=True)
            assert whole.startswith(streamed)
            assert stream._lengths[-1] == len(whole)
        assert streamed + stream.finish() == tok.decode(ids, skip_special_tokens=True)
        assert stream._window > 0 or len(ids) < 3  # it did not decode the whole sequence every time


def test_the_transformers_docs_example_works_with_bigmodel_names(tmp_path) -> None:
    """The snippet users copy from the transformers docs, with bigmodel's names swapped in."""
    from bigmodel import Tokenizer

    d = tmp_path / "model"
    tok = Tokenizer.char()
    gpt = tiny_gpt(tok.vocab_size, block_size=128)
    gpt.save_pretrained(d, tok)
    text = "Hello, wörld"

    tok = Tokenizer.from_pretrained(d)
    model = GPT.from_pretrained(d)
    out = model.generate(
        input_ids=torch.tensor([tok.encode(text)]),
        max_length=100,
        num_return_sequences=1,
        temperature=1.0,
        do_sample=True,
    )
    decoded = tok.decode(out[0], skip_special_tokens=True)
    assert out.shape[0] == 1 and out.shape[1] <= 100
    assert decoded.startswith(text) and isinstance(decoded, str)
    assert decoded == tok.decode(out[0].tolist(), skip_special_tokens=True)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("tensors", [True, False])
def test_generate_takes_a_padded_batch_from_the_tokenizer(side: str, tensors: bool) -> None:
    """The other call users copy: enc = tok(texts, return_tensors="pt", padding=True);
    model.generate(**enc): each row continues as if alone, whichever side the padding is on (and from
    the tokenizer's lists too), and the shorter prompts come back padded with the tokenizer's pad id."""
    tok = Tokenizer.char()
    model = tiny_gpt(tok.vocab_size, block_size=64, scale=3.0, pos_scale=10.0)
    texts = ["Hello, wörld", "ab", "The king"]
    enc = tok(texts, return_tensors="pt" if tensors else None, padding=True, padding_side=side)
    out = model.generate(**enc, max_new_tokens=6)
    width = len(enc.input_ids[0])
    for i, text in enumerate(texts):
        alone = model.generate(tok(text, return_tensors="pt").input_ids, max_new_tokens=6)
        assert torch.equal(out[i, width:], alone[0, -6:])
        assert out[i, : width - len(tok.encode(text))].eq(tok.pad_token_id).all()
    decoded = tok.batch_decode(out, skip_special_tokens=True)
    assert [d[: len(t)] for d, t in zip(decoded, texts, strict=True)] == texts


def test_greedy_argmax_matches_torch_with_ties_and_nan() -> None:
    from bigmodel.generation import _argmax

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 50257, generator=g)
    scores[1, 3] = scores[1, 40000] = scores[1].max() + 1  # a tie: the first one wins
    scores[2, 9] = scores[2, 7] = float("nan")  # NaN counts as the largest, the first one wins
    scores[3] = float("-inf")
    scores[4, -1] = float("inf")
    view = torch.randn(2, 3, 50257, generator=g)[:, -1, :]  # a strided view, as the engine passes
    for s in (scores, view, scores.double()):
        assert torch.equal(_argmax(s), s.argmax(-1))


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_bf16_prompts_compute_through_float32_where_bf16_is_emulated(
    model: GPT, compiled: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 model's prompt (16+ rows per linear layer) takes hardware.bf16_linears_in_float on CPUs
    without native bf16 (forced here), compiled step or not; its first token and log-probability agree
    with torch's own bf16 prompt to bf16 rounding."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    prompts = [[(3 * i + 1) % V for i in range(10)], [(5 * i + 2) % V for i in range(9)]]  # ragged: 2 x 10 rows
    monkeypatch.setenv("BIGMODEL_COMPILED_STEP", compiled)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: True)  # torch's bf16 throughout
    native = list(decode(bf16, prompts, GenerationConfig(max_new_tokens=4)))
    converted = []
    handler = hardware._Bf16LinearsInFloat.__torch_function__

    def counting(self: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if (
            func is torch.nn.functional.linear
            and args[0].numel() >= hardware._Bf16LinearsInFloat.MIN_ROWS * args[0].shape[-1]
        ):
            converted.append(tuple(args[0].shape))
        return handler(self, func, types, args, kwargs)

    monkeypatch.setattr(hardware._Bf16LinearsInFloat, "__torch_function__", counting)
    monkeypatch.setattr(hardware, "cpu_has_bf16", lambda: False)
    steps = list(decode(bf16, prompts, GenerationConfig(max_new_tokens=4)))
    assert len(converted) == 4 * bf16.config.n_layer  # the prompt's c_attn, c_proj, c_fc, mlp c_proj
    assert torch.equal(steps[0].tokens, native[0].tokens)
    torch.testing.assert_close(steps[0].logprobs, native[0].logprobs, rtol=0.02, atol=0.02)
