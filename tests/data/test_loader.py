"""Token shards as memmaps and the resumable, rank-aware WindowLoader; eval_batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel.data.loader import TokenShards, WindowLoader, data_fingerprint, eval_batches, read_manifest
from bigmodel.errors import UserError
from conftest import split_tokens, write_token_shards

T = 16
# Every token is unique, so a window is identified by its first token and its shard by the token's range.
SHARD_STARTS = [0, 1000, 2000]
SHARDS = [np.arange(0, 1000), np.arange(1000, 1537), np.arange(2000, 2100)]


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("synth")
    return write_token_shards(folder, {"train": SHARDS, "val": [np.arange(5000, 5100), np.arange(6000, 6037)]})


def _starts(x: torch.Tensor) -> list[int]:
    return x[:, 0].tolist()


def _check_real_windows(x: torch.Tensor, y: torch.Tensor, offset: int) -> None:
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (x.shape[0], T)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        np.testing.assert_array_equal(np.diff(row_x), 1)  # a contiguous slice of one shard
        np.testing.assert_array_equal(row_y, row_x + 1)  # targets: the same slice shifted by one
        base = max(s for s in SHARD_STARTS if s <= row_x[0])
        shard = SHARDS[SHARD_STARTS.index(base)]
        assert row_y[-1] <= shard[-1], "a window crosses the end of its shard"
        assert (row_x[0] - base - offset) % T == 0, "windows start on the epoch's grid"


def test_windows_are_slices_of_the_shards(synth: Path) -> None:
    loader = WindowLoader(TokenShards(synth, "train"), T, 8, seed=3)
    seen = []
    for _ in range(5):
        x, y = loader.next_batch()
        _check_real_windows(x, y, loader.offset)
        seen += _starts(x)
    assert len(set(seen)) == len(seen), "a window repeated within an epoch"
    assert len({s // 1000 for s in seen}) > 1, "windows come from several shards"


def test_windows_are_slices_of_prepared_shards(bpe_data: Path) -> None:
    tokens = split_tokens(bpe_data, "train")
    windows = np.lib.stride_tricks.sliding_window_view(tokens, T + 1)
    loader = WindowLoader(TokenShards(bpe_data, "train"), T, 4, seed=0)
    for _ in range(3):
        x, y = loader.next_batch()
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            full = np.concatenate([row_x, row_y[-1:]])
            assert (windows == full).all(axis=1).any(), "batch row is not a window of the train shard"
            np.testing.assert_array_equal(row_y[:-1], row_x[1:])


def test_one_epoch_reads_every_window_once(synth: Path) -> None:
    loader = WindowLoader(TokenShards(synth, "train"), T, 1, seed=0)
    n, offset = len(loader.order), loader.offset
    expected = {
        base + offset + j * T
        for base, arr in zip(SHARD_STARTS, SHARDS, strict=True)
        for j in range((len(arr) - 1 - offset) // T)
    }
    starts = [loader.next_batch()[0][0, 0].item() for _ in range(n)]
    assert len(starts) == len(set(starts)) == len(expected) and set(starts) == expected
    assert loader.epoch == 0
    loader.next_batch()
    assert loader.epoch == 1  # the next epoch reshuffles (and shifts) the windows


def test_epochs_and_seeds_differ(synth: Path) -> None:
    shards = TokenShards(synth, "train")
    a, b = WindowLoader(shards, T, 8, seed=1), WindowLoader(shards, T, 8, seed=2)
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])
    c = WindowLoader(shards, T, 8, seed=1)
    torch.testing.assert_close(c.next_batch()[0], WindowLoader(shards, T, 8, seed=1).next_batch()[0])


@pytest.mark.parametrize("before", [3, 11, 12])  # mid-epoch, and around the end of epoch 0 (~95 windows)
def test_state_dict_resume_gives_identical_batches(synth: Path, before: int) -> None:
    shards = TokenShards(synth, "train")
    a = WindowLoader(shards, T, 8, seed=7)
    for _ in range(before):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # it is saved as JSON in checkpoints
    expected = [a.next_batch() for _ in range(15)]
    assert a.epoch >= 1, "the continuation should cross an epoch boundary"

    b = WindowLoader(shards, T, 8, seed=999)  # the seed comes from the state
    b.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (b.next_batch() for _ in range(15)), strict=True):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)


def test_two_ranks_split_what_one_rank_reads(synth: Path) -> None:
    shards = TokenShards(synth, "train")
    one = WindowLoader(shards, T, 8, seed=5)
    r0 = WindowLoader(shards, T, 4, seed=5, rank=0, world_size=2)
    r1 = WindowLoader(shards, T, 4, seed=5, rank=1, world_size=2)
    seen0, seen1 = [], []
    for _ in range(10):  # 80 windows: within epoch 0
        s = _starts(one.next_batch()[0])
        (x0, y0), (x1, y1) = r0.next_batch(), r1.next_batch()
        _check_real_windows(x0, y0, r0.offset)
        _check_real_windows(x1, y1, r1.offset)
        assert sorted(_starts(x0) + _starts(x1)) == sorted(s), "the global batch depends on the world size"
        seen0 += _starts(x0)
        seen1 += _starts(x1)
    assert not set(seen0) & set(seen1)
    assert r0.epoch == r1.epoch == one.epoch == 0


def test_ranks_never_share_a_window_over_a_whole_epoch(synth: Path) -> None:
    shards = TokenShards(synth, "train")
    ranks = [WindowLoader(shards, T, 1, seed=11, rank=r, world_size=2) for r in (0, 1)]
    n = len(ranks[0].order) // 2
    seen = [[loader.next_batch()[0][0, 0].item() for _ in range(n)] for loader in ranks]
    assert all(loader.epoch == 0 for loader in ranks)
    assert len(set(seen[0])) == len(set(seen[1])) == n
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) >= len(ranks[0].order) - 1  # at most one window left over


def test_eval_batches_cover_the_split(synth: Path) -> None:
    shards = TokenShards(synth, "val")
    targets = []
    for x, y in eval_batches(shards, T, batch=3):
        assert x.shape == y.shape and x.shape[1] <= T and x.shape[0] <= 3
        assert torch.equal(y, x + 1)
        targets += y.flatten().tolist()
    # every token except each shard's first is predicted exactly once
    assert sorted(targets) == list(range(5001, 5100)) + list(range(6001, 6037))


def test_eval_batches_cover_prepared_split_in_order(bpe_data: Path) -> None:
    tokens = split_tokens(bpe_data, "val")
    shards = TokenShards(bpe_data, "val")
    assert len(shards.arrays) == 1
    windows = np.lib.stride_tricks.sliding_window_view(tokens, T + 1)
    ys = []
    for x, y in eval_batches(shards, T, batch=4):
        for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
            full = np.concatenate([row_x, row_y[-1:]])
            if len(full) == T + 1:
                assert (windows == full).all(axis=1).any()
            np.testing.assert_array_equal(row_y[:-1], row_x[1:])
            ys.append(row_y)
    np.testing.assert_array_equal(np.sort(np.concatenate(ys)), np.sort(tokens[1:]))


def test_eval_batches_max_tokens(synth: Path) -> None:
    shards = TokenShards(synth, "val")
    batches = list(eval_batches(shards, T, batch=2, max_tokens=40))
    count = sum(y.numel() for _, y in batches)
    assert 0 < count <= 40
    seen = torch.cat([x.flatten() for x, _ in batches])
    assert seen.min() < 5100 and seen.max() >= 6000  # spread over the split, not just its first 40 tokens
    for x, y in batches:  # still real, in-order windows
        assert torch.equal(y, x + 1)


def test_token_shards_checks(synth: Path, tmp_path: Path) -> None:
    shards = TokenShards(synth, "train")
    assert shards.tokens == sum(len(a) for a in SHARDS)
    assert [a.dtype for a in shards.arrays] == [np.dtype("<u2")] * 3
    assert isinstance(shards.arrays[0], np.memmap)
    assert len(data_fingerprint(read_manifest(synth))) == 16

    with pytest.raises(UserError, match="not a data directory"):
        TokenShards(tmp_path)
    damaged = write_token_shards(tmp_path / "damaged", {"train": [np.arange(100)]})
    with pytest.raises(UserError, match="does not match its sha256"):
        TokenShards(damaged, "train", verify=True)  # the hand-made manifest has a dummy hash
    with open(damaged / "train-00000.bin", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="the file is damaged"):
        TokenShards(damaged, "train")
    (damaged / "train-00000.bin").unlink()
    with pytest.raises(UserError, match="missing"):
        TokenShards(damaged, "train")
    manifest = json.loads((damaged / "manifest.json").read_text())
    (damaged / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(UserError, match="prepare the data again"):
        TokenShards(damaged, "train")


def test_prepared_shards_verify(bpe_data: Path) -> None:
    TokenShards(bpe_data, "train", verify=True)
    TokenShards(bpe_data, "val", verify=True)


def test_block_size_longer_than_every_shard(synth: Path) -> None:
    with pytest.raises(UserError, match="no shard longer than block_size"):
        WindowLoader(TokenShards(synth, "train"), 1000, 2, seed=0)


@pytest.mark.parametrize("world", [1, 2])
def test_short_shard_gives_windows_or_a_clear_error(tmp_path: Path, world: int) -> None:
    data = write_token_shards(tmp_path, {"train": [np.arange(20)]})  # windows of 17 tokens exist (offset <= 3)
    try:
        loaders = [
            WindowLoader(TokenShards(data, "train"), T, 2, seed=0, rank=r, world_size=world) for r in range(world)
        ]
        for loader in loaders:
            for _ in range(3):
                x, y = loader.next_batch()
                assert torch.equal(y, x + 1) and x.shape == (2, T)
    except UserError as e:  # refusing the data with a message is also acceptable
        assert "block_size" in str(e)
