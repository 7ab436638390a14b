"""Byte-level tokenizers: char round-trips any text, BPE trains and round-trips, transformers loads ours."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bigmodel.data.tokenizer import EOT, Tokenizer
from bigmodel.errors import UserError

UNICODE_SAMPLES = [
    "",
    "hello world",
    " leading and trailing spaces  \n\n\ttabs\r\n",
    "Café crème, naïve — señor; Ünsal’s “quotes”",
    "日本語のテキスト, 中文, 한국어",
    "emoji 😀👍🏽 and combining e\u0301 and zero\u200bwidth",
    "\x00\x01 control \x7f chars \ufeff BOM",
    "mixed: αβγ δ ∑∫√ ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def _random_unicode(rng: random.Random, n: int) -> str:
    out: list[str] = []
    while len(out) < n:
        cp = rng.randrange(0, 0x110000)
        if 0xD800 <= cp <= 0xDFFF:  # surrogates are not encodable text
            continue
        out.append(chr(cp))
    return "".join(out)


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_char_round_trips_unicode_as_bytes(text: str) -> None:
    tok = Tokenizer.char()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8")), "one token per UTF-8 byte, id == byte value"
    assert tok.decode(ids) == text


def test_char_round_trips_random_code_points() -> None:
    tok = Tokenizer.char()
    rng = random.Random(0)
    for _ in range(20):
        text = _random_unicode(rng, 50)
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8"))
        assert tok.decode(ids) == text


def test_char_vocabulary_and_eot() -> None:
    tok = Tokenizer.char()
    assert tok.kind == "char"
    assert tok.vocab_size == 257
    assert tok.eot_id == 256
    assert tok.encode(EOT) == [256]
    assert tok.decode([104, 105, 256, 33]) == f"hi{EOT}!"
    assert tok.decode([104, 105, 256, 33], skip_special_tokens=True) == "hi!"


@pytest.fixture(scope="module")
def bpe(corpus_dir: Path) -> Tokenizer:
    texts = [p.read_text(encoding="utf-8") for p in sorted(corpus_dir.glob("*.txt"))]
    return Tokenizer.train_bpe(texts, vocab_size=300)


def test_bpe_trains_merges_and_round_trips(bpe: Tokenizer, corpus_dir: Path) -> None:
    assert bpe.kind == "bpe"
    assert bpe.vocab_size == 300
    assert bpe.eot_id == bpe.tok.token_to_id(EOT)
    text = (corpus_dir / "doc02.txt").read_text(encoding="utf-8")
    ids = bpe.encode(text)
    assert len(ids) < 0.75 * len(text.encode("utf-8")), "BPE merges should compress the training text"
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_bpe_round_trips_unseen_unicode(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_vocab_size_too_small() -> None:
    with pytest.raises(UserError, match="--vocab-size 100 is too small"):
        Tokenizer.train_bpe(["some text"], vocab_size=100)


def test_encode_batch_matches_encode(bpe: Tokenizer) -> None:
    texts = ["The king loves the crown.", "", "Café ✓"]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_save_pretrained_loads_in_transformers(bpe: Tokenizer, kind: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    ours = bpe if kind == "bpe" else Tokenizer.char()
    ours.save_pretrained(tmp_path, model_max_length=128)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        json.loads((tmp_path / name).read_text())  # all valid JSON

    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token == EOT
    assert theirs.eos_token_id == ours.eot_id
    assert theirs.model_max_length == 128
    for text in ["The king loves the crown tonight.", *UNICODE_SAMPLES]:
        expected = ours.encode(text)
        assert theirs(text)["input_ids"] == expected, text
        assert theirs.encode(text, add_special_tokens=False) == expected
        assert theirs.decode(expected) == ours.decode(expected)

    back = Tokenizer.from_pretrained(tmp_path)
    assert back.kind == kind and back.vocab_size == ours.vocab_size and back.eot_id == ours.eot_id
    assert back.encode(UNICODE_SAMPLES[3]) == ours.encode(UNICODE_SAMPLES[3])


@pytest.mark.filterwarnings("ignore:`max_length` is ignored when `padding`")  # (transformers' own, for a case below)
@pytest.mark.parametrize("side", ["left", "right"])
def test_calls_written_for_transformers_tokenizers_give_what_they_give(
    bpe: Tokenizer, side: str, tmp_path: Path
) -> None:
    """tok(texts, return_tensors="pt", padding=True), batch_decode and the special ids, against transformers
    on the same tokenizer (its pad token set to end-of-text, as GPT-2 users do)."""
    import torch
    from transformers import AutoTokenizer

    bpe.save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    theirs.pad_token, theirs.padding_side = theirs.eos_token, side
    texts = ["The king loves the crown tonight.", "a", UNICODE_SAMPLES[3], UNICODE_SAMPLES[5]]
    for text in texts:  # one text: lists of ids, and one row of tensors
        assert dict(bpe(text)) == dict(theirs(text))
        assert torch.equal(bpe(text, return_tensors="pt").input_ids, theirs(text, return_tensors="pt").input_ids)
    ours = bpe(texts, return_tensors="pt", padding=True, padding_side=side)
    expected = theirs(texts, return_tensors="pt", padding=True)
    assert set(ours) == {"input_ids", "attention_mask"}
    assert torch.equal(ours.input_ids, expected["input_ids"])
    assert torch.equal(ours["attention_mask"], expected.attention_mask)
    assert (ours.input_ids[:, 0 if side == "left" else -1] == bpe.eot_id).any()  # padded where asked
    assert dict(bpe(texts)) == dict(theirs(texts))  # unpadded lists of lists
    assert dict(bpe(texts, padding=True, padding_side=side)) == dict(theirs(texts, padding=True))
    for kw in [
        {"truncation": True, "max_length": 4},
        {"padding": True, "truncation": True, "max_length": 5},
        {"padding": "max_length", "max_length": 12},  # rows longer than 12 stay as they are
        {"padding": "max_length", "truncation": True, "max_length": 5},
        {"padding": "max_length", "max_length": 80},
        {"max_length": 3},  # neither padding nor truncation: transformers truncates
        {"max_length": 3, "truncation": False},
        {"padding": True, "max_length": 3},
        {"padding": "max_length"},  # no max_length and no limit: nothing to pad to
    ]:
        assert dict(bpe(texts, padding_side=side, **kw)) == dict(theirs(texts, **kw)), kw
    assert bpe.batch_decode(ours.input_ids, skip_special_tokens=True) == texts
    assert bpe.batch_decode(ours.input_ids) == theirs.batch_decode(expected["input_ids"])
    assert bpe.eos_token_id == bpe.pad_token_id == theirs.eos_token_id == bpe.eot_id
    assert len(bpe) == len(theirs) == bpe.vocab_size
    assert ours.to("cpu").input_ids.device.type == "cpu" and isinstance(ours.to("cpu"), type(ours))

    for bad, message in [
        ({"return_tensors": "pt"}, "cannot be tensors: pass padding=True"),
        ({"return_tensors": "tf"}, "lists or torch tensors"),
        ({"padding": "max_to_the_moon"}, "pad to the longest"),
        ({"truncation": True, "max_length": 0}, "needs max_length >= 1"),
        ({"padding": True, "padding_side": "middle"}, "'left' or 'right'"),
    ]:
        with pytest.raises(ValueError, match=message):
            bpe(texts, **bad)
    with pytest.raises(ValueError, match="no texts"):
        bpe([], return_tensors="pt")
    with pytest.raises(AttributeError):
        ours.token_type_ids  # noqa: B018


def test_more_of_transformers_tokenizer_names_give_what_they_give(bpe: Tokenizer, tmp_path: Path) -> None:
    """encode(return_tensors="pt"), tokenize, the token/id conversions, get_vocab, the special tokens,
    `tok.pad_token = ...` (which then pads) and decode's clean_up_tokenization_spaces, against transformers."""  # noqa: E501
    import torch
    from transformers import AutoTokenizer

    bpe.save_pretrained(tmp_path, model_max_length=6)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_pretrained(tmp_path)
    assert ours.model_max_length == theirs.model_max_length == 6
    assert ours.pad_token_id == theirs.pad_token_id == ours.eot_id  # saved as end-of-text: both pad with it
    text = "The king ' s crown , they say , isn ' t his . Is it ? No !"
    assert torch.equal(ours.encode(text, return_tensors="pt"), theirs.encode(text, return_tensors="pt"))
    assert ours.encode(text, return_tensors="pt").shape == (1, len(ours.encode(text)))
    tokens = ours.tokenize(text)
    assert tokens == theirs.tokenize(text)
    assert ours.convert_tokens_to_ids(tokens) == theirs.convert_tokens_to_ids(tokens) == ours.encode(text)
    assert ours.convert_tokens_to_ids(tokens[1]) == theirs.convert_tokens_to_ids(tokens[1])
    assert ours.convert_ids_to_tokens(ours.encode(text)) == tokens
    assert ours.convert_ids_to_tokens(torch.tensor(ours.encode(text))[3]) == tokens[3]
    assert ours.get_vocab() == theirs.get_vocab()
    assert ours.convert_tokens_to_ids("zzzqqq") == theirs.convert_tokens_to_ids("zzzqqq") == ours.eot_id  # unk
    assert ours.convert_ids_to_tokens([5, 10**6]) == theirs.convert_ids_to_tokens([5, 10**6])  # None beyond
    with_eot = [*ours.encode(text)[:3], ours.eot_id]
    assert ours.convert_ids_to_tokens(with_eot, skip_special_tokens=True) == theirs.convert_ids_to_tokens(
        with_eot, skip_special_tokens=True
    )
    assert ours.decode(5) == theirs.decode(5)
    for kw in [
        dict(max_length=4),
        dict(truncation=True, max_length=4),
        dict(truncation=False, max_length=4),
        dict(truncation="do_not_truncate", max_length=4),
        dict(truncation="longest_first", max_length=4),
        dict(truncation=True),  # to model_max_length, from tokenizer_config.json
    ]:
        assert ours.encode(text, **kw) == theirs.encode(text, **kw), kw
    assert (ours.eos_token, ours.bos_token, ours.bos_token_id) == (theirs.eos_token, theirs.bos_token, ours.eot_id)
    ids = ours.encode(text)
    for clean in (True, False):
        assert ours.decode(ids, clean_up_tokenization_spaces=clean) == theirs.decode(
            ids, clean_up_tokenization_spaces=clean
        )
        assert ours.batch_decode([ids], clean_up_tokenization_spaces=clean) == theirs.batch_decode(
            [ids], clean_up_tokenization_spaces=clean
        )
    assert ours.decode(ids, clean_up_tokenization_spaces=True) == text  # byte-level BPE: the text as it was

    ours.pad_token = ours.eos_token  # the line transformers' GPT-2 users write: the end-of-text id still pads
    assert ours.pad_token == EOT and ours.pad_token_id == ours.eot_id
    other = tokens[0]
    ours.pad_token = theirs.pad_token = other  # another token of the vocabulary pads from then on
    theirs.padding_side = "left"
    assert ours.pad_token_id == theirs.pad_token_id == ours.convert_tokens_to_ids(other)
    batch = ["a", "The king loves the crown."]
    assert dict(ours(batch, padding=True)) == dict(theirs(batch, padding=True))
    ours.save_pretrained(tmp_path / "padded")  # the pad token is saved, and read back by both
    assert Tokenizer.from_pretrained(tmp_path / "padded").pad_token_id == ours.pad_token_id
    assert AutoTokenizer.from_pretrained(tmp_path / "padded").pad_token_id == ours.pad_token_id
    theirs.save_pretrained(tmp_path / "theirs")  # and one transformers saved
    assert Tokenizer.from_pretrained(tmp_path / "theirs").pad_token_id == theirs.pad_token_id
    (tmp_path / "theirs" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.warns(UserWarning, match="pad token '<pad>' is not in the vocabulary; padding with"):
        assert Tokenizer.from_pretrained(tmp_path / "theirs").pad_token_id == ours.eot_id
    ours.pad_token_id = ours.eot_id
    assert ours.pad_token == EOT
    with pytest.raises(ValueError, match="not in the vocabulary"):
        ours.pad_token = "[PAD]"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ours.pad_token_id = len(ours)
    with pytest.raises(ValueError, match="lists or torch tensors"):
        ours.encode(text, return_tensors="np")


def test_special_tokens_and_lengths_a_directory_names(tmp_path: Path) -> None:
    """encode adds a post-processor's special tokens unless told not to, as transformers' does;
    model_max_length: a real limit is kept through save_pretrained, "none" stays none (truncation and
    padding="max_length" then do nothing, as in transformers)."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    tok = Tokenizer.char()
    tok.tok.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", special_tokens=[(EOT, tok.eot_id)])
    tok.save_pretrained(tmp_path / "template")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "template")
    ours = Tokenizer.from_pretrained(tmp_path / "template")
    assert ours.encode("ab", add_special_tokens=False) == theirs.encode("ab", add_special_tokens=False) == [97, 98]
    assert ours.encode("ab") == theirs.encode("ab") == ours(["ab"])["input_ids"][0] == [tok.eot_id, 97, 98]

    assert ours.model_max_length is None  # saved without a limit: none, for transformers too
    assert theirs.model_max_length > 10**20
    for kw in [dict(padding="max_length"), dict(truncation=True)]:  # no limit: nothing to pad or cut to
        assert dict(ours(["abc", "a"], **kw)) == dict(theirs(["abc", "a"], **kw)), kw
    tok.save_pretrained(tmp_path / "limited", model_max_length=64)
    again = Tokenizer.from_pretrained(tmp_path / "limited")
    again.save_pretrained(tmp_path / "again")  # re-saved without saying: the limit stays
    assert Tokenizer.from_pretrained(tmp_path / "again").model_max_length == 64
    assert AutoTokenizer.from_pretrained(tmp_path / "again").model_max_length == 64
    config = json.loads((tmp_path / "limited" / "tokenizer_config.json").read_text())
    (tmp_path / "limited" / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 10**9}))
    assert Tokenizer.from_pretrained(tmp_path / "limited").model_max_length is None  # older bigmodel's "none"


def test_from_file_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        Tokenizer.from_file(tmp_path / "nope.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


# ----- GPT-2's vocab.json + merges.txt ----------------------------------------------------------------------
def _vocab_merges_texts(corpus_dir: Path) -> list[str]:
    doc = (corpus_dir / "doc02.txt").read_text(encoding="utf-8")
    return [doc[:600], doc[-300:], f"end{EOT}start", f"two {EOT}{EOT} eots", *UNICODE_SAMPLES]


def _write_gpt2_layout(bpe: Tokenizer, folder: Path) -> None:
    """vocab.json + merges.txt as GPT-2 ships them: end-of-text a plain vocab entry, with the last id."""
    bpe.tok.model.save(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    order = sorted((t for t in vocab if t != EOT), key=vocab.__getitem__)
    (folder / "vocab.json").write_text(json.dumps({**{t: i for i, t in enumerate(order)}, EOT: len(order)}))


@pytest.mark.parametrize("layout", ["ours", "gpt2"])
def test_vocab_and_merges_encode_like_tokenizer_json_and_transformers(
    bpe: Tokenizer, corpus_dir: Path, tmp_path: Path, layout: str
) -> None:
    from transformers import GPT2Tokenizer

    if layout == "ours":
        written = bpe.tok.model.save(str(tmp_path))  # HF tokenizers writes GPT-2's two files
        assert sorted(Path(p).name for p in written) == ["merges.txt", "vocab.json"]
    else:
        _write_gpt2_layout(bpe, tmp_path)
    assert not (tmp_path / "tokenizer.json").exists()
    ours = Tokenizer.from_pretrained(tmp_path)
    theirs = GPT2Tokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == bpe.vocab_size == len(theirs)
    assert ours.eot_id == theirs.eos_token_id == (0 if layout == "ours" else bpe.vocab_size - 1)
    # the same merges under other ids: map bpe's ids to this vocabulary's through the token strings
    to_here = {i: ours.tok.token_to_id(bpe.tok.id_to_token(i)) for i in range(bpe.vocab_size)}
    for text in _vocab_merges_texts(corpus_dir):
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ids == [to_here[i] for i in bpe.encode(text)], text
        assert ours.decode(ids) == text
    assert ours.encode(f"a{EOT}b").count(ours.eot_id) == 1  # the literal end-of-text text is the special token
    assert ours.decode(ours.encode(f"a{EOT}b"), skip_special_tokens=True) == "ab"


def test_vocab_without_merges_is_an_error(bpe: Tokenizer, tmp_path: Path) -> None:
    bpe.tok.model.save(str(tmp_path))
    (tmp_path / "merges.txt").unlink()
    with pytest.raises(UserError, match=r"has no tokenizer.json \(nor vocab.json \+ merges.txt\)"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "merges.txt").write_text("#version: 0.2\nnot-a-token anotherone\n")
    with pytest.raises(UserError, match="not a valid byte-level BPE"):
        Tokenizer.from_pretrained(tmp_path)
