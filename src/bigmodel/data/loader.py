"""Token shards opened as memory maps, and resumable, rank-aware batches of training windows.

Memory does not grow with the corpus: shards are numpy memmaps and only the sampled windows are read.
An epoch is a random shift (so window boundaries move between epochs) plus a random permutation of the
windows; both come from (seed, epoch), so the loader's whole state is (epoch, cursor) and a resumed run
reads exactly the batches the uninterrupted run would have. Rank r of W takes every W-th window of the
permutation, so no two ranks read the same window in an epoch and the global batch is independent of W.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigmodel.data.prepare import FORMAT, FORMAT_VERSION
from bigmodel.errors import UserError


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise UserError(f"{data_dir} is not a data directory (no manifest.json); create one with `bigmodel prepare`")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('format_version')!r} is not "
            f"{FORMAT!r} version {FORMAT_VERSION}; prepare the data again with this bigmodel"
        )
    return manifest


def data_fingerprint(manifest: dict[str, Any]) -> str:
    """Identifies the tokens of a data directory (shard hashes), to refuse resuming on other data."""
    return hashlib.sha256("".join(s["sha256"] for s in manifest["shards"]).encode()).hexdigest()[:16]


class TokenShards:
    """The shards of one split of a data directory, as little-endian memmaps."""

    def __init__(self, data_dir: str | Path, split: str = "train", verify: bool = False) -> None:
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        self.split = split
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self.arrays: list[np.memmap[Any, Any]] = []
        for shard in self.manifest["shards"]:
            if shard["split"] != split:
                continue
            path = self.dir / shard["file"]
            if not path.is_file():
                raise UserError(f"{path} is listed in the manifest but missing; prepare the data again")
            if path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise UserError(
                    f"{path} has {path.stat().st_size} bytes, the manifest says "
                    f"{shard['tokens']} tokens of {dtype.name}; the file is damaged"
                )
            if verify and _sha256(path) != shard["sha256"]:
                raise UserError(f"{path} does not match its sha256 in the manifest; the file is damaged")
            self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        stats = self.manifest["splits"][split]
        self.tokens = int(stats["tokens"])
        self.bytes = int(stats["bytes"])

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class WindowLoader:
    """Random (T+1)-token windows of a split, `batch` at a time, as (x, y) LongTensors of shape (B, T)."""

    def __init__(
        self, shards: TokenShards, block_size: int, batch: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.shards, self.T, self.B, self.seed = shards, block_size, batch, seed
        self.rank, self.world = rank, world_size
        self.epoch, self.cursor = 0, 0
        if max((len(a) for a in shards.arrays), default=0) <= block_size:
            raise UserError(
                f"the {shards.split} split of {shards.dir} has no shard longer than block_size+1 = "
                f"{block_size + 1} tokens; add data or lower model.block_size"
            )
        self._plan(0)

    def _plan(self, epoch: int) -> None:
        rng = np.random.default_rng([self.seed, epoch])
        longest = max(len(a) for a in self.shards.arrays)
        self.offset = int(rng.integers(0, min(self.T, longest - self.T)))  # the longest shard keeps a window
        counts = np.array([max(0, (len(a) - 1 - self.offset) // self.T) for a in self.shards.arrays])
        self.first = np.concatenate([[0], np.cumsum(counts)])  # window index where each shard starts
        if self.first[-1] < self.world:
            raise UserError(
                f"the {self.shards.split} split of {self.shards.dir} has {int(self.first[-1])} windows of "
                f"{self.T + 1} tokens, fewer than the {self.world} ranks; add data or lower model.block_size"
            )
        self.order = rng.permutation(int(self.first[-1]))
        self.epoch = epoch

    def _window(self, k: int) -> np.ndarray:
        shard = int(np.searchsorted(self.first, k, side="right")) - 1
        start = self.offset + (k - int(self.first[shard])) * self.T
        return np.asarray(self.shards.arrays[shard][start : start + self.T + 1], dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.B):
            if self.cursor + self.world > len(self.order):
                self._plan(self.epoch + 1)
                self.cursor = 0
            rows.append(self._window(int(self.order[self.cursor + self.rank])))
            self.cursor += self.world
        batch = np.stack(rows)  # (B, T+1)
        return torch.from_numpy(batch[:, :-1].copy()), torch.from_numpy(batch[:, 1:].copy())

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "world_size": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self._plan(int(state["epoch"]))
        self.cursor = int(state["cursor"])


def eval_batches(
    shards: TokenShards, block_size: int, batch: int, max_tokens: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows of the split, in order, as (x, y) batches; the last window of a shard may be shorter.

    Without `max_tokens` the windows cover the whole split. With it, about max_tokens / block_size windows
    are taken evenly spaced across the split (so a periodic estimate is not biased towards its beginning),
    and at most `max_tokens` tokens are scored.
    """
    starts = [(i, s) for i, arr in enumerate(shards.arrays) for s in range(0, len(arr) - 1, block_size)]
    if max_tokens is not None and max_tokens < shards.tokens:
        keep = max(1, -(-max_tokens // block_size))
        picked = np.unique(np.linspace(0, len(starts) - 1, keep).round().astype(int))
        starts = [starts[k] for k in picked]
    budget = max_tokens if max_tokens is not None else shards.tokens
    rows: list[np.ndarray] = []
    for shard, start in starts:
        if budget <= 0:
            break
        arr = shards.arrays[shard]
        window = np.asarray(arr[start : start + min(block_size, budget) + 1], dtype=np.int64)
        budget -= len(window) - 1
        if len(window) < block_size + 1:  # a short window: its own batch
            t = torch.from_numpy(window)[None]
            yield t[:, :-1], t[:, 1:]
            continue
        rows.append(window)
        if len(rows) == batch:
            t = torch.from_numpy(np.stack(rows))
            yield t[:, :-1], t[:, 1:]
            rows = []
    if rows:
        t = torch.from_numpy(np.stack(rows))
        yield t[:, :-1], t[:, 1:]
