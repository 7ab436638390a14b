"""Hugging Face layout: transformers loads our model directories and we load theirs, with equal logits."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT
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


def _hf_greedy(hf: Any, idx: torch.Tensor, n: int, eos: int | None) -> torch.Tensor:
    return hf.generate(
        idx,
        attention_mask=torch.ones_like(idx),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos if eos is not None else 0,
    )


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
