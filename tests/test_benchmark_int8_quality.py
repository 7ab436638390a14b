"""benchmarks/int8_quality.py on the tiny training run: decoding steps score what the forward scores."""

from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

import pytest

from bigmodel.compress import int8_kernels
from bigmodel.data.loader import TokenShards, eval_batches
from bigmodel.generation import cast_for_inference
from bigmodel.models.gpt import GPT
from conftest import load_benchmark


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("int8_quality.py")


@pytest.mark.parametrize("dtype", ["fp32", "int8", "bf16"])
def test_steps_score_what_the_forward_scores(bench: ModuleType, tiny_run: tuple, bpe_data: Path, dtype: str) -> None:
    model = cast_for_inference(GPT.from_pretrained(tiny_run[0].run_dir / "final"), dtype)
    x, y = next(iter(eval_batches(TokenShards(bpe_data, "val"), model.config.block_size, bench.WINDOWS)))
    forward, (steps, compiled) = bench.nll_forward(model, x, y), bench.nll_steps(model, x, y)
    # fp32: float rounding only; int8: the decoding kernel also rounds activations to int16; bf16: the
    # forward computes in bf16, the steps in float32 from the same weights
    assert steps == pytest.approx(forward, rel={"fp32": 1e-5, "int8": 1e-4, "bf16": 1e-3}[dtype])
    # every dtype's steps through the compiled step where numba is installed; bf16 on native-bf16 CPUs too,
    # which takes at most NATIVE_BF16_MAX_ROWS rows (checked here also on CPUs without native bf16)
    assert compiled == int8_kernels.available()
    kernels = int8_kernels.compiled()
    assert kernels is None or bench.WINDOWS <= kernels.NATIVE_BF16_MAX_ROWS


def test_prints_both_paths_and_the_changes(
    bench: ModuleType, tiny_run: tuple, bpe_data: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    argv = ["int8_quality.py", str(tiny_run[0].run_dir), str(bpe_data), "--max-tokens", "300"]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    out = capsys.readouterr().out
    for line in ("fp32 ", "bf16 ", "int8 ", "int16 activations"):
        assert line in out
    assert out.count("steps: compiled step") == (3 if int8_kernels.available() else 0)
    for dtype in ("bf16", "int8"):
        assert f"{dtype} against fp32, forward:" in out and f"{dtype} against fp32, steps:" in out
