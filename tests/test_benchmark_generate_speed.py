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


def test_a_whole_run_prints_every_row(
    bench: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(bench, "CFG", TINY)
    monkeypatch.setattr(bench, "read_bandwidth", lambda *a, **k: 20e9)  # (the real one reads 512 MB)
    monkeypatch.setattr(sys, "argv", ["generate_speed.py", "--new", "6", "--repeats", "2", "--batches", "1", "2"])
    bench.main()
    out = capsys.readouterr().out
    assert out.count("greedy tokens identical to transformers in fp32: True") == 2
    rows = ["transformers fp32", "bigmodel fp32", "bigmodel bf16", "bigmodel int8 numba"]
    for row in rows + [f"{name} op by op" for name in rows[1:]]:
        assert out.count(row) >= 2, row
    assert "decoding steps alone" in out and "of limit" in out
