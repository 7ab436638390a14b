"""Hugging Face layout: transformers loads our model directories and we load theirs, with equal logits."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from bigmodel.config import GenerationConfig
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.generation import config_for
from bigmodel.models.gpt import GPT
from bigmodel.nn.attention import KVCache
from conftest import tiny_gpt

V = 96
ATOL: dict[str, Any] = dict(rtol=1e-4, atol=1e-4)


def _ids(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


def _hf_model(tmp_path: Path, seed: int = 0) -> Any:
    """A randomly initialised transformers GPT-2 (biases and LayerNorms randomised too), saved by transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(
        GPT2Config(vocab_size=V, n_positions=40, n_embd=32, n_layer=2, n_head=4, bos_token_id=V - 1, eos_token_id=V - 1)
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() >= 2 else 0.1))
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_loads_our_directory(tmp_path: Path, bias: bool) -> None:
    from transformers import GPT2LMHeadModel

    ours = tiny_gpt(V, block_size=40, n_head=4, bias=bias, scale=5.0)
    ours.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) == (V, 40, 32, 2, 4)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())  # noqa: SIM118
        assert "lm_head.weight" not in keys  # tied: stored once
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (32, 96)  # Conv1D: (in, out)
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").dtype == torch.float32

    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert theirs.lm_head.weight.data_ptr() == theirs.transformer.wte.weight.data_ptr()
    idx = _ids(2, 40)
    with torch.no_grad():
        expected = theirs(idx).logits
        got, _ = ours(idx)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got, expected, **ATOL)


def test_config_answers_to_transformers_names(tmp_path: Path) -> None:
    """model.config.n_positions and the other GPT2Config names code written for transformers reads."""
    from transformers import GPT2Config

    ours = tiny_gpt(V, block_size=40, n_head=4)
    ours.save_pretrained(tmp_path)
    theirs = GPT2Config.from_pretrained(tmp_path)
    names = ["n_positions", "max_position_embeddings", "hidden_size", "num_attention_heads", "num_hidden_layers"]
    for name in [*names, "vocab_size", "n_embd", "n_layer", "n_head"]:
        assert getattr(ours.config, name) == getattr(theirs, name), name


@pytest.mark.parametrize("bias", [True, False])
def test_our_directory_round_trips(tmp_path: Path, bias: bool) -> None:
    ours = tiny_gpt(V, block_size=40, n_head=4, bias=bias)
    ours.save_pretrained(tmp_path)
    back = GPT.from_pretrained(tmp_path)
    assert back.config == ours.config and not back.training
    assert back.state_dict().keys() == ours.state_dict().keys()
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert back.lm_head.weight is back.transformer.wte.weight


def test_loading_builds_no_random_weights_and_leaves_usable_parameters(tmp_path: Path) -> None:
    ours = tiny_gpt(V, block_size=40, n_head=4)
    ours.save_pretrained(tmp_path)
    rng = torch.random.get_rng_state()
    back = GPT.from_pretrained(tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the model was built on the meta device, not drawn
    for name, p in back.named_parameters():
        assert p.device.type == "cpu" and p.is_contiguous() and p.requires_grad, name
    assert back.lm_head.weight is back.transformer.wte.weight
    back.train()
    loss = back(_ids(2, 40), _ids(2, 40, seed=1))[1]
    assert loss is not None
    loss.backward()  # fine-tuning a loaded model works
    assert back.transformer.h[0].attn.c_attn.weight.grad is not None


def test_we_load_a_directory_saved_by_transformers(tmp_path: Path) -> None:
    hf = _hf_model(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.config.vocab_size == V and ours.config.block_size == 40 and ours.config.bias
    assert ours.lm_head.weight is ours.transformer.wte.weight
    idx = _ids(3, 40, seed=4)
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, **ATOL)


def test_from_pretrained_loads_in_the_dtype_asked_for(tmp_path: Path) -> None:
    """dtype / torch_dtype as in transformers: a dtype or its name, or "auto" for the stored one; the tie
    between embedding and output head survives, and the logits agree with float32's to bf16 rounding."""
    hf = _hf_model(tmp_path / "fp32")
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    fp32 = GPT.from_pretrained(tmp_path / "fp32")
    idx = _ids(2, 20, seed=5)
    for path, kw, expected in [
        ("fp32", {}, torch.float32),
        ("bf16", {}, torch.float32),  # float32 by default, whatever is stored
        ("fp32", {"dtype": torch.bfloat16}, torch.bfloat16),
        ("fp32", {"torch_dtype": "bfloat16"}, torch.bfloat16),
        ("fp32", {"dtype": "torch.float16"}, torch.float16),
        ("fp32", {"dtype": "auto"}, torch.float32),
        ("fp32", {"dtype": "bf16"}, torch.bfloat16),  # bigmodel's --dtype names too
        ("bf16", {"dtype": "auto"}, torch.bfloat16),
    ]:
        model = GPT.from_pretrained(tmp_path / path, **kw)
        assert {p.dtype for p in model.parameters()} == {expected} and model.dtype == expected, (path, kw)
        assert model.lm_head.weight is model.transformer.wte.weight
        with torch.no_grad():
            got = model(idx).logits.float()
        torch.testing.assert_close(got, fp32(idx).logits, rtol=0.1, atol=0.1)
    for kw in [{"dtype": "int8"}, {"dtype": torch.int8}, {"dtype": torch.float64}, {"dtype": "half"}]:
        with pytest.raises(ValueError, match="use float32, bfloat16 or float16"):
            GPT.from_pretrained(tmp_path / "fp32", **kw)
    with pytest.raises(ValueError, match="not both"):
        GPT.from_pretrained(tmp_path / "fp32", dtype="float32", torch_dtype="float32")


def _hf_greedy(hf: Any, idx: torch.Tensor, n: int, eos: int | None) -> torch.Tensor:
    return hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else 0,
    )


def test_forward_takes_transformers_keywords_and_gives_its_outputs(tmp_path: Path) -> None:
    """model(input_ids=..., attention_mask=..., labels=...).logits / .loss as GPT2LMHeadModel gives them:
    labels shifted inside, -100 ignored; padded rows hidden as keys, their positions 0..T-1 as transformers
    has them. The result still unpacks as (logits, loss)."""
    hf = _hf_model(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    ids = _ids(3, 12)
    with torch.no_grad():
        theirs = hf(input_ids=ids, labels=ids)
        out = ours(input_ids=ids, labels=ids)
        torch.testing.assert_close(out.logits, theirs.logits, **ATOL)
        torch.testing.assert_close(out.loss, theirs.loss, **ATOL)
        logits, loss = ours(ids[:, :-1], ids[:, 1:])  # our own targets, already shifted: the same loss
        torch.testing.assert_close(logits, out.logits[:, :-1])
        torch.testing.assert_close(loss, out.loss)

        mask = torch.ones_like(ids)
        mask[0, :4] = 0  # left padding
        mask[1, -3:] = 0  # right padding
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, 4] = -100  # predicted at a padding position, whose logits mean nothing (and differ)
        theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(input_ids=ids, attention_mask=mask, labels=labels)
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], theirs.logits[real], **ATOL)
        torch.testing.assert_close(out.loss, theirs.loss, **ATOL)
        assert not torch.allclose(out.logits[real], ours(ids).logits[real], **ATOL)  # the mask hid the padding
        unpadded = ours(ids[0:1, 4:]).logits  # positions shifted: not the same as the row alone
        assert not torch.allclose(out.logits[0, 4:], unpadded[0], **ATOL)

    assert (ours.device, ours.dtype) == (torch.device("cpu"), torch.float32)
    assert ours.to(torch.bfloat16).dtype == torch.bfloat16 and ours.float().dtype == torch.float32
    for kw, message in [
        (dict(idx=ids, input_ids=ids), "token ids once"),
        (dict(), "token ids once"),
        (dict(input_ids=ids, labels=ids, last_only=True), "without targets and last_only"),
        (dict(input_ids=ids, labels=ids, logits_to_keep=1), "without targets and last_only"),
        (dict(input_ids=ids, attention_mask=mask, attn_mask=torch.ones(3, 1, 12, 12, dtype=torch.bool)), "not both"),
        (dict(input_ids=ids, attention_mask=mask[:1]), r"must be \(batch, cached \+ new positions\)"),
        (dict(input_ids=ids[0]), r"must be \(batch, length\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours(**kw)


def _hf_step(hf: Any, ids: torch.Tensor, mask: torch.Tensor, past: Any) -> tuple[torch.Tensor, Any]:
    """One forward of transformers' GPT-2 with its cache, under whichever name its version takes
    (`cache` since 5.x, `past_key_values` before): the logits and the cache to pass next."""
    import inspect

    name = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    out = hf(input_ids=ids, attention_mask=mask, use_cache=True, **({name: past} if past is not None else {}))
    return out.logits, getattr(out, name)


def test_a_manual_decoding_loop_with_the_cache_matches_transformers(tmp_path: Path) -> None:
    """The loop users write by hand, `out = model(ids, use_cache=True)` then `model(next, cache=out.cache,
    attention_mask=grown)` (or transformers' older `past_key_values=`), gives GPT2LMHeadModel's logits at
    every step, for a left-padded batch; the cache is extended in place and returned again."""
    hf = _hf_model(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    ids = _ids(2, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # row 1 is left-padded
    with torch.no_grad():
        theirs, their_cache = _hf_step(hf, ids, mask, None)
        out = ours(input_ids=ids, attention_mask=mask, use_cache=True)
        assert out.cache is not None and out.cache is out.past_key_values and out.cache.pos == 6
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], theirs[real], **ATOL)
        cache = out.cache
        for step in range(4):
            nxt = theirs[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            theirs, their_cache = _hf_step(hf, nxt, mask, their_cache)
            keyword = "cache" if step % 2 else "past_key_values"  # either name continues the same cache
            out = ours(input_ids=nxt, attention_mask=mask, **{keyword: cache})
            assert out.cache is cache and cache.pos == 7 + step
            torch.testing.assert_close(out.logits, theirs, **ATOL)
        assert cache.max_len < ours.config.block_size  # it grew with what it holds, not the whole window
        plain = ours(input_ids=ids)
        assert plain.cache is None  # no cache unless asked for (transformers' default is on)
        with pytest.warns(UserWarning, match="keeps one only with use_cache=True"):  # a loop expecting one is told
            assert plain.past_key_values is None
        assert ours(input_ids=nxt, cache=cache, use_cache=False).cache is None  # used, not returned (as theirs)


def test_a_cache_call_keeps_its_gradients_and_checks_its_inputs(tmp_path: Path) -> None:
    """use_cache=True with gradients on: the call's own keys and values keep theirs (a backward works and
    equals the one without a cache); a cache of other rows, or inputs that contradict, raise ValueError."""
    _hf_model(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    ids = _ids(2, 7, seed=5)
    ours(input_ids=ids, labels=ids, use_cache=True).loss.backward()
    with_cache = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours(input_ids=ids, labels=ids).loss.backward()
    for a, p in zip(with_cache, ours.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
    out = ours(input_ids=ids[:, :4], use_cache=True)
    ours(input_ids=ids[:, 4:], cache=out.cache).logits.sum().backward()  # a second call: its own graph
    for kw, message in [
        (dict(input_ids=ids[:1, 4:], cache=out.cache), "the cache holds 2 rows, the token ids 1"),
        (dict(input_ids=ids, logits_to_keep=torch.ones(2, 3, dtype=torch.long)), "a count or a 1-D tensor"),
        (dict(input_ids=ids, logits_to_keep=2, last_only=True), "last_only or logits_to_keep, not both"),
        (dict(input_ids=ids[:, :1], attention_mask=torch.ones(2, 5)), "no cache was passed: start one with use_cache"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours(**kw)


def test_hidden_states_logits_to_keep_and_tuples_as_transformers_gives_them(tmp_path: Path) -> None:
    """output_hidden_states (embeddings, each block's output, the final LayerNorm's), logits_to_keep (a
    count or positions) and return_dict=False (transformers' tuple: loss first when labels are given)."""
    hf = _hf_model(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    ids = _ids(2, 9, seed=4)
    with torch.no_grad():
        theirs = hf(input_ids=ids, output_hidden_states=True, use_cache=False)
        out = ours(input_ids=ids, output_hidden_states=True)
        assert out.hidden_states is not None and len(out.hidden_states) == 3  # n_layer + 1
        for a, b in zip(out.hidden_states, theirs.hidden_states, strict=True):
            torch.testing.assert_close(a, b, **ATOL)
        logits, loss = out  # the extra outputs are attributes, not unpacked
        assert loss is None and out.cache is None

        torch.testing.assert_close(ours(ids, logits_to_keep=1).logits, theirs.logits[:, -1:], **ATOL)
        torch.testing.assert_close(ours(ids, logits_to_keep=3).logits, theirs.logits[:, -3:], **ATOL)
        keep = torch.tensor([0, 4])
        torch.testing.assert_close(ours(ids, logits_to_keep=keep).logits, theirs.logits[:, keep], **ATOL)

        for kw in [dict(labels=ids), dict(), dict(labels=ids, output_hidden_states=True)]:
            mine = ours(input_ids=ids, return_dict=False, **kw)
            their = hf(input_ids=ids, return_dict=False, use_cache=False, **kw)
            assert isinstance(mine, tuple) and len(mine) == len(their)
            for a, b in zip(mine, their, strict=True):
                torch.testing.assert_close(a, b, **ATOL)  # tensors, or tuples of them
        assert [type(x) for x in ours(ids, use_cache=True, return_dict=False)] == [torch.Tensor, KVCache]

    from transformers import DynamicCache

    for kw, message in [
        (dict(output_attentions=True), "attention weights are not kept"),
        (dict(cache=ours.new_cache(2), past_key_values=ours.new_cache(2)), "pass the cache once"),
        (dict(past_key_values=DynamicCache()), "must be a bigmodel KVCache"),
        (dict(past_key_values=((torch.zeros(1),) * 2,) * 2), "must be a bigmodel KVCache"),
    ]:
        with pytest.raises(ValueError, match=message):
            ours(ids, **kw)
    cache = ours(ids, use_cache=True).cache
    with pytest.raises(ValueError, match=r"must be \(batch, cached \+ new positions\) = \(2, 10\)"):
        ours(ids[:, :1], cache=cache, attention_mask=torch.ones(2, 1))


def test_greedy_generate_matches_transformers(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    ours = tiny_gpt(V, block_size=40, n_head=4, scale=3.0, pos_scale=10.0)
    ours.save_pretrained(tmp_path)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = _ids(2, 6, seed=3)
    expected = _hf_greedy(theirs, idx, 30, None)
    got = ours.generate(idx, max_new_tokens=30)
    assert got.shape == expected.shape == (2, 36)
    assert got.tolist() == expected.tolist()
    assert len(set(got[:, 6:].flatten().tolist())) > 8  # a varied continuation, not one repeated token


def test_a_batch_from_the_tokenizer_generates_what_transformers_generates(tmp_path: Path) -> None:
    """The batch call users copy, both ways on the same directory: tok(texts, return_tensors="pt",
    padding=True), then generate(**enc); transformers' tokenizer padding on the left with its eos token."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    texts = ["the king loves the crown", "a queen", "my lord, the ghost waits for the night watch"]
    tok = Tokenizer.train_bpe(texts * 30, vocab_size=300)
    ours = tiny_gpt(tok.vocab_size, block_size=64, n_head=4, scale=3.0, pos_scale=10.0)
    ours.save_pretrained(tmp_path, tok)
    theirs, their_tok = GPT2LMHeadModel.from_pretrained(tmp_path).eval(), AutoTokenizer.from_pretrained(tmp_path)
    their_tok.pad_token, their_tok.padding_side = their_tok.eos_token, "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    got = ours.generate(**enc, max_new_tokens=20)
    expected = theirs.generate(
        **their_tok(texts, return_tensors="pt", padding=True),
        max_new_tokens=20,
        do_sample=False,
        pad_token_id=their_tok.eos_token_id,
    )
    assert got.tolist() == expected.tolist()
    assert tok.batch_decode(got, skip_special_tokens=True) == their_tok.batch_decode(expected, skip_special_tokens=True)


def test_padding_in_and_out_of_generate_is_transformers(tmp_path: Path) -> None:
    """With no pad_token_id anywhere, a left-padded prompt comes back as it was given (its own padding id)
    and a row that stops is padded with the eos id, as transformers' default call gives; the generation
    config reaches the text API and ensembles of one member alike."""
    from bigmodel.ensemble import LMEnsemble
    from bigmodel.generation import generate_text

    hf = _hf_model(tmp_path, seed=1)
    ids = _ids(2, 6, seed=7)
    mask = torch.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, 7  # row 1 left-padded with id 7
    free = GPT.from_pretrained(tmp_path).generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    gen0 = free[0, 6:].tolist()
    eos = gen0[next(i for i in range(2, len(gen0)) if gen0[i] not in gen0[:i])]  # row 0 emits it part-way
    hf.generation_config.eos_token_id = eos
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=12)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert got.tolist() == theirs.tolist()
    assert got[1, :2].tolist() == [7, 7] and got[0, -1] == eos  # the prompt's padding; the stopped row's
    one = LMEnsemble([ours]).generate(ids, attention_mask=mask, max_new_tokens=12)
    assert one.tolist() == got.tolist()

    class Ids:  # a tokenizer that spells ids, enough for the text API
        eot_id = V - 1

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [int(t) for t in text.split()]

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "".join(f" {i}" for i in ids)

    row = generate_text(ours, Ids(), " ".join(map(str, ids[0].tolist())), max_new_tokens=12)[0]  # type: ignore[arg-type]
    assert row.token_ids == got[0, 6:].tolist()[: len(row.token_ids)] and row.finish_reason == "stop"
    assert eos not in row.token_ids and len(row.token_ids) < 12  # stopped at the model's eos, left out

    mask[0, :1], ids[0, :1] = 0, 7  # every row padded: the shared column stays, and counts in the lengths
    for kw in [{}, {"max_length": 15}, {"max_new_tokens": 12}]:
        theirs = hf.generate(ids, attention_mask=mask, **kw)
        assert ours.generate(ids, attention_mask=mask, **kw).tolist() == theirs.tolist(), kw
        as_lists = ours.generate(ids.tolist(), attention_mask=mask.tolist(), **kw)  # lists as tok(texts) gives
        assert as_lists.tolist() == theirs.tolist(), kw


def test_greedy_generate_matches_transformers_loaded_model_with_eos(tmp_path: Path) -> None:
    hf = _hf_model(tmp_path, seed=1)
    ours = GPT.from_pretrained(tmp_path)
    idx = _ids(2, 5, seed=7)
    free = ours.generate(idx, max_new_tokens=25)
    assert free.tolist() == _hf_greedy(hf, idx, 25, None).tolist()
    # stop on a token that row 0 first emits part-way: row 0 is then padded with it, as transformers does
    gen0 = free[0, 5:].tolist()
    k = next(i for i in range(3, len(gen0)) if gen0[i] not in gen0[:i])
    eos = gen0[k]
    got = ours.generate(idx, max_new_tokens=25, eos_token_id=eos)
    assert got.tolist() == _hf_greedy(hf, idx, 25, eos).tolist()
    assert got[0, : 5 + k].tolist() == free[0, : 5 + k].tolist() and (got[0, 5 + k :] == eos).all()


def test_generate_starts_from_the_directorys_generation_config_as_transformers_does(tmp_path: Path) -> None:
    """`model.generate(ids)` with no eos_token_id stops where transformers' does: at the eos id of the
    directory's generation_config.json (else config.json's), padding finished rows with it. Its other knobs
    are defaults that keywords override; ones bigmodel does not apply are named in a warning."""
    from transformers import GenerationConfig as HFGenerationConfig

    hf = _hf_model(tmp_path, seed=1)
    idx = _ids(2, 5, seed=7)
    free = GPT.from_pretrained(tmp_path).generate(idx, max_new_tokens=25, eos_token_id=None)
    gen0 = free[0, 5:].tolist()
    eos = gen0[next(i for i in range(3, len(gen0)) if gen0[i] not in gen0[:i])]  # first emitted part-way
    hf.generation_config.eos_token_id = hf.generation_config.pad_token_id = eos
    hf.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # what transformers writes there is applied, or changes nothing
        ours = GPT.from_pretrained(tmp_path)
    assert ours.generation_config.eos_token_id == eos
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=25)  # their defaults
    got = ours.generate(idx, max_new_tokens=25)  # ours
    assert ours.generate(idx).tolist() == hf.generate(idx, attention_mask=torch.ones_like(idx)).tolist()  # length too
    assert got.tolist() == theirs.tolist() and (got[0, -1] == eos)
    assert got.shape[1] < free.shape[1] or (got[0] != free[0]).any()  # it did stop early
    assert ours.generate(idx, max_new_tokens=25, eos_token_id=None).tolist() == free.tolist()  # keywords win

    (tmp_path / "generation_config.json").unlink()  # then config.json's ids, as transformers reads them
    assert GPT.from_pretrained(tmp_path).generation_config.eos_token_id == V - 1

    raw = {"eos_token_id": 3, "do_sample": True, "top_k": 0, "temperature": 0.7, "num_beams": 1, "bos_token_id": 3}
    (tmp_path / "generation_config.json").write_text(json.dumps(raw))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing ignored: num_beams=1 is transformers' default
        model = GPT.from_pretrained(tmp_path)
    g = model.generation_config
    assert (g.eos_token_id, g.do_sample, g.top_k, g.temperature) == (3, True, 0, 0.7)
    a = model.generate(idx, max_new_tokens=6, seed=1)
    assert torch.equal(a, model.generate(idx, max_new_tokens=6, seed=1, do_sample=True, top_k=0, temperature=0.7))
    # generation_config= lays what it sets (what is not None) over the model's other settings, as in
    # transformers: bigmodel's GenerationConfig however it was made, transformers' own, or a dict
    top5 = model.generate(idx, max_new_tokens=6, seed=2, top_k=5)
    later = GenerationConfig()
    later.top_k = 5
    for given in [GenerationConfig(top_k=5), later, dataclasses.replace(GenerationConfig(), top_k=5)]:
        assert torch.equal(top5, model.generate(idx, max_new_tokens=6, seed=2, generation_config=given))
    greedy = model.generate(idx, max_new_tokens=6, do_sample=False)
    copied = copy.deepcopy(model.generation_config)  # transformers' idiom: a copy of the model's, changed
    copied.do_sample = False
    harmless = HFGenerationConfig(do_sample=False)
    harmless.output_logits = harmless.renormalize_logits = False  # set to transformers' defaults: nothing to apply
    for given in [GenerationConfig(do_sample=False), copied, harmless, {"do_sample": False}]:
        assert torch.equal(greedy, model.generate(idx, max_new_tokens=6, generation_config=given)), given
    assert torch.equal(greedy, model.generate(idx, max_new_tokens=6, do_sample=False, bos_token_id=1, min_length=0))
    seeded = model.generate(idx, max_new_tokens=6, generation_config={"seed": 4})
    assert torch.equal(seeded, model.generate(idx, max_new_tokens=6, seed=4))
    with pytest.raises(ValueError, match="generation_config sets num_beams: not applied"):
        model.generate(idx, generation_config={"num_beams": 4})
    with pytest.raises(ValueError, match=r"pass stop_strings= \(with tokenizer=\) to generate"):
        model.generate(idx, generation_config={"stop_strings": ["."]})
    model.generation_config = HFGenerationConfig(do_sample=False, eos_token_id=3)  # transformers' own, assigned
    assert torch.equal(greedy, model.generate(idx, max_new_tokens=6))
    model.generation_config = {"do_sample": True, "top_k": 3}  # a dict, generated from and saved
    model.save_pretrained(tmp_path / "dict_config")
    assert GPT.from_pretrained(tmp_path / "dict_config").generation_config.top_k == 3
    model.generation_config = HFGenerationConfig(do_sample=True)  # ... and saved: what it leaves unset stays so
    model.save_pretrained(tmp_path / "theirs_config")
    assert GPT.from_pretrained(tmp_path / "theirs_config").generation_config.top_k is None  # unset: 50 when run
    (tmp_path / "generation_config.json").write_text(json.dumps({"seed": 3}))  # transformers keeps, never applies
    with pytest.warns(UserWarning, match="seed not applied"):
        assert GPT.from_pretrained(tmp_path).generation_config.seed is None
    (tmp_path / "generation_config.json").write_text(json.dumps({**raw, "num_beams": 4, "no_repeat_ngram_size": 2}))
    with pytest.warns(UserWarning, match="no_repeat_ngram_size, num_beams not applied by bigmodel's generate"):
        GPT.from_pretrained(tmp_path)
    # a value a call cannot run with is refused by the call, where a keyword may mend it (as transformers)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_p": 2.0}))
    with pytest.warns(UserWarning, match=r"generation_config.json: top_p=2.0 must be in \(0, 1\]; calls must set"):
        odd = GPT.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"top_p=2.0 must be in \(0, 1\]"):
        odd.generate(idx, max_new_tokens=2)
    assert odd.generate(idx, max_new_tokens=2, top_p=0.9).shape == (2, 7)
    assert odd.generate(idx, max_new_tokens=2, do_sample=False).shape == (2, 7)
    for raw, message in [
        ({"max_length": 12.0}, "max_length=12.0 must be an integer"),
        ({"do_sample": True, "temperature": "0.7"}, "temperature='0.7' must be a number"),
        ({"eos_token_id": "95"}, "eos_token_id='95' must be a token id or a list of them"),
        ({"do_sample": True, "top_k": True}, "top_k=True must be an integer"),
    ]:
        (tmp_path / "generation_config.json").write_text(json.dumps(raw))
        with pytest.warns(UserWarning, match=message):
            bad = GPT.from_pretrained(tmp_path)
        with pytest.raises(ValueError, match=message):
            bad.generate(idx)
    assert bad.generate(idx, max_new_tokens=2, top_k=5).shape == (2, 7)  # mended by a keyword
    (tmp_path / "generation_config.json").write_text(json.dumps({"max_length": 0}))
    with pytest.warns(UserWarning, match="max_length=0"):
        unused = GPT.from_pretrained(tmp_path)
    assert unused.generate(idx, max_new_tokens=2).shape == (2, 7)  # max_new_tokens wins: max_length unused
    import numpy as np  # numpy's and torch's scalars and id arrays, as transformers takes them

    for kw in [
        dict(max_new_tokens=np.int64(2), pad_token_id=np.int64(0), eos_token_id=[np.int64(5)]),
        dict(max_new_tokens=2, eos_token_id=torch.tensor([5, 6]), top_p=np.float32(0.9)),
        dict(max_new_tokens=torch.tensor(2), eos_token_id=(5, 6)),
    ]:
        assert unused.generate(idx, **kw).shape[0] == 2, kw
    (tmp_path / "generation_config.json").write_text("[]")
    with pytest.raises(UserError, match="holds list, not a JSON object"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": True, "seed": 5}))
    assert config_for(model, {}, HFGenerationConfig.from_pretrained(tmp_path)).seed is None  # as transformers

    # save_pretrained writes what the config sets, and transformers reads the same knobs back
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9)
    model.save_pretrained(tmp_path / "saved", Tokenizer.char())
    theirs_cfg = HFGenerationConfig.from_pretrained(tmp_path / "saved")
    assert (theirs_cfg.do_sample, theirs_cfg.temperature, theirs_cfg.top_p) == (True, 0.7, 0.9)
    assert theirs_cfg.eos_token_id == Tokenizer.char().eot_id
    reloaded = GPT.from_pretrained(tmp_path / "saved").generation_config
    eot = Tokenizer.char().eot_id
    assert reloaded == GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=eot)
    model.generation_config = GenerationConfig(do_sample=True, top_k=0)  # top-k off: transformers' 0 too
    model.save_pretrained(tmp_path / "saved")
    assert HFGenerationConfig.from_pretrained(tmp_path / "saved").top_k == 0
    assert GPT.from_pretrained(tmp_path / "saved").generation_config.top_k == 0
    model.generation_config = GenerationConfig(num_return_sequences=2)  # greedy: transformers would refuse it
    model.save_pretrained(tmp_path / "saved")
    assert "num_return_sequences" not in json.loads((tmp_path / "saved" / "generation_config.json").read_text())


def test_tokenizer_saved_with_the_model(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = Tokenizer.char()
    model = tiny_gpt(tok.vocab_size, block_size=40, n_head=4)
    model.save_pretrained(tmp_path, tok)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["eos_token_id"] == cfg["bos_token_id"] == tok.eot_id
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eot_id
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    assert hf_tok("ROMEO:")["input_ids"] == tok.encode("ROMEO:")
    assert hf_tok.model_max_length == 40
    assert Tokenizer.from_pretrained(tmp_path).kind == "char"


class _Boom:
    """Unpickling this creates a folder: proof that a file was (wrongly) unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_pickle_weights_are_refused(tmp_path: Path) -> None:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    marker = tmp_path / "UNPICKLED"
    tiny_gpt(V).save_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(UserError, match=r"has no model\.safetensors\. It has pytorch_model\.bin.*--allow-pickle"):
        GPT.from_pretrained(model_dir)
    assert not marker.exists()


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        GPT.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        GPT.from_pretrained(empty)
    tiny_gpt(V).save_pretrained(empty)
    (empty / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"has no model\.safetensors\.$"):
        GPT.from_pretrained(empty)

    d = tmp_path / "model"
    tiny_gpt(V).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(UserError, match="model_type is 'llama'"):
        GPT.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "n_embd": 64}))
    with pytest.raises(UserError, match="shape"):
        GPT.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(UserError, match=r"lacks .* tensors, e\.g\. 'transformer\.h\.2\."):
        GPT.from_pretrained(d)
    (d / "config.json").write_text(json.dumps({**cfg, "activation_function": "relu"}))
    with pytest.raises(UserError, match="activation_function 'relu' is not supported"):
        GPT.from_pretrained(d)
    (d / "config.json").unlink()
    with pytest.raises(UserError, match="has no config.json"):
        GPT.from_pretrained(d)


# ----- directories transformers wrote: sharded safetensors, several shapes, GPT-2's own -------------------------
HF_SHAPES: dict[str, dict[str, int]] = {
    "2x32-4heads": dict(vocab_size=96, n_positions=40, n_embd=32, n_layer=2, n_head=4),
    "3x48-6heads-odd-vocab": dict(vocab_size=301, n_positions=64, n_embd=48, n_layer=3, n_head=6),
    "1x36-3heads": dict(vocab_size=257, n_positions=24, n_embd=36, n_layer=1, n_head=3),
}
GPT2_SHAPE = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12)  # GPT-2 small


def _hf_saved(path: Path, shape: dict[str, int], *, seed: int, spread: float, shard: str | None) -> Any:
    """A random transformers GPT-2 of `shape` (every parameter perturbed), saved by transformers itself."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = shape["vocab_size"] - 1
    config = GPT2Config(**shape, bos_token_id=eos, eos_token_id=eos)
    with torch.device("meta"):  # skip transformers' init: every tensor is filled below
        hf = GPT2LMHeadModel(config)
    hf = hf.to_empty(device="cpu").eval()
    hf.lm_head.weight = hf.transformer.wte.weight  # to_empty allocates each parameter anew: tie again
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * spread)
            else:  # biases and LayerNorms, randomised so a dropped or misplaced one shows
                one = 1.0 if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) else 0.0
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + one)
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    if shard is None:
        hf.save_pretrained(path)
    else:
        hf.save_pretrained(path, max_shard_size=shard)
    return hf


def _check_sharded(path: Path) -> None:
    assert not (path / "model.safetensors").exists()
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((path / s).is_file() for s in shards)


@pytest.mark.parametrize("shape", HF_SHAPES.values(), ids=HF_SHAPES.keys())
def test_we_load_sharded_transformers_directories(tmp_path: Path, shape: dict[str, int]) -> None:
    hf = _hf_saved(tmp_path, shape, seed=5, spread=0.3, shard="20KB")
    _check_sharded(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    c = ours.config
    assert (c.vocab_size, c.block_size, c.n_embd, c.n_layer, c.n_head) == tuple(
        shape[k] for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
    )
    idx = torch.randint(0, shape["vocab_size"], (2, shape["n_positions"]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, **ATOL)
    prompt = idx[:, :5]
    n = min(20, shape["n_positions"] - 5)
    got_ids = ours.generate(prompt, max_new_tokens=n)
    assert got_ids.tolist() == _hf_greedy(hf, prompt, n, None).tolist()
    assert len(set(got_ids[:, 5:].flatten().tolist())) > 3


def test_gpt2_small_shape_logits_and_greedy_match_transformers(tmp_path: Path) -> None:
    """GPT-2's real shape (124M parameters, 50257 tokens, 1024 positions), sharded as the Hub ships it."""
    hf = _hf_saved(tmp_path, GPT2_SHAPE, seed=0, spread=0.02, shard="200MB")
    _check_sharded(tmp_path)
    ours = GPT.from_pretrained(tmp_path)
    assert ours.num_params(non_embedding=False) == 124_439_808  # GPT-2 small, "124M"
    assert ours.num_params() == 123_653_376  # without position embeddings: nanoGPT's "123.65M"
    idx = torch.randint(0, 50257, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(idx).logits
        got, _ = ours(idx)
    torch.testing.assert_close(got, expected, **ATOL)
    assert ours.generate(idx, max_new_tokens=6).tolist() == _hf_greedy(hf, idx, 6, None).tolist()
    for shard in tmp_path.glob("*.safetensors"):  # 500 MB: do not leave it in pytest's kept temp dirs
        shard.unlink()


# ----- pytorch_model.bin: refused by default, read with weights_only=True when allowed ---------------------------
def _bin_dir(path: Path) -> Any:
    hf = _hf_saved(path / "src", HF_SHAPES["2x32-4heads"], seed=3, spread=0.3, shard=None)
    bin_dir = path / "bin"
    bin_dir.mkdir()
    hf.config.save_pretrained(bin_dir)
    torch.save(hf.state_dict(), bin_dir / "pytorch_model.bin")  # lm_head.weight included, as transformers did
    return hf, bin_dir


def test_pytorch_model_bin_needs_allow_pickle(tmp_path: Path) -> None:
    hf, bin_dir = _bin_dir(tmp_path)
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*--allow-pickle"):
        GPT.from_pretrained(bin_dir)
    ours = GPT.from_pretrained(bin_dir, allow_pickle=True)
    assert ours.lm_head.weight is ours.transformer.wte.weight
    idx = _ids(2, 40, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, **ATOL)


def _malicious_bins(model_dir: Path, marker: Path) -> list[bytes]:
    """A torch.save zip holding a tensor next to a code-running object, and a bare pickle of one."""
    torch.save({"transformer.wte.weight": torch.zeros(V, 32), "evil": _Boom(marker)}, model_dir / "pytorch_model.bin")
    return [(model_dir / "pytorch_model.bin").read_bytes(), pickle.dumps(_Boom(marker))]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_not_executed_even_with_allow_pickle(tmp_path: Path) -> None:
    model_dir, marker = tmp_path / "model", tmp_path / "UNPICKLED"
    model_dir.mkdir()
    tiny_gpt(V).save_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    for payload in _malicious_bins(model_dir, marker):
        (model_dir / "pytorch_model.bin").write_bytes(payload)
        with pytest.raises(Exception):  # noqa: B017 - any error, as long as nothing ran
            GPT.from_pretrained(model_dir, allow_pickle=True)
        assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unloadable_pickle_with_allow_pickle_is_a_user_error(tmp_path: Path) -> None:
    model_dir, marker = tmp_path / "model", tmp_path / "UNPICKLED"
    model_dir.mkdir()
    tiny_gpt(V).save_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    _malicious_bins(model_dir, marker)
    with pytest.raises(UserError, match=r"pytorch_model\.bin"):
        GPT.from_pretrained(model_dir, allow_pickle=True)
    assert not marker.exists()


def test_untied_output_head_is_loaded_or_refused(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=V, n_positions=40, n_embd=32, n_layer=2, n_head=4, tie_word_embeddings=False)
    hf = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.add_(torch.randn_like(hf.lm_head.weight))
    assert not torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)
    hf.save_pretrained(tmp_path)
    try:
        ours = GPT.from_pretrained(tmp_path)
    except UserError:
        return  # refusing with a message is fine; a wrong model is not
    idx = _ids(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, **ATOL)
