"""Source -> target pairs for the seq2seq task: TSV files and two built-in tasks with exact answers.

`load_pairs(spec)` accepts
  * `numbers`: English number words -> digits ("three hundred and forty-two" -> "342"), 0 to 999,999;
  * `dates`: dates written in free form -> ISO 8601 ("Thursday, March 5, 1998", "the 5th of march 1998",
    "5 Mar 1998", ... -> "1998-03-05"), 1900 to 2099;
  * a folder with `train.tsv` and optionally `val.tsv`, or one `.tsv` file: one `source<TAB>target` per line.
The built-in sets are generated from a fixed seed: 20,000 training and 1,000 validation pairs, no
validation answer seen in training (except the words for numbers below 100), so a translator can be
watched learning in minutes on a CPU. Without a val file, a deterministic 10% of the lines (chosen by a
hash of the source) is held out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bigmodel.errors import UserError

BUILTIN_PAIRS = ("numbers", "dates")
N_TRAIN, N_VAL = 20_000, 1_000
VAL_FRACTION = 0.1

Pair = tuple[str, str]


@dataclass
class PairData:
    name: str
    train: list[Pair]
    val: list[Pair]

    def fingerprint(self) -> str:
        h = hashlib.sha256("\n".join(f"{s}\t{t}" for s, t in self.train).encode("utf-8"))
        return f"{self.name}:{len(self.train)}:{h.hexdigest()[:16]}"


def load_pairs(spec: str | Path) -> PairData:
    text = str(spec)
    if text in BUILTIN_PAIRS:
        if text == "numbers":  # no validation number >= 100 is seen in training, in any wording
            train, val = _generate(number_pair, lambda p: p[1] if len(p[1]) >= 3 else p[0])
        else:  # no validation date is seen in training, in any wording
            train, val = _generate(date_pair, lambda p: p[1])
        return PairData(text, train, val)
    path = Path(spec)
    if path.is_dir():
        if not (path / "train.tsv").is_file():
            raise UserError(f"{path} has no train.tsv; put one 'source<TAB>target' pair per line there")
        train = read_tsv(path / "train.tsv")
        if (path / "val.tsv").is_file():
            return PairData(path.name, train, read_tsv(path / "val.tsv"))
        return _holdout(path.name, train)
    if path.is_file():
        return _holdout(path.name, read_tsv(path))
    raise UserError(
        f"--data {spec}: no such file or folder; pass {' or '.join(BUILTIN_PAIRS)}, a .tsv file "
        "(source<TAB>target per line) or a folder with train.tsv (+ val.tsv)"
    )


def read_tsv(path: Path) -> list[Pair]:
    pairs = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            source, sep, target = line.partition("\t")
            if not sep or "\t" in target:
                raise UserError(f"{path}:{i}: expected exactly one tab between source and target")
            pairs.append((source, target))
    if not pairs:
        raise UserError(f"{path} holds no source<TAB>target lines")
    return pairs


def _holdout(name: str, pairs: list[Pair]) -> PairData:
    def held(source: str) -> bool:
        return (
            int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:4], "little") % 1000 < VAL_FRACTION * 1000
        )

    train = [p for p in pairs if not held(p[0])]
    val = [p for p in pairs if held(p[0])]
    if not train or not val:
        raise UserError(f"{name}: {len(pairs)} pairs are too few to hold out 10% for validation; add a val.tsv")
    return PairData(name, train, val)


def _generate(make: Callable[[random.Random], Pair], key: Callable[[Pair], str]) -> tuple[list[Pair], list[Pair]]:
    """N_VAL distinct validation pairs, then N_TRAIN training pairs none of which shares a validation key."""
    rng = random.Random(1234)
    val: list[Pair] = []
    seen: set[str] = set()
    while len(val) < N_VAL:
        pair = make(rng)
        if pair[0] not in seen:
            seen.add(pair[0])
            val.append(pair)
    held = {key(p) for p in val}
    train: list[Pair] = []
    while len(train) < N_TRAIN:
        pair = make(rng)
        if key(pair) not in held:
            train.append(pair)
    return train, val


# ----- numbers -----------------------------------------------------------------------------------------

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen \
seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int, *, use_and: bool = False, hyphen: bool = True) -> str:
    """0 <= n < 1,000,000 in English words: 342 -> "three hundred forty-two" (British: "... and forty-two")."""
    if not 0 <= n < 1_000_000:
        raise ValueError(f"number_words: {n} is out of range 0..999999")
    if n == 0:
        return "zero"

    def below_thousand(k: int) -> list[str]:
        words: list[str] = []
        if k >= 100:
            words += [_ONES[k // 100], "hundred"]
            k %= 100
            if k and use_and:
                words.append("and")
        if k >= 20:
            tens, ones = divmod(k, 10)
            if ones:
                words += [f"{_TENS[tens]}-{_ONES[ones]}"] if hyphen else [_TENS[tens], _ONES[ones]]
            else:
                words.append(_TENS[tens])
        elif k:
            words.append(_ONES[k])
        return words

    thousands, rest = divmod(n, 1000)
    words = below_thousand(thousands) + ["thousand"] if thousands else []
    if rest and thousands and rest < 100 and use_and:
        words.append("and")
    return " ".join(words + below_thousand(rest))


def number_pair(rng: random.Random) -> Pair:
    digits = rng.randint(1, 6)  # as many short numbers as long ones
    n = rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)
    return number_words(n, use_and=rng.random() < 0.3, hyphen=rng.random() < 0.7), str(n)


# ----- dates -------------------------------------------------------------------------------------------

_MONTHS = "January February March April May June July August September October November December".split()
_FIRST = dt.date(1900, 1, 1).toordinal()
_LAST = dt.date(2099, 12, 31).toordinal()


def _ordinal(d: int) -> str:
    suffix = "th" if 10 <= d % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(d % 10, "th")
    return f"{d}{suffix}"


def date_text(date: dt.date, style: int) -> str:
    """One of 10 free-form wordings of `date` (style 0..9)."""
    month, short = _MONTHS[date.month - 1], _MONTHS[date.month - 1][:3]
    day, year, weekday = date.day, date.year, date.strftime("%A")
    forms = [
        f"{month} {day}, {year}",
        f"{day} {month} {year}",
        f"{short} {day} {year}",
        f"{day} {short}. {year}",
        f"{month.lower()} {_ordinal(day)} {year}",
        f"{weekday}, {month} {day}, {year}",
        f"{weekday[:3]} {day} {short} {year}",
        f"the {_ordinal(day)} of {month} {year}",
        f"{year}, {month} {day}",
        f"{month.upper()} {day} {year}",
    ]
    return forms[style]


def date_pair(rng: random.Random) -> Pair:
    date = dt.date.fromordinal(rng.randint(_FIRST, _LAST))
    return date_text(date, rng.randrange(10)), date.isoformat()
