"""Data for the zoo's tasks: arrays (.npy/.csv/built-in), TSV pairs and the built-in seq2seq sets, genre."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

import numpy as np
import pytest

from bigmodel.data.arrays import holdout_split, load_arrays
from bigmodel.data.genre import FOLIO, GENRES, TRAIN_CORPUS, held_out_plays, load_genre, passages, train_documents
from bigmodel.data.seq2seq import date_pair, date_text, load_pairs, number_pair, number_words, read_tsv
from bigmodel.errors import UserError


def test_builtin_arrays_are_sklearns_with_a_stratified_deterministic_split() -> None:
    from sklearn.datasets import load_digits

    d = load_arrays("digits")
    ref = load_digits()
    assert d.x_train.shape == (1438, 64) and d.x_val.shape == (359, 64) and d.labels == [str(i) for i in range(10)]
    assert d.x_train.dtype == np.float32 and d.y_train is not None and d.y_val is not None
    # every sample once, with its own label
    rows = np.concatenate([d.x_train, d.x_val])
    assert sorted(map(bytes, rows.astype(np.float64))) == sorted(map(bytes, ref.data.astype(np.float64)))
    assert abs(np.bincount(d.y_val) / len(d.y_val) - np.bincount(ref.target) / len(ref.target)).max() < 0.01
    again = load_arrays("digits")
    assert np.array_equal(again.x_val, d.x_val)  # the same split every time
    assert load_arrays("breast-cancer").labels == ["malignant", "benign"]


def test_holdout_split_without_labels() -> None:
    train, val = holdout_split(50, None, 0.2)
    assert len(val) == 10 and not set(train) & set(val) and len(train) + len(val) == 50


def test_csv_with_header_and_string_labels(tmp_path: Path) -> None:
    rows = ["a,b,kind"] + [f"{i},{i * 2},{'cat' if i % 3 else 'dog'}" for i in range(30)]
    (tmp_path / "data.csv").write_text("\n".join(rows) + "\n")
    d = load_arrays(tmp_path / "data.csv")
    assert d.labels == ["cat", "dog"] and d.x_train.shape[1] == 2
    assert len(d.x_train) + len(d.x_val) == 30
    (tmp_path / "plain.csv").write_text("1,2\n3,4\n5,6\n7,8\n9,10\n")
    unlabelled = load_arrays(tmp_path / "plain.csv", need_labels=False)  # autoencode: every column is a feature
    assert unlabelled.y_train is None and unlabelled.x_train.shape[1] == 2
    (tmp_path / "bad.csv").write_text("1,2,x\n3,oops,y\n")
    with pytest.raises(UserError, match="row 2 has a non-numeric feature"):
        load_arrays(tmp_path / "bad.csv")


def test_folder_of_npy_with_labels_and_val(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "train.npy", rng.normal(size=(20, 3, 4)))
    np.save(tmp_path / "train_labels.npy", np.arange(20) % 2 * 1.0)  # float labels that are whole numbers
    np.save(tmp_path / "val.npy", rng.normal(size=(6, 3, 4)))
    np.save(tmp_path / "val_labels.npy", np.arange(6) % 2)
    d = load_arrays(tmp_path)
    assert d.x_train.shape == (20, 3, 4) and d.x_val.shape == (6, 3, 4) and d.labels == ["0", "1"]
    np.save(tmp_path / "val_labels.npy", np.arange(5) % 2)
    with pytest.raises(UserError, match="expected 6 labels"):
        load_arrays(tmp_path)
    with pytest.raises(UserError, match="no such file or folder"):
        load_arrays(tmp_path / "missing")
    (tmp_path / "obj").mkdir()
    np.save(tmp_path / "obj" / "train.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="object arrays are refused"):
        load_arrays(tmp_path / "obj", need_labels=False)


@pytest.mark.parametrize(
    "n, words",
    [
        (0, "zero"),
        (7, "seven"),
        (15, "fifteen"),
        (40, "forty"),
        (42, "forty-two"),
        (100, "one hundred"),
        (342, "three hundred forty-two"),
        (1000, "one thousand"),
        (1005, "one thousand five"),
        (90210, "ninety thousand two hundred ten"),
        (999999, "nine hundred ninety-nine thousand nine hundred ninety-nine"),
    ],
)
def test_number_words(n: int, words: str) -> None:
    assert number_words(n) == words


def test_number_words_variants() -> None:
    assert number_words(342, use_and=True, hyphen=False) == "three hundred and forty two"
    assert number_words(1005, use_and=True) == "one thousand and five"
    rng = random.Random(0)
    for _ in range(200):
        words, digits = number_pair(rng)
        canonical = number_words(int(digits)).replace("-", " ")
        assert words.replace(" and ", " ").replace("-", " ") == canonical  # only the wording varies


def test_dates_are_exact() -> None:
    date = dt.date(1998, 3, 5)
    assert date_text(date, 0) == "March 5, 1998"
    assert date_text(date, 5) == "Thursday, March 5, 1998"  # the real weekday
    assert date_text(dt.date(2001, 1, 22), 7) == "the 22nd of January 2001"
    assert date_text(dt.date(2001, 1, 13), 4) == "january 13th 2001"
    rng = random.Random(1)
    for _ in range(100):
        text, iso = date_pair(rng)
        d = dt.date.fromisoformat(iso)
        assert str(d.year) in text and str(d.day) in text


def test_builtin_pairs_keep_validation_answers_out_of_training() -> None:
    data = load_pairs("dates")
    assert len(data.train) == 20_000 and len(data.val) == 1_000
    assert not {t for _, t in data.train} & {t for _, t in data.val}
    numbers = load_pairs("numbers")
    big_val = {t for _, t in numbers.val if len(t) >= 3}
    assert not {t for _, t in numbers.train} & big_val


def test_tsv_reading_and_holdout(tmp_path: Path) -> None:
    (tmp_path / "p.tsv").write_text("".join(f"src {i}\ttgt {i}\n" for i in range(200)) + "\n")
    pairs = load_pairs(tmp_path / "p.tsv")
    assert len(pairs.train) + len(pairs.val) == 200 and 5 < len(pairs.val) < 40
    assert load_pairs(tmp_path / "p.tsv").val == pairs.val
    (tmp_path / "bad.tsv").write_text("a\tb\nno tab here\n")
    with pytest.raises(UserError, match=r"bad.tsv:2: expected exactly one tab"):
        read_tsv(tmp_path / "bad.tsv")


def test_genre_is_split_by_play() -> None:
    held = held_out_plays()
    assert len(held) == 8 and {FOLIO[p] for p in held} == set(GENRES)
    data = load_genre()
    assert data.labels == ["comedy", "history", "tragedy"] and data.val_plays == held
    assert len(data.train) > 10_000 and len(data.val) > 3_000
    val_texts = {t for t, _ in data.val}
    assert not val_texts & {t for t, _ in data.train}


def test_passages_start_at_the_first_act() -> None:
    text = "TITLE\n\nPERSONS.\nHAMLET, a prince\n\nACT I.\nScene I.\n" + "Words of the play.\n" * 40
    parts = passages(text, size=100)
    assert parts[0].startswith("ACT I.") and all(len(p) >= 90 for p in parts)
    assert "HAMLET, a prince" not in "".join(parts)


def test_genre_train_corpus_holds_the_training_plays_only() -> None:
    """`bigmodel prepare genre-train` (MLM pretraining, a BPE) must never see a held-out play's text."""
    docs = dict(train_documents())
    plays = {name.rsplit("/", 1)[-1].removesuffix(".txt") for name in docs}
    assert plays == set(FOLIO) - set(held_out_plays()) and len(plays) == 28
    assert all(name.startswith(f"{TRAIN_CORPUS}/") for name in docs)
    train_text = b"".join(docs.values()).decode("utf-8", errors="replace")
    data = load_genre()
    assert all(t in train_text for t, _ in data.train[::500])
    assert not any(t in train_text for t, _ in data.val[::100])  # no held-out passage occurs in it
