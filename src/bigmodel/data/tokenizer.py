"""Byte-level tokenizers built on Hugging Face `tokenizers`, saved as tokenizer.json.

Two kinds: `bpe` (byte-level BPE trained on the corpus, like GPT-2's) and `char` (one token per byte:
256 byte tokens, no merges, so any text round-trips). Both end their vocabulary with `<|endoftext|>`,
which separates documents in the shards. Saved directories load with `AutoTokenizer.from_pretrained`.

Calls written for transformers' tokenizers work too: `tok(texts, return_tensors="pt", padding=True)`
gives the `input_ids` and `attention_mask` that `model.generate(**enc)` takes, `tok.encode(text,
return_tensors="pt")` one row, `tok.batch_decode(out)` the texts back; `eos_token` / `eos_token_id` (and
bos, and pad unless `tok.pad_token = ...` names another token) are the end-of-text token, `len(tok)` is the
vocabulary size, and `tokenize`, `convert_tokens_to_ids`, `convert_ids_to_tokens`, `get_vocab` are there.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, overload

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from bigmodel import atomic
from bigmodel.errors import UserError

EOT = "<|endoftext|>"
NO_LIMIT = 1_000_000_000  # a model_max_length this large means none


class Encoding(dict[str, Any]):
    """What calling a Tokenizer returns, as transformers' BatchEncoding: a dict of "input_ids" and
    "attention_mask" (so `model.generate(**enc)` takes it), whose keys read as attributes too
    (`enc.input_ids`), and `.to(device)` for tensors."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> Encoding:
        return Encoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


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
        self._pad_id = eot  # transformers' `tok.pad_token = ...` may name another token of the vocabulary
        self.model_max_length: int | None = None  # tokenizer_config.json's, read by from_pretrained

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
        vocab.json + merges.txt; and the pad token its tokenizer_config.json (or special_tokens_map.json)
        names, if any."""
        path = Path(path)
        tok = cls._from_files(path)
        if not path.is_dir():
            return tok
        config, special = (
            atomic.read_json_object(f) if f.is_file() else {}
            for f in (path / "tokenizer_config.json", path / "special_tokens_map.json")
        )
        limit = config.get("model_max_length")
        if isinstance(limit, int) and 0 < limit < NO_LIMIT:  # (older bigmodel directories wrote 1e9 for none)
            tok.model_max_length = limit
        pad = config.get("pad_token") or special.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str):
            try:
                tok.pad_token = pad
            except ValueError:  # a token transformers added to the vocabulary, which bigmodel does not
                warnings.warn(f"{path}: pad token {pad!r} is not in the vocabulary; padding with {EOT}", stacklevel=2)
        return tok

    @classmethod
    def _from_files(cls, path: Path) -> Tokenizer:
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

    @overload
    def encode(
        self,
        text: str,
        *,
        return_tensors: None = None,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> list[int]: ...

    @overload
    def encode(
        self,
        text: str,
        *,
        return_tensors: str,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> torch.Tensor: ...

    def encode(
        self,
        text: str,
        *,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        truncation: bool | str | None = None,
        max_length: int | None = None,
    ) -> list[int] | torch.Tensor:
        """Text -> token ids; with transformers' return_tensors="pt", a (1, T) tensor for `generate`
        (`model.generate(tok.encode(text, return_tensors="pt"))`). truncation and max_length as in the call
        (`__call__`), and so are add_special_tokens (on, as in transformers: a tokenizer.json's post-processor
        may add some; GPT-2's and bigmodel's add none)."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: bigmodel returns lists or torch tensors ('pt')")
        ids = self(text, truncation=truncation, max_length=max_length, add_special_tokens=add_special_tokens)[
            "input_ids"
        ]  # (one text: a list)
        return ids if return_tensors is None else torch.tensor([ids], dtype=torch.long)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(
        self, ids: Iterable[int] | Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> str:
        """Token ids (a list, or a 1-D tensor such as `model.generate(...)[0]`) -> text, byte for byte.
        clean_up_tokenization_spaces is taken and changes nothing, as in transformers 5 for byte-level BPE
        (its clean-up, meant for WordPiece, would remove spaces the text has)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else ids  # (a 0-d tensor gives an int)
        ids = [ids] if isinstance(ids, int) else list(ids)
        return str(self.tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def tokenize(self, text: str) -> list[str]:
        """Text -> its tokens as strings (byte-level: a leading space reads as 'Ġ'), as transformers' tokenize."""
        return list(self.tok.encode(text, add_special_tokens=False).tokens)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """A token string (or a list of them) -> its id; a string outside the vocabulary gives the unknown
        token's id, the end-of-text id (GPT-2's unk_token), as in transformers."""
        def one(token: str) -> int:
            found = self.tok.token_to_id(token)
            return self.eot_id if found is None else int(found)

        return one(tokens) if isinstance(tokens, str) else [one(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> str | None | list[str | None]:
        """An id (or ids: a list or tensor) -> its token string (None outside the vocabulary); with
        skip_special_tokens the end-of-text tokens are left out of a list."""
        if isinstance(ids, int) or (isinstance(ids, torch.Tensor) and ids.dim() == 0):
            return self.tok.id_to_token(int(ids))
        return [self.tok.id_to_token(int(i)) for i in ids if not (skip_special_tokens and int(i) == self.eot_id)]

    def get_vocab(self) -> dict[str, int]:
        """Every token string and its id, special tokens included."""
        return dict(self.tok.get_vocab(with_added_tokens=True))

    # ----- transformers' names ------------------------------------------------------------------------
    @property
    def eos_token_id(self) -> int:
        return self.eot_id

    @property
    def bos_token_id(self) -> int:
        """GPT-2's one special token begins texts as well as ending them."""
        return self.eot_id

    @property
    def eos_token(self) -> str:
        return EOT

    @property
    def bos_token(self) -> str:
        return EOT

    def __len__(self) -> int:
        """The vocabulary's size, special tokens included, as len() of a transformers tokenizer."""
        return self.vocab_size

    @property
    def pad_token_id(self) -> int:
        """The id that pads rows (`tok(texts, padding=True)`): the end-of-text id unless set (GPT-2 has no
        other special token). `tok.pad_token = tok.eos_token`, the line transformers' users write, keeps it."""
        return self._pad_id

    @pad_token_id.setter
    def pad_token_id(self, value: int) -> None:
        if not 0 <= int(value) < self.vocab_size:
            raise ValueError(f"pad_token_id={value} is outside the vocabulary [0, {self.vocab_size})")
        self._pad_id = int(value)

    @property
    def pad_token(self) -> str:
        return str(self.tok.id_to_token(self._pad_id))

    @pad_token.setter
    def pad_token(self, token: str) -> None:
        pad = self.tok.token_to_id(token)
        if pad is None:
            raise ValueError(
                f"pad_token {token!r} is not in the vocabulary (bigmodel adds no tokens): use tok.eos_token"
            )
        self._pad_id = pad

    def __call__(
        self,
        text: str | Sequence[str],
        *,
        return_tensors: str | None = None,
        padding: bool | str = False,
        padding_side: str = "left",
        truncation: bool | str | None = None,
        max_length: int | None = None,
        add_special_tokens: bool = True,
    ) -> Encoding:
        """Encode as transformers' tokenizers do: {"input_ids", "attention_mask"} as lists of ids (a list of
        lists for several texts), or with return_tensors="pt" as (B, T) tensors (a text gives one row).

        padding=True (or "longest") pads the rows to the longest with `pad_token_id`, on the left unless
        padding_side="right", and the mask marks the real tokens: `model.generate(**enc)` then continues
        each row as if it were alone, whichever the side (left is what generation wants; transformers pads
        GPT-2 on the right by default); padding="max_length" pads to `max_length`. truncation=True keeps the
        first `max_length` tokens of each row, and so does a `max_length` given without padding or
        truncation (as transformers does); without max_length they use `model_max_length`, the limit
        tokenizer_config.json names (none: no truncation, no padding to a length). Rows of different lengths
        need padding for tensors. `add_special_tokens` is handed to the underlying tokenizer (GPT-2's and
        bigmodel's add none)."""
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r}: bigmodel returns lists or torch tensors ('pt')")
        if padding not in (False, True, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding={padding!r}: use True/'longest' (pad to the longest row), 'max_length' or False")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side={padding_side!r}: use 'left' or 'right'")
        if truncation is None:  # transformers truncates to a max_length given with neither
            truncation = max_length is not None and padding in (False, "do_not_pad")
        truncate = truncation not in (False, "do_not_truncate")
        if (truncate or padding == "max_length") and max_length is None:  # transformers' fallback...
            max_length = self.model_max_length
            if max_length is None:  # ...and with no limit, nothing to truncate or pad to (as there)
                truncate, padding = False, False if padding == "max_length" else padding
        if (truncate or padding == "max_length") and (max_length is None or max_length < 1):
            raise ValueError(f"truncation=True or padding='max_length' needs max_length >= 1, got {max_length}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no texts to encode")
        rows = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=add_special_tokens)]
        if truncate:
            rows = [r[:max_length] for r in rows]
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest", "max_length"):
            width = max(len(r) for r in rows) if max_length is None or padding != "max_length" else max_length
            for i, (r, m) in enumerate(zip(rows, masks, strict=True)):  # (longer rows stay as they are)
                ids, zeros = [self._pad_id] * (width - len(r)), [0] * (width - len(r))
                rows[i], masks[i] = (ids + r, zeros + m) if padding_side == "left" else (r + ids, m + zeros)
        if return_tensors is None:
            if isinstance(text, str):
                return Encoding(input_ids=rows[0], attention_mask=masks[0])
            return Encoding(input_ids=rows, attention_mask=masks)
        if len({len(r) for r in rows}) > 1:
            raise ValueError(
                "rows of different lengths cannot be tensors: pass padding=True (or padding='max_length' "
                "with truncation=True)"
            )
        return Encoding(
            input_ids=torch.tensor(rows, dtype=torch.long).reshape(len(rows), -1),
            attention_mask=torch.tensor(masks, dtype=torch.long).reshape(len(rows), -1),
        )

    def batch_decode(
        self, sequences: Iterable[Any], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
    ) -> list[str]:
        """`decode` of each row (a 2-D tensor such as `model.generate(...)`, or a list of id lists)."""
        return [self.decode(ids, skip_special_tokens, clean_up_tokenization_spaces) for ids in sequences]

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
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length or self.model_max_length or int(1e30),  # transformers' "none"
            "bigmodel_kind": self.kind,
        }
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": self.pad_token}
        atomic.write_json(path / "tokenizer_config.json", {**config, **special})
        atomic.write_json(path / "special_tokens_map.json", special)

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
