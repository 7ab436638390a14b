"""Text -> token shards + manifest (`bigmodel prepare`).

Inputs are files, folders (recursively *.txt, and *.jsonl with a "text" field) or a built-in corpus name.
A document is a text file or a JSONL record; documents go whole to the train or the val split
(deterministically, by a hash of their name), and each is followed by the end-of-text token. A single text
file is split at a line boundary instead, so that it still has held-out text.

Everything streams: text is read in ~1 MiB chunks, encoded in batches (in parallel by `tokenizers`), and
appended to fixed-size shards, so memory stays flat however large the corpus. The output is built in a
temporary folder beside --out and renamed into place at the end: an error leaves nothing half-written.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tqdm import tqdm

from bigmodel import atomic
from bigmodel.corpora import BUILTIN, iter_documents
from bigmodel.data.genre import TRAIN_CORPUS, train_documents
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError

FORMAT = "bigmodel-token-shards"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20
BATCH_CHUNKS = 32
ERROR_MODES = {"strict": "strict", "replace": "replace", "skip": "ignore"}


@dataclass
class Document:
    """One unit of the split: a whole text file, a byte range of one, a JSONL record or a built-in text."""

    name: str
    path: Path | None = None  # file on disk, read in chunks
    start: int = 0
    end: int | None = None  # byte range of `path` (None = to the end)
    data: bytes | None = None  # in-memory bytes (built-in corpus, JSONL record)
    split: str = "train"


@dataclass
class Source:
    """What the user named on the command line, expanded."""

    label: str
    bytes: int
    files: list[Path] = field(default_factory=list)
    builtin: str | None = None
    root: Path | None = None  # the folder named on the command line (document names are relative to it)

    def name_of(self, f: Path) -> str:
        return f.relative_to(self.root).as_posix() if self.root is not None else f.name


# ----- finding the inputs ---------------------------------------------------------------------------------
DERIVED = {TRAIN_CORPUS: train_documents}  # corpora built from a built-in one (the genre set's training plays)


def builtin_documents(name: str) -> Iterator[tuple[str, bytes]]:
    return DERIVED[name]() if name in DERIVED else iter_documents(name)


def resolve_inputs(inputs: list[str]) -> list[Source]:
    if not inputs:
        raise UserError("no input given: name files, folders or a built-in corpus (shakespeare)")
    sources = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            if item in BUILTIN or item in DERIVED:
                size = sum(len(b) for _, b in builtin_documents(item))
                sources.append(Source(label=item, bytes=size, builtin=item))
                continue
            raise UserError(f"input {item} does not exist (built-in corpora: {', '.join([*BUILTIN, *DERIVED])})")
        root = path if path.is_dir() else None
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise UserError(f"folder {path} has no .txt or .jsonl files")
        else:
            files = [path]
        for f in files:
            if not os.access(f, os.R_OK):
                raise UserError(f"cannot read {f}: permission denied")
        sources.append(Source(label=str(path), bytes=sum(f.stat().st_size for f in files), files=files, root=root))
    return sources


def _text_documents(sources: list[Source]) -> list[Document]:
    docs = []
    for s in sources:
        if s.builtin:
            docs += [Document(name=n, data=b) for n, b in builtin_documents(s.builtin)]
        else:
            docs += [Document(name=s.name_of(f), path=f) for f in s.files if f.suffix != ".jsonl"]
    return docs


def _hash01(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def assign_splits(docs: list[Document], val_fraction: float) -> list[Document]:
    """Whole documents to val: the round(n * fraction) with the smallest name hash (at least one, never all).

    With a single document, its last `val_fraction` of bytes (from a line start) becomes the val document.
    """
    if val_fraction <= 0 or not docs:
        return docs
    if len(docs) == 1:
        return _split_single(docs[0], val_fraction)
    n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    for d in sorted(docs, key=lambda d: _hash01(d.name))[:n_val]:
        d.split = "val"
    return docs


def _split_single(doc: Document, val_fraction: float) -> list[Document]:
    data = doc.data
    size = len(data) if data is not None else doc.path.stat().st_size if doc.path else 0
    cut = int(size * (1 - val_fraction))
    if data is not None:
        nl = data.find(b"\n", cut)
    else:
        assert doc.path is not None
        with open(doc.path, "rb") as f:
            f.seek(cut)
            rest = f.read(1 << 16)
        nl = rest.find(b"\n")
        nl = cut + nl if nl >= 0 else -1
    cut = nl + 1 if nl >= 0 else cut
    if nl < 0:  # no line break after the cut: at least never split a UTF-8 character (<= 3 continuation bytes)
        base = max(0, cut - 3)
        window = data[base : cut + 1] if data is not None else _read_range(doc.path, base, cut + 1 - base)
        while cut > base and cut - base < len(window) and window[cut - base] & 0xC0 == 0x80:
            cut -= 1
    train = Document(name=doc.name, path=doc.path, end=cut, data=None if data is None else data[:cut])
    val = Document(
        name=f"{doc.name}#val",
        path=doc.path,
        start=cut,
        data=None if data is None else data[cut:],
        split="val",
    )
    return [train, val]


def _read_range(path: Path | None, start: int, size: int) -> bytes:
    assert path is not None
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(size)


# ----- reading text ---------------------------------------------------------------------------------------
def _raw_blocks(doc: Document) -> Iterator[bytes]:
    if doc.data is not None:
        for i in range(0, len(doc.data), CHUNK_BYTES):
            yield doc.data[i : i + CHUNK_BYTES]
        return
    assert doc.path is not None
    try:
        with open(doc.path, "rb") as f:
            f.seek(doc.start)
            remaining = None if doc.end is None else doc.end - doc.start
            while remaining is None or remaining > 0:
                block = f.read(CHUNK_BYTES if remaining is None else min(CHUNK_BYTES, remaining))
                if not block:
                    return
                if remaining is not None:
                    remaining -= len(block)
                yield block
    except OSError as e:
        raise UserError(f"cannot read {doc.path}: {e.strerror or e}") from e


def iter_text(doc: Document, errors: str, where: str | None = None) -> Iterator[str]:
    """Decoded text of a document in chunks that end at line breaks (so BPE words are never cut)."""
    decoder = codecs.getincrementaldecoder("utf-8")(ERROR_MODES[errors])
    consumed, carry = doc.start, ""
    for block in _raw_blocks(doc):
        try:
            text = carry + decoder.decode(block)
        except UnicodeDecodeError as e:
            pending = len(decoder.getstate()[0])
            raise UserError(
                f"{where or doc.path or doc.name}: invalid UTF-8 at byte offset {consumed - pending + e.start}; "
                "fix the file or pass --errors replace|skip"
            ) from e
        consumed += len(block)
        cut = text.rfind("\n") + 1
        if cut:
            yield text[:cut]
        carry = text[cut:]
    try:
        carry += decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        raise UserError(
            f"{where or doc.path or doc.name}: truncated UTF-8 sequence at the end of the file; "
            "fix the file or pass --errors replace|skip"
        ) from e
    if carry:
        yield carry


def iter_jsonl(path: Path, name: str, errors: str, val_fraction: float) -> Iterator[Document]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, a generator cannot use `with` across yields cleanly
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from e
    with f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8", ERROR_MODES[errors]))
            except UnicodeDecodeError as e:
                raise UserError(f"{path}:{lineno}: invalid UTF-8; fix the file or pass --errors replace|skip") from e
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise UserError(f'{path}:{lineno}: expected an object with a string "text" field')
            split = "val" if _hash01(f"{name}:{lineno}") < val_fraction else "train"
            yield Document(name=f"{path}:{lineno}", data=text.encode("utf-8"), split=split)


def iter_documents_of(
    sources: list[Source], text_docs: list[Document], errors: str, val_fraction: float
) -> Iterator[Document]:
    yield from text_docs
    for s in sources:
        for f in s.files:
            if f.suffix == ".jsonl":
                yield from iter_jsonl(f, s.name_of(f), errors, val_fraction)


# ----- writing shards -------------------------------------------------------------------------------------
class ShardWriter:
    """Appends token ids to `{split}-NNNNN.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, folder: Path, split: str, dtype: type[np.unsignedinteger[Any]], shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = (
            folder,
            split,
            np.dtype(dtype).newbyteorder("<"),
            shard_tokens,
        )
        self.shards: list[dict[str, Any]] = []
        self.file: BinaryIO | None = None
        self.sha = hashlib.sha256()
        self.count = 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self.file is None:
                name = f"{self.split}-{len(self.shards):05d}.bin"
                self.file = open(self.folder / name, "wb")  # noqa: SIM115 - closed in _finish
                self.shards.append({"file": name, "split": self.split})
            room = self.shard_tokens - self.count
            part = ids[:room].astype(self.dtype).tobytes()
            self.file.write(part)
            self.sha.update(part)
            self.count += min(room, len(ids))
            ids = ids[room:]
            if self.count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        assert self.file is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.shards[-1].update(tokens=self.count, sha256=self.sha.hexdigest())
        self.file, self.sha, self.count = None, hashlib.sha256(), 0

    def close(self) -> list[dict[str, Any]]:
        if self.file is not None:
            self._finish()
        return self.shards


# ----- the command ----------------------------------------------------------------------------------------
def make_tokenizer(
    spec: str,
    sources: list[Source],
    text_docs: list[Document],
    vocab_size: int,
    errors: str,
    val_fraction: float,
    sample_bytes: int,
) -> Tokenizer:
    if spec == "char":
        return Tokenizer.char()
    if spec != "bpe":
        return Tokenizer.from_pretrained(spec)

    def train_texts() -> Iterator[str]:
        seen = 0
        for doc in iter_documents_of(sources, text_docs, errors, val_fraction):
            if doc.split != "train":
                continue
            for text in iter_text(doc, errors):
                yield text
                seen += len(text)
                if seen >= sample_bytes:
                    return

    return Tokenizer.train_bpe(train_texts(), vocab_size)


def prepare(
    inputs: list[str],
    out: str | Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int = 8192,
    val_fraction: float = 0.1,
    workers: int | None = None,
    shard_tokens: int = 100_000_000,
    errors: str = "strict",
    overwrite: bool = False,
    tokenizer_sample_bytes: int = 1 << 30,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `inputs` into `out` (a data directory); returns the manifest."""
    if errors not in ERROR_MODES:
        raise UserError(f"--errors {errors!r} is invalid: expected strict | replace | skip")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} is invalid: expected a fraction in [0, 1)")
    if shard_tokens < 1:
        raise UserError(f"--shard-tokens {shard_tokens} is invalid: expected an integer >= 1")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder to create")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} exists and is not empty; choose another --out or pass --overwrite")
    workers = workers or os.cpu_count() or 1
    os.environ.setdefault("RAYON_NUM_THREADS", str(workers))  # tokenizers' thread pool, read once per process
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if workers > 1 else "false"

    t0 = time.time()
    sources = resolve_inputs(inputs)
    text_docs = assign_splits(_text_documents(sources), val_fraction)
    tok = make_tokenizer(tokenizer, sources, text_docs, vocab_size, errors, val_fraction, tokenizer_sample_bytes)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        stats = _encode_all(tok, sources, text_docs, errors, val_fraction, tmp, dtype, shard_tokens, progress)
        if stats["train"]["tokens"] == 0:
            raise UserError(f"the corpus is empty: {', '.join(inputs)} contain no text for the train split")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "tokenizer": {"kind": tok.kind, "file": "tokenizer.json", "eot_id": tok.eot_id},
            "vocab_size": tok.vocab_size,
            "dtype": np.dtype(dtype).name,
            "byte_order": "little",
            "val_fraction": val_fraction,
            "errors": errors,
            "splits": stats,
            "shards": stats.pop("shards"),
            "sources": [{"path": s.label, "bytes": s.bytes, "files": len(s.files) or None} for s in sources],
        }
        tok.save_pretrained(tmp)
        atomic.write_json(tmp / "manifest.json", manifest)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        atomic.fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    s = manifest["splits"]
    print(
        f"prepared {s['train']['tokens']:,} train + {s['val']['tokens']:,} val tokens "
        f"({s['train']['documents']}+{s['val']['documents']} documents, {len(manifest['shards'])} shards, "
        f"{tok.kind} vocab {tok.vocab_size}) in {time.time() - t0:.1f}s -> {out}",
        file=sys.stderr,
    )
    return manifest


def _encode_all(
    tok: Tokenizer,
    sources: list[Source],
    text_docs: list[Document],
    errors: str,
    val_fraction: float,
    folder: Path,
    dtype: Any,
    shard_tokens: int,
    progress: bool,
) -> dict[str, Any]:
    writers = {s: ShardWriter(folder, s, dtype, shard_tokens) for s in ("train", "val")}
    stats = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in ("train", "val")}
    bar = tqdm(
        total=sum(s.bytes for s in sources),
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=not progress,
        file=sys.stderr,
    )
    batch: list[tuple[str, str, bool]] = []  # (split, text, ends a document)

    def flush() -> None:
        # A literal "<|endoftext|>" inside a document is text, not a separator: separators are appended below.
        tok.tok.encode_special_tokens = True
        try:
            encoded = tok.encode_batch([t for _, t, _ in batch])
        finally:
            tok.tok.encode_special_tokens = False
        for (split, text, last), ids in zip(batch, encoded, strict=True):
            if last:
                ids = ids + [tok.eot_id]
            writers[split].write(np.asarray(ids, dtype=np.int64))
            stats[split]["tokens"] += len(ids)
            nbytes = len(text.encode("utf-8"))
            stats[split]["bytes"] += nbytes
            bar.update(nbytes)
        batch.clear()

    for doc in iter_documents_of(sources, text_docs, errors, val_fraction):
        stats[doc.split]["documents"] += 1
        pieces = iter_text(doc, errors)
        prev = next(pieces, None)
        if prev is None:
            continue  # an empty document adds nothing, not even a separator
        for text in pieces:
            batch.append((doc.split, prev, False))
            prev = text
            if len(batch) >= BATCH_CHUNKS:
                flush()
        batch.append((doc.split, prev, True))
        if len(batch) >= BATCH_CHUNKS:
            flush()
    flush()
    bar.close()
    shards = writers["train"].close() + writers["val"].close()
    return {**stats, "shards": shards}


def run_prepare(args: Any) -> int:
    prepare(
        args.inputs,
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        errors=args.errors,
        overwrite=args.overwrite,
    )
    return 0
