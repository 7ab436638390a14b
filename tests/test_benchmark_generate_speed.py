"""benchmarks/generate_speed.py on a tiny model: what it times, and that a whole run prints every row."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from bigmodel.config import GPTConfig
from bigmodel.generation import cast_for_inference
from bigmodel.models.gpt import GPT
from conftest import load_benchmark

TINY = GPTConfig(vocab_size=96, block_size=64, n_layer=2, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("generate_speed.py")


def test_steps_alone_leave_out_the_prefill(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_prefill(model: object, prompts: list, cfg: object, logprobs: bool = True) -> Iterator[int]:
        time.sleep(0.3)  # the prefill and the first token
        for step in range(cfg.max_new_tokens):  # type: ignore[attr-defined]
            if step:
                time.sleep(0.01)
            yield step

    monkeypatch.setattr(bench, "decode", slow_prefill)
    total, steps = bench.time_generate(GPT(TINY), torch.zeros(1, 4, dtype=torch.long), 5, compiled_step=True)
    assert total >= 0.34 and 0.04 <= steps < 0.25


def test_transformers_steps_start_at_the_first_new_token(bench: ModuleType) -> None:
    class Peer(torch.nn.Module):  # what the benchmark calls: generate with a streamer
        def generate(self, ids: torch.Tensor, max_new_tokens: int, streamer: object, **_: object) -> torch.Tensor:
            streamer.put(ids)  # type: ignore[attr-defined]
            time.sleep(0.3)
            for _ in range(max_new_tokens):
                time.sleep(0.01)
                streamer.put(ids[:, :1])  # type: ignore[attr-defined]
            streamer.end()  # type: ignore[attr-defined]
            return ids

    total, steps = bench.time_generate(Peer(), torch.zeros(1, 4, dtype=torch.long), 5, compiled_step=True)
    assert total >= 0.35 and 0.04 <= steps < 0.25


def test_weight_bytes_count_what_a_step_reads(bench: ModuleType) -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    C, V = TINY.n_embd, TINY.vocab_size
    blocks = sum(p.numel() for p in model.transformer.h.parameters()) + 2 * C  # + ln_f
    assert bench.weight_bytes(model) == 4 * (blocks + V * C)  # the tied head once, no position table
    int8 = cast_for_inference(GPT(TINY), "int8")
    assert bench.weight_bytes(int8) < bench.weight_bytes(model) / 3  # int8 head, no fp32 token table


def test_shares_count_each_round_against_its_own_reading(bench: ModuleType) -> None:
    # three rounds of 1 GB of steps: 1 s at 2 GB/s (50%), 0.5 s at 4 GB/s (the fastest: 50%), 2 s at 1 GB/s
    # (50% too: a slow phase); the peak reading 4 GB/s
    fastest, median, of_peak = bench.shares([1.0, 0.5, 2.0], [2e9, 4e9, 1e9], 10**9, 4e9)
    assert (fastest, median, of_peak) == pytest.approx((0.5, 0.5, 0.5))
    # the fastest round, not the highest share: a round timed beside a low reading shows 100%
    fastest, median, of_peak = bench.shares([0.5, 1.0, 1.0], [4e9, 1e9, 2e9], 10**9, 4e9)
    assert (fastest, median, of_peak) == pytest.approx((0.5, 0.5, 0.5))
    # slower rounds in slower phases: their shares (111%, 95%) above the fastest round's (80%)
    fastest, median, of_peak = bench.shares([0.5, 0.6, 0.7], [2.5e9, 1.5e9, 1.5e9], 10**9, 4e9)
    assert (fastest, median, of_peak) == pytest.approx((0.8, 1 / (0.7 * 1.5), 0.5))


def test_fewer_than_two_new_tokens_are_refused(bench: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["generate_speed.py", "--new", "1"])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2


def test_a_whole_run_prints_every_row(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(bench, "CFG", TINY)
    readings = iter([1e6] + [20e9, 10e9] * 1000)  # a reading too low, then swinging (the real one reads 512 MB)
    monkeypatch.setattr(bench, "read_bandwidth", lambda *a, **k: next(readings))
    monkeypatch.setattr(sys, "argv", ["generate_speed.py", "--new", "6", "--repeats", "2", "--batches", "1", "2"])
    bench.main()
    out = capsys.readouterr().out
    assert out.count("greedy tokens identical to transformers in fp32: True") == 2
    rows = ["transformers fp32", "bigmodel fp32", "bigmodel bf16", "bigmodel int8 numba"]
    for row in rows + [f"{name} op by op" for name in rows[1:]]:
        assert out.count(row) >= 2, row
    assert "decoding steps alone" in out and "of limit" in out and "of peak" in out
    assert "read bandwidth 10.0-20.0 GB/s in the run" in out  # (the first reading is the header's)
