"""`prepare`: text -> token shards + manifest; exact round-trips, splits, shards, inputs and errors."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import bigmodel.data.prepare as prepare_mod
from bigmodel.corpora import iter_documents
from bigmodel.data.prepare import prepare
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from conftest import split_documents, split_tokens, write_corpus

CHAR_EOT = 256


def _docs_bytes(data: Path, split: str) -> list[bytes]:
    """Documents of a char-tokenized split as raw bytes (char ids are byte values)."""
    return [bytes(d) for d in split_documents(split_tokens(data, split), CHAR_EOT)]


def _assert_nothing_left(out: Path) -> None:
    assert not out.exists(), f"{out} was created by a failed prepare"
    if out.parent.exists():
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
        assert leftovers == [], f"temporary folders left behind: {leftovers}"


def _char(inputs: list[Path | str], out: Path, **kwargs: Any) -> dict[str, Any]:
    return prepare([str(i) for i in inputs], out, tokenizer="char", progress=False, **kwargs)


# ----- round trips and the manifest -------------------------------------------------------------------------
def test_char_round_trip_is_exact(corpus_dir: Path, char_data: Path) -> None:
    originals = sorted(p.read_bytes() for p in corpus_dir.glob("*.txt"))
    train, val = _docs_bytes(char_data, "train"), _docs_bytes(char_data, "val")
    assert len(train) == 6 and len(val) == 2  # round(8 * 0.25) whole documents held out
    assert sorted(train + val) == originals
    assert not set(train) & set(val)


def test_bpe_round_trip(corpus_dir: Path, bpe_data: Path) -> None:
    tok = Tokenizer.from_pretrained(bpe_data)
    manifest = json.loads((bpe_data / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"kind": "bpe", "file": "tokenizer.json", "eot_id": tok.eot_id}
    assert manifest["vocab_size"] == tok.vocab_size == 300
    texts = [tok.decode(d) for s in ("train", "val") for d in split_documents(split_tokens(bpe_data, s), tok.eot_id)]
    assert sorted(texts) == sorted(p.read_text(encoding="utf-8") for p in corpus_dir.glob("*.txt"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("which", ["char_data", "bpe_data"])
def test_shards_match_manifest(which: str, corpus_dir: Path, request: pytest.FixtureRequest) -> None:
    data: Path = request.getfixturevalue(which)
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["format"] == "bigmodel-token-shards" and manifest["format_version"] == 1
    assert manifest["dtype"] == "uint16" and manifest["byte_order"] == "little"
    on_disk = sorted(p.name for p in data.glob("*.bin"))
    assert on_disk == sorted(s["file"] for s in manifest["shards"]) == ["train-00000.bin", "val-00000.bin"]
    for shard in manifest["shards"]:
        path = data / shard["file"]
        assert path.stat().st_size == 2 * shard["tokens"]
        assert _sha256(path) == shard["sha256"]
    for split in ("train", "val"):
        tokens = sum(s["tokens"] for s in manifest["shards"] if s["split"] == split)
        assert manifest["splits"][split]["tokens"] == tokens == len(split_tokens(data, split))
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "val")) == 8
    total_bytes = sum(p.stat().st_size for p in corpus_dir.glob("*.txt"))
    assert manifest["splits"]["train"]["bytes"] + manifest["splits"]["val"]["bytes"] == total_bytes
    assert manifest["sources"] == [{"path": str(corpus_dir), "bytes": total_bytes, "files": 8}]
    assert (data / "tokenizer.json").is_file() and (data / "tokenizer_config.json").is_file()


def test_char_tokens_are_the_bytes(corpus_dir: Path, char_data: Path) -> None:
    manifest = json.loads((char_data / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "char" and manifest["vocab_size"] == 257
    train = split_tokens(char_data, "train")
    assert train.max() == CHAR_EOT and (train == CHAR_EOT).sum() == manifest["splits"]["train"]["documents"]
    assert len(train) == manifest["splits"]["train"]["bytes"] + manifest["splits"]["train"]["documents"]


# ----- splits -----------------------------------------------------------------------------------------------
def test_val_split_is_deterministic_and_by_document(corpus_dir: Path, char_data: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    _char([corpus_dir], again, val_fraction=0.25)
    assert _docs_bytes(again, "val") == _docs_bytes(char_data, "val")
    assert _docs_bytes(again, "train") == _docs_bytes(char_data, "train")
    m1 = json.loads((char_data / "manifest.json").read_text())
    m2 = json.loads((again / "manifest.json").read_text())
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    # whole files: every val document is one complete input file
    files = {p.read_bytes() for p in corpus_dir.glob("*.txt")}
    assert all(d in files for d in _docs_bytes(char_data, "val"))


def test_val_fraction_bounds(corpus_dir: Path, tmp_path: Path) -> None:
    m = _char([corpus_dir], tmp_path / "none", val_fraction=0.0)
    assert m["splits"]["val"]["tokens"] == 0 and m["splits"]["train"]["documents"] == 8
    assert not any(s["split"] == "val" for s in m["shards"])
    m = _char([corpus_dir], tmp_path / "most", val_fraction=0.99)
    assert m["splits"]["train"]["documents"] == 1 and m["splits"]["val"]["documents"] == 7  # never all
    with pytest.raises(UserError, match="--val-fraction 1"):
        _char([corpus_dir], tmp_path / "bad", val_fraction=1.0)


def test_single_file_is_split_at_a_line_boundary(tmp_path: Path) -> None:
    lines = [f"line {i}: " + "word " * (i % 7) for i in range(300)]
    text = "\n".join(lines) + "\n"
    src = tmp_path / "one.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    m = _char([src], out, val_fraction=0.1)
    (train,), (val,) = _docs_bytes(out, "train"), _docs_bytes(out, "val")
    assert train + val == text.encode()
    assert train.endswith(b"\n") and len(val) > 0
    assert 0.05 < len(val) / len(text) < 0.15
    assert m["splits"]["val"]["documents"] == 1 and m["splits"]["train"]["documents"] == 1


def test_single_file_without_newline_near_the_end_is_split_on_a_character(tmp_path: Path) -> None:
    text = "日本語のテキスト" * 4  # valid UTF-8, 96 bytes, no newline: the 90% cut lands inside a character
    src = tmp_path / "one.txt"
    src.write_text(text, encoding="utf-8")
    out = tmp_path / "data"
    _char([src], out, val_fraction=0.1)
    assert b"".join(_docs_bytes(out, "train") + _docs_bytes(out, "val")) == text.encode()


def test_single_builtin_like_document_is_also_split(tmp_path: Path) -> None:
    docs = [prepare_mod.Document(name="mem", data=b"a\nbb\nccc\ndddd\neeeee\n")]
    train, val = prepare_mod.assign_splits(docs, 0.5)
    assert train.data is not None and val.data is not None
    assert train.data + val.data == b"a\nbb\nccc\ndddd\neeeee\n"
    assert train.data == b"a\nbb\nccc\ndddd\n"  # the cut (byte 10) moves forward to the next line start
    assert val.split == "val" and train.split == "train"


def test_small_shard_tokens_give_several_shards(corpus_dir: Path, char_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "sharded"
    m = _char([corpus_dir], out, val_fraction=0.25, shard_tokens=2000)
    train_shards = [s for s in m["shards"] if s["split"] == "train"]
    val_shards = [s for s in m["shards"] if s["split"] == "val"]
    assert len(train_shards) >= 5 and len(val_shards) >= 2
    for shards in (train_shards, val_shards):
        assert [s["file"] for s in shards] == [f"{shards[0]['split']}-{i:05d}.bin" for i in range(len(shards))]
        assert all(s["tokens"] == 2000 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 2000
        for s in shards:
            assert (out / s["file"]).stat().st_size == 2 * s["tokens"] and _sha256(out / s["file"]) == s["sha256"]
    for split in ("train", "val"):  # same token stream as with one shard per split
        np.testing.assert_array_equal(split_tokens(out, split), split_tokens(char_data, split))


def test_jsonl_input(tmp_path: Path) -> None:
    texts = [f"record {i}: the king speaks to the ghost, café ✓\nsecond line {i}\n" for i in range(30)]
    src = tmp_path / "records.jsonl"
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)]
    src.write_text("\n".join(lines[:10]) + "\n\n" + "\n".join(lines[10:]) + "\n", encoding="utf-8")  # blank line
    out = tmp_path / "data"
    m = _char([src], out, val_fraction=0.2)
    got = _docs_bytes(out, "train") + _docs_bytes(out, "val")
    assert sorted(got) == sorted(t.encode() for t in texts)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 30
    assert 0 < m["splits"]["val"]["documents"] < 30


def test_folder_with_txt_and_jsonl(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("plain text file\n")
    (folder / "sub" / "b.jsonl").write_text(json.dumps({"text": "from jsonl"}) + "\n")
    (folder / "notes.md").write_text("ignored: not .txt or .jsonl\n")
    out = tmp_path / "data"
    _char([folder], out, val_fraction=0.0)
    assert sorted(_docs_bytes(out, "train")) == [b"from jsonl", b"plain text file\n"]


@pytest.mark.parametrize(
    "content, match",
    [
        ('{"text": 5}\n', r'records.jsonl:1: expected an object with a string "text" field'),
        ('{"text": "ok"}\n{"body": "x"}\n', r"records.jsonl:2: expected"),
        ('{"text": "ok"}\n{broken\n', r"records.jsonl:2: not valid JSON"),
    ],
)
def test_jsonl_errors(tmp_path: Path, content: str, match: str) -> None:
    src = tmp_path / "records.jsonl"
    src.write_text(content)
    out = tmp_path / "out" / "data"
    with pytest.raises(UserError, match=match):
        _char([src], out)
    _assert_nothing_left(out)


def test_builtin_shakespeare_documents() -> None:
    docs = list(iter_documents("shakespeare"))
    assert len(docs) == 42
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(set(names)) == 42 and all(n.startswith("shakespeare/") for n in names)
    assert all(len(b) > 1_000 for _, b in docs)
    assert 4_500_000 < sum(len(b) for _, b in docs) < 6_000_000
    assert all(b.isascii() for _, b in docs)


# ----- errors, and nothing half-written --------------------------------------------------------------------
def test_missing_input(tmp_path: Path) -> None:
    out = tmp_path / "out" / "data"
    with pytest.raises(
        UserError, match=r"input .*nope\.txt does not exist \(built-in corpora: shakespeare, genre-train\)"
    ):
        _char([tmp_path / "nope.txt"], out)
    _assert_nothing_left(out)
    with pytest.raises(UserError, match="no input given"):
        prepare([], out, progress=False)


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_empty_corpus(tmp_path: Path, tokenizer: str) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    for i in range(3):
        (folder / f"e{i}.txt").write_text("")
    out = tmp_path / "out" / "data"
    with pytest.raises(UserError, match="the corpus is empty"):
        prepare([str(folder)], out, tokenizer=tokenizer, vocab_size=300, progress=False)
    _assert_nothing_left(out)


def test_folder_without_text_files(tmp_path: Path) -> None:
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "readme.md").write_text("# not a corpus\n")
    out = tmp_path / "out" / "data"
    with pytest.raises(UserError, match=r"folder .*docs has no \.txt or \.jsonl files"):
        _char([folder], out)
    _assert_nothing_left(out)


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "corpus"
    write_corpus(folder, n_docs=3, lines=5)
    locked = folder / "doc01.txt"
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: emulate the permission check failing for this one file
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != locked and real_access(p, mode))
    out = tmp_path / "out" / "data"
    try:
        with pytest.raises(UserError, match=r"cannot read .*doc01\.txt: permission denied"):
            _char([folder], out)
    finally:
        locked.chmod(0o644)
    _assert_nothing_left(out)


BAD_UTF8 = b"good line\nbad " + b"\xff" + b" byte\nmore text\n"  # \xff at byte offset 14


def _bad_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    write_corpus(folder, n_docs=3, lines=5)
    (folder / "doc01.txt").write_bytes(BAD_UTF8)
    return folder


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_invalid_utf8_strict_names_file_and_offset(tmp_path: Path, tokenizer: str) -> None:
    folder = _bad_corpus(tmp_path)
    out = tmp_path / "out" / "data"
    with pytest.raises(UserError, match=r"doc01\.txt: invalid UTF-8 at byte offset 14; .*--errors replace\|skip"):
        prepare([str(folder)], out, tokenizer=tokenizer, vocab_size=300, progress=False)
    _assert_nothing_left(out)


def test_invalid_utf8_offset_across_read_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_mod, "CHUNK_BYTES", 7)  # odd: chunks end inside the 2-byte "é"s
    folder = tmp_path / "corpus"
    write_corpus(folder, n_docs=2, lines=3)
    (folder / "doc01.txt").write_bytes(("é" * 20 + "\n").encode() + ("é" * 10).encode() + b"\xff" + b"x\n")
    out = tmp_path / "out" / "data"
    with pytest.raises(UserError, match=r"doc01\.txt: invalid UTF-8 at byte offset 61;"):
        _char([folder], out, val_fraction=0.0)
    _assert_nothing_left(out)


def test_truncated_utf8_at_end(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    write_corpus(folder, n_docs=2, lines=3)
    (folder / "doc01.txt").write_bytes(b"ends inside a character \xc3")
    out = tmp_path / "out" / "data"
    with pytest.raises(UserError, match=r"doc01\.txt: truncated UTF-8"):
        _char([folder], out, val_fraction=0.0)
    _assert_nothing_left(out)


@pytest.mark.parametrize(
    "errors, expected",
    [("replace", "good line\nbad \ufffd byte\nmore text\n".encode()), ("skip", b"good line\nbad  byte\nmore text\n")],
)
def test_invalid_utf8_replace_and_skip(tmp_path: Path, errors: str, expected: bytes) -> None:
    folder = _bad_corpus(tmp_path)
    out = tmp_path / "data"
    m = _char([folder], out, errors=errors, val_fraction=0.0)
    assert m["errors"] == errors
    docs = _docs_bytes(out, "train")
    assert expected in docs
    assert len(docs) == 3


def test_invalid_utf8_in_jsonl(tmp_path: Path) -> None:
    src = tmp_path / "r.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "bad \xff"}\n')
    out = tmp_path / "out" / "data"
    with pytest.raises(UserError, match=r"r\.jsonl:2: invalid UTF-8"):
        _char([src], out)
    _assert_nothing_left(out)
    _char([src], out, errors="replace", val_fraction=0.0)
    assert sorted(_docs_bytes(out, "train")) == sorted([b"fine", "bad \ufffd".encode()])


def test_bad_arguments(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "data"
    with pytest.raises(UserError, match="--errors 'ignore' is invalid"):
        _char([corpus_dir], out, errors="ignore")
    with pytest.raises(UserError, match="--shard-tokens 0 is invalid"):
        _char([corpus_dir], out, shard_tokens=0)
    _assert_nothing_left(out)


def test_existing_output_is_refused_unless_overwrite(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"output folder .*data exists and is not empty; .*--overwrite"):
        _char([corpus_dir], out)
    assert (out / "precious.txt").read_text() == "keep me"

    _char([corpus_dir], out, overwrite=True)
    assert not (out / "precious.txt").exists()
    assert (out / "manifest.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no .partial/.old folders left beside it

    empty = tmp_path / "empty"
    empty.mkdir()
    _char([corpus_dir], empty)  # an existing empty folder is fine
    assert (empty / "manifest.json").is_file()


def test_output_that_is_a_file_is_refused(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.write_text("a file, not a folder")
    with pytest.raises(UserError, match="data"):
        _char([corpus_dir], out)
    assert out.read_text() == "a file, not a folder"


def test_failed_overwrite_keeps_the_old_output(corpus_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    _char([corpus_dir], out)
    before = (out / "manifest.json").read_text()
    bad = _bad_corpus(tmp_path / "bad")
    with pytest.raises(UserError, match="invalid UTF-8"):
        _char([bad], out, overwrite=True)
    assert (out / "manifest.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "data"]
