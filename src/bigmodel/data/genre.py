"""`genre`: a text-classification set built from the built-in Shakespeare corpus (nothing is downloaded).

Passages of about `PASSAGE_CHARS` characters (cut at line ends) from 36 plays, each labelled comedy,
history or tragedy by the section of the First Folio (1623) its play was printed in; Pericles (not in
the Folio) and the poems are left out. The split is by play, so that no play has passages in both
train and test: in each genre, sorted by file name, every fourth play (the 4th, 8th, ...) is held out.
Passages start at the first act (or prologue / induction): the cast lists are not part of the text.

`genre-train` is a corpus for `bigmodel prepare`: the whole text of the training plays only, for
masked-LM pretraining (and a tokenizer) that never sees a held-out play (docs/zoo.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from bigmodel.corpora import iter_documents

GENRES = ("comedy", "history", "tragedy")
TRAIN_CORPUS = "genre-train"  # the training plays' text, a `bigmodel prepare` input
PASSAGE_CHARS = 256

FOLIO: dict[str, str] = {
    **dict.fromkeys(
        [
            "alls_well_that_ends_well",
            "as_you_like_it",
            "comedy_of_errors",
            "loves_labours_lost",
            "measure_for_measure",
            "merchant_of_venice",
            "merry_wives_of_windsor",
            "midsummer_nights_dream",
            "much_ado_about_nothing",
            "taming_of_the_shrew",
            "tempest",
            "twelfth_night",
            "two_gentlemen_of_verona",
            "winters_tale",
        ],
        "comedy",
    ),
    **dict.fromkeys(
        [
            "henry_iv_part_1",
            "henry_iv_part_2",
            "henry_v",
            "henry_vi_part_1",
            "henry_vi_part_2",
            "henry_vi_part_3",
            "henry_viii",
            "john",
            "richard_ii",
            "richard_iii",
        ],
        "history",
    ),
    **dict.fromkeys(
        [
            "antony_and_cleopatra",
            "coriolanus",
            "cymbeline",
            "hamlet",
            "julius_caesar",
            "lear",
            "macbeth",
            "othello",
            "romeo_and_juliet",
            "timon_of_athens",
            "tragedy_of_titus_andronicus",
            "troilus_and_cressida",
        ],
        "tragedy",
    ),
}

_START = re.compile(r"^(ACT|PROLOGUE|INDUCTION)\b", re.IGNORECASE | re.MULTILINE)


@dataclass
class TextData:
    """Labelled passages: (text, class id) pairs split into train and validation."""

    name: str
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    labels: list[str]
    val_plays: list[str]

    def fingerprint(self) -> str:
        return f"{self.name}:{len(self.train)}:{len(self.val)}:{','.join(self.val_plays)}"


def held_out_plays() -> list[str]:
    """The test plays: every fourth play of each genre in file-name order."""
    held = []
    for genre in GENRES:
        plays = sorted(p for p, g in FOLIO.items() if g == genre)
        held += plays[3::4]
    return sorted(held)


def _play(name: str) -> str:
    return name.rsplit("/", 1)[-1].removesuffix(".txt")


def train_documents() -> Iterator[tuple[str, bytes]]:
    """(name, raw bytes) of the training plays (Folio plays not held out): the `genre-train` corpus."""
    held = set(held_out_plays())
    for name, raw in iter_documents("shakespeare"):
        if _play(name) in FOLIO and _play(name) not in held:
            yield name.replace("shakespeare/", f"{TRAIN_CORPUS}/", 1), raw


def passages(text: str, size: int = PASSAGE_CHARS) -> list[str]:
    """The play's text from its first act on, cut into consecutive passages of >= `size` characters at line ends."""
    start = _START.search(text)
    body = text[start.start() :] if start else text
    out, cur, length = [], [], 0
    for line in body.splitlines():
        cur.append(line)
        length += len(line) + 1
        if length >= size:
            passage = "\n".join(cur).strip()
            if passage:
                out.append(passage)
            cur, length = [], 0
    return out


def load_genre(size: int = PASSAGE_CHARS) -> TextData:
    held = set(held_out_plays())
    train: list[tuple[str, int]] = []
    val: list[tuple[str, int]] = []
    for name, raw in iter_documents("shakespeare"):
        play = _play(name)
        if play not in FOLIO:
            continue
        label = GENRES.index(FOLIO[play])
        items = [(p, label) for p in passages(raw.decode("utf-8", errors="replace"), size)]
        (val if play in held else train).extend(items)
    return TextData("genre", train, val, list(GENRES), sorted(held))
