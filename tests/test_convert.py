"""`bigmodel import` / `bigmodel export`: directories transformers wrote in, directories transformers loads out.

Sources are built here as the Hub ships GPT-2: sharded safetensors with an index (or a pickled
pytorch_model.bin) and GPT-2's vocab.json + merges.txt; outputs must load in transformers with equal logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from bigmodel.cli import main
from bigmodel.convert import convert
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT
from bigmodel.train.loop import TrainResult

ATOL: dict[str, Any] = dict(rtol=1e-4, atol=1e-4)
TEXTS = ["HAMLET: The king loves the crown tonight.", "Café crème ✓ and <|endoftext|> then more", "  spaces\n\nlines"]


@pytest.fixture(scope="module")
def bpe_tok(bpe_data: Path) -> Tokenizer:
    return Tokenizer.from_pretrained(bpe_data)


def _hf_model(vocab_size: int, seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
        )
    ).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * (0.3 if p.dim() >= 2 else 0.1))
    return hf


def _hub_dir(path: Path, tok: Tokenizer, *, pickled: bool = False) -> Any:
    """A GPT-2 directory as transformers/the Hub lay it out: sharded safetensors (or pytorch_model.bin),
    vocab.json + merges.txt, no tokenizer.json."""
    hf = _hf_model(tok.vocab_size)
    path.mkdir(parents=True)
    if pickled:
        hf.config.save_pretrained(path)
        torch.save(hf.state_dict(), path / "pytorch_model.bin")
    else:
        hf.save_pretrained(path, max_shard_size="30KB")
        assert (path / "model.safetensors.index.json").is_file() and not (path / "model.safetensors").exists()
    tok.tok.model.save(str(path))
    assert {"vocab.json", "merges.txt"} <= {p.name for p in path.iterdir()}
    return hf


def _check_loads_in_transformers(out: Path, reference: Any, tok_reference: Any) -> None:
    """`out` is a complete model directory: transformers' model and tokenizer agree with the references."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    theirs = GPT2LMHeadModel.from_pretrained(out).eval()
    vocab = theirs.config.vocab_size
    idx = torch.randint(0, vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(idx)
        expected = expected.logits if hasattr(expected, "logits") else expected[0]
        torch.testing.assert_close(theirs(idx).logits, expected, **ATOL)
    ours = GPT.from_pretrained(out)
    prompt = idx[:, :4]
    hf_ids = theirs.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=0
    )
    assert ours.generate(prompt, max_new_tokens=12).tolist() == hf_ids.tolist()
    hf_tok = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok_reference(text), text


def _gpt2_tokenizer(path: Path) -> Any:
    from transformers import GPT2Tokenizer

    t = GPT2Tokenizer.from_pretrained(path)
    return lambda text: t.encode(text, add_special_tokens=False)


def test_convert_sharded_hub_directory(tmp_path: Path, bpe_tok: Tokenizer) -> None:
    src, out = tmp_path / "hub", tmp_path / "out"
    hf = _hub_dir(src, bpe_tok)
    assert convert(src, out) == out
    assert not (out / "model.safetensors.index.json").exists() and not (out / "vocab.json").exists()
    _check_loads_in_transformers(out, hf, _gpt2_tokenizer(src))
    assert Tokenizer.from_pretrained(out).encode(TEXTS[1]) == bpe_tok.encode(TEXTS[1])


def test_convert_pickled_weights_only_with_allow_pickle(tmp_path: Path, bpe_tok: Tokenizer) -> None:
    src = tmp_path / "hub"
    hf = _hub_dir(src, bpe_tok, pickled=True)
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*--allow-pickle"):
        convert(src, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    convert(src, tmp_path / "out", allow_pickle=True)
    _check_loads_in_transformers(tmp_path / "out", hf, _gpt2_tokenizer(src))


def test_convert_refuses_a_non_empty_out(tmp_path: Path, bpe_tok: Tokenizer) -> None:
    src, out = tmp_path / "hub", tmp_path / "out"
    _hub_dir(src, bpe_tok)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not an empty folder"):
        convert(src, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        convert(src, tmp_path / "file")
    (out / "keep.txt").unlink()
    convert(src, out)  # an empty folder is fine
    assert (out / "model.safetensors").is_file()


def test_export_of_a_run_loads_in_transformers(tiny_run: tuple[TrainResult, object], tmp_path: Path) -> None:
    from bigmodel.evaluation import resolve_model_dir

    run = tiny_run[0].run_dir
    out = convert(resolve_model_dir(run), tmp_path / "hf")
    trained = GPT.from_pretrained(run / "final")
    _check_loads_in_transformers(out, trained, Tokenizer.from_pretrained(run / "final").encode)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gpt2" and cfg["n_positions"] == 32


# ----- the commands ---------------------------------------------------------------------------------------------
def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()  # drop what earlier calls printed
    code = main(argv)
    captured = capsys.readouterr()
    verb = argv[0]
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"bigmodel {verb}: error: "), captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("verb", ["import", "export"])
def test_help_has_an_example(verb: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([verb, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: bigmodel {verb}" in out and f"bigmodel {verb} " in out.split("example", 1)[1]


def test_cli_import(tmp_path: Path, bpe_tok: Tokenizer, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "hub", tmp_path / "out"
    hf = _hub_dir(src, bpe_tok)
    assert main(["import", str(src), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    _check_loads_in_transformers(out, hf, _gpt2_tokenizer(src))

    msg = _one_line_error(["import", str(src), "--out", str(out)], capsys)  # out is not empty now
    assert "not an empty folder" in msg

    pickled = tmp_path / "pickled"
    hf = _hub_dir(pickled, bpe_tok, pickled=True)
    msg = _one_line_error(["import", str(pickled), "--out", str(tmp_path / "o2")], capsys)
    assert "pytorch_model.bin" in msg and "--allow-pickle" in msg
    assert not (tmp_path / "o2").exists()
    assert main(["import", str(pickled), "--out", str(tmp_path / "o3"), "--allow-pickle"]) == 0
    _check_loads_in_transformers(tmp_path / "o3", hf, _gpt2_tokenizer(pickled))

    msg = _one_line_error(["import", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o4")], capsys)
    assert "nowhere" in msg


def test_cli_export(tiny_run: tuple[TrainResult, object], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tiny_run[0].run_dir
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    _check_loads_in_transformers(
        out, GPT.from_pretrained(run / "final"), Tokenizer.from_pretrained(run / "final").encode
    )
    msg = _one_line_error(["export", str(run), "--format", "hf", "--out", str(out)], capsys)
    assert "not an empty folder" in msg
    with pytest.raises(SystemExit) as info:
        main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "x")])
    assert info.value.code == 2
