"""Byte-level tokenizers built on Hugging Face `tokenizers`, saved as tokenizer.json.

Two kinds: `bpe` (byte-level BPE trained on the corpus, like GPT-2's) and `char` (one token per byte:
256 byte tokens, no merges, so any text round-trips). Both end their vocabulary with `<|endoftext|>`,
which separates documents in the shards. Saved directories load with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from bigmodel import atomic
from bigmodel.errors import UserError

EOT = "<|endoftext|>"


def _byte_level(model: models.Model) -> HFTokenizer:
    tok = HFTokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


class Tokenizer:
    """A thin, typed wrapper over `tokenizers.Tokenizer` with the end-of-text token bigmodel relies on."""

    def __init__(self, tok: HFTokenizer, kind: str = "bpe") -> None:
        eot = tok.token_to_id(EOT)
        if eot is None:
            raise UserError(f"tokenizer has no {EOT!r} token; bigmodel separates documents with it")
        self.tok = tok
        self.kind = kind
        self.eot_id: int = eot

    # ----- construction -------------------------------------------------------------------------------
    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
        if vocab_size < 257 + 1:
            raise UserError(f"--vocab-size {vocab_size} is too small for byte-level BPE: use at least 258")
        tok = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, "bpe")

    @classmethod
    def char(cls) -> Tokenizer:
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _BYTE_OF[c])
        vocab = {c: i for i, c in enumerate(alphabet)}
        vocab[EOT] = len(vocab)
        tok = _byte_level(models.BPE(vocab=vocab, merges=[]))
        tok.add_special_tokens([EOT])
        return cls(tok, "char")

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist; pass a tokenizer.json or bpe|char")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"{path} is not a valid tokenizer.json: {e}") from e
        kind = "char" if tok.get_vocab_size() == 257 else "bpe"
        return cls(tok, kind)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load a model directory's (or a data directory's) tokenizer: tokenizer.json, else GPT-2's
        vocab.json + merges.txt."""
        path = Path(path)
        if not path.is_dir() or (path / "tokenizer.json").is_file():
            return cls.from_file(path / "tokenizer.json" if path.is_dir() else path)
        vocab, merges = path / "vocab.json", path / "merges.txt"
        if not (vocab.is_file() and merges.is_file()):
            raise UserError(f"{path} has no tokenizer.json (nor vocab.json + merges.txt)")
        try:
            tok = _byte_level(models.BPE.from_file(str(vocab), str(merges)))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise UserError(f"{vocab} / {merges} are not a valid byte-level BPE: {e}") from e
        tok.add_special_tokens([EOT])  # GPT-2's vocab.json has it as a plain entry: mark it special
        return cls(tok, "bpe")

    # ----- use ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.tok.get_vocab_size())

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | Any, skip_special_tokens: bool = False) -> str:
        """Token ids (a list, or a 1-D tensor such as `model.generate(...)[0]`) -> text."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return str(self.tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def to_str(self) -> str:
        return str(self.tok.to_str())

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, self.to_str())

    def save_pretrained(self, path: str | Path, model_max_length: int | None = None) -> None:
        """tokenizer.json + tokenizer_config.json + special_tokens_map.json, as transformers writes them."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.save(path / "tokenizer.json")
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": EOT,
            "eos_token": EOT,
            "unk_token": EOT,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or 1_000_000_000,
            "bigmodel_kind": self.kind,
        }
        atomic.write_json(path / "tokenizer_config.json", config)
        atomic.write_json(path / "special_tokens_map.json", {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT})

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte value, inverted: char -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


_BYTE_OF = _bytes_to_unicode()
