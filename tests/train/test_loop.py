"""The training loop on tiny data: the loss falls, and the run directory holds what the contract says."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from bigmodel.config import ConfigError, GPTConfig, RunConfig, load_toml, resolve_config
from bigmodel.data.prepare import prepare
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT
from bigmodel.train.logging import COLUMNS
from bigmodel.train.loop import TrainResult, train
from conftest import TINY_RUN_OVERRIDES, TINY_RUN_STEPS

STEPS = TINY_RUN_STEPS


def tiny_config(*overrides: str, steps: int = STEPS) -> RunConfig:
    return resolve_config("tiny", None, [*TINY_RUN_OVERRIDES, f"train.max_steps={steps}", *overrides])


def read_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_loss_goes_down(tiny_run: tuple[TrainResult, RunConfig]) -> None:
    result, _ = tiny_run
    rows = [r for r in read_rows(result.run_dir) if r["train_loss"]]
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert abs(first - math.log(300)) < 0.3  # starts near uniform over the 300-token vocabulary
    assert last < first - 1.0, f"train loss {first:.3f} -> {last:.3f}"
    assert result.train_loss == float(rows[-1]["train_loss"])
    assert result.val is not None and result.val["loss"] < first - 1.0
    assert isinstance(result.val["tokens"], int)  # a count, printed as 128,429 (not 128,429.0) by the demo
    assert result.steps == STEPS and result.tokens == STEPS * 1024 and result.stop_reason == "max_steps"


def test_metrics_csv(tiny_run: tuple[TrainResult, RunConfig]) -> None:
    result, _ = tiny_run
    with open(result.run_dir / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    assert (
        header
        == [
            "step",
            "tokens",
            "train_loss",
            "val_loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "mfu",
            "elapsed_s",
            "skipped_steps",
            "loss_spike",
            "val_metric",
            "penalty_l1",
            "penalty_l2",
        ]
        == COLUMNS
    )
    rows = read_rows(result.run_dir)
    train_rows = [r for r in rows if r["train_loss"]]
    assert [int(r["step"]) for r in train_rows] == list(range(1, STEPS + 1))  # log_every=1 in the tiny preset
    assert [int(r["tokens"]) for r in train_rows] == [1024 * s for s in range(1, STEPS + 1)]
    for r in train_rows:
        assert float(r["lr"]) > 0 and float(r["grad_norm"]) > 0 and float(r["tokens_per_s"]) > 0
        assert 0 < float(r["mfu"]) and float(r["elapsed_s"]) >= 0
    assert max(float(r["lr"]) for r in train_rows) == pytest.approx(3e-3)  # the tiny preset's peak lr
    val_steps = [int(r["step"]) for r in rows if r["val_loss"]]
    assert val_steps == [10, 20, 30, 30]  # every eval_every steps, and the final whole-split evaluation
    assert float(rows[-1]["val_loss"]) == pytest.approx(result.val["loss"])  # type: ignore[index]
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed)


def test_run_dir_layout(tiny_run: tuple[TrainResult, RunConfig]) -> None:
    result, config = tiny_run
    run = result.run_dir
    assert load_toml(run / "config.toml") == config
    assert config.model.vocab_size == 300  # taken from the data's tokenizer
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((run / "tensorboard").iterdir())
    leftovers = [p.name for p in run.rglob(".*") if p.name != ".metadata"]  # DCP's index file is not temporary
    assert not leftovers, "temporary files left in the run"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-0000020", "step-0000030"]  # keep_checkpoints=2
    for name in ckpts:
        c = run / "checkpoints" / name
        for f in [
            "COMPLETE",
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "config.toml",
            "trainer_state/dcp/.metadata",
            "trainer_state/dcp/__0_0.distcp",
            "trainer_state/rank-00000.safetensors",
            "trainer_state/state.json",
        ]:
            assert (c / f).is_file(), f"{name}/{f}"
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        assert (run / "final" / f).is_file(), f


def test_final_model_loads_in_transformers(tiny_run: tuple[TrainResult, RunConfig], bpe_data: Path) -> None:
    from transformers import AutoTokenizer, GPT2LMHeadModel

    final = tiny_run[0].run_dir / "final"
    ours = GPT.from_pretrained(final)
    theirs = GPT2LMHeadModel.from_pretrained(final).eval()
    hf_tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([hf_tok("HAMLET:\nThe king loves the crown tonight.")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], theirs(ids).logits, rtol=1e-4, atol=1e-4)
    # the final model is the last checkpoint's
    last = GPT.from_pretrained(tiny_run[0].run_dir / "checkpoints" / "step-0000030")
    for k, v in ours.state_dict().items():
        assert torch.equal(v, last.state_dict()[k]), k


def test_flops_per_token() -> None:
    model = GPT(GPTConfig(vocab_size=300, block_size=32, n_layer=2, n_head=2, n_embd=64))
    assert model.flops_per_token() == 6 * model.num_params() + 12 * 2 * 32 * 64


def test_rerun_without_resume_is_refused(tiny_run: tuple[TrainResult, RunConfig], bpe_data: Path) -> None:
    run = tiny_run[0].run_dir
    before = (run / "metrics.csv").read_bytes()
    with pytest.raises(UserError, match=r"already holds a run; pass --resume auto"):
        train(tiny_config(), bpe_data, run, progress=False)
    assert (run / "metrics.csv").read_bytes() == before


def test_resume_refuses_changed_model(tiny_run: tuple[TrainResult, RunConfig], bpe_data: Path) -> None:
    run = tiny_run[0].run_dir
    before = (run / "config.toml").read_text()
    with pytest.raises(UserError, match=r"another model config \(model.n_embd: 64 -> 32\)") as info:
        train(tiny_config("model.n_embd=32"), bpe_data, run, resume="auto", progress=False)
    assert "step-0000030" in str(info.value)
    assert (run / "config.toml").read_text() == before


def test_resume_refuses_other_data(
    tiny_run: tuple[TrainResult, RunConfig], bpe_data: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    prepare(
        [str(p) for p in sorted(corpus_dir.glob("*.txt"))[:4]],
        other,
        tokenizer=str(bpe_data / "tokenizer.json"),
        val_fraction=0.25,
        progress=False,
    )
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0].run_dir, run)
    with pytest.raises(UserError, match="was trained on other data"):
        train(tiny_config(), other, run, resume="auto", progress=False)


def test_resume_continues_a_finished_run(bpe_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(tiny_config(steps=4), bpe_data, run, progress=False)
    with pytest.warns(UserWarning, match=r"changed training settings: train.max_steps: 4 -> 6"):
        result = train(tiny_config(steps=6), bpe_data, run, resume="auto", progress=False)
    assert result.steps == 6
    steps = [int(r["step"]) for r in read_rows(run) if r["train_loss"]]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_from_explicit_path_errors(bpe_data: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--resume nowhere: no such checkpoint folder"):
        train(tiny_config(), bpe_data, tmp_path / "run", resume="nowhere", progress=False)


def test_wall_clock_budget_stops_training(bpe_data: Path, tmp_path: Path) -> None:
    result = train(tiny_config("train.max_minutes=0.002", steps=100_000), bpe_data, tmp_path / "run", progress=False)
    assert result.stop_reason == "max_minutes"
    assert 1 <= result.steps < 100_000
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / f"step-{result.steps:07d}" / "COMPLETE").is_file()


def test_config_errors_write_nothing(bpe_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train.batch_tokens=1000 is not a multiple"):
        train(tiny_config("train.batch_tokens=1000"), bpe_data, tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(UserError, match=r"model.vocab_size=200 is smaller than the data's vocabulary \(300"):
        train(tiny_config("model.vocab_size=200"), bpe_data, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()
    with pytest.raises(UserError, match="not a data directory"):
        train(tiny_config(), tmp_path / "no-data", tmp_path / "c", progress=False)
    assert not (tmp_path / "c").exists()


def test_ctrl_c_stops_at_a_step_boundary_with_a_checkpoint(
    bpe_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    import bigmodel.train.loop as loop

    real_step, calls = loop._step, []

    def step_then_ctrl_c(*args: object, **kwargs: object) -> tuple[float, float]:
        calls.append(1)
        out = real_step(*args, **kwargs)  # type: ignore[arg-type]
        if len(calls) == 3:
            signal.raise_signal(signal.SIGINT)  # as if the user pressed Ctrl-C during step 3
        return out

    handler_before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(loop, "_step", step_then_ctrl_c)
    run = tmp_path / "run"
    result = train(tiny_config(steps=6), bpe_data, run, progress=False)
    assert result.stop_reason == "interrupted" and result.steps == 3
    assert signal.getsignal(signal.SIGINT) is handler_before  # the handler is put back
    assert (run / "checkpoints" / "step-0000003" / "COMPLETE").is_file()
    assert not (run / "final").exists()

    monkeypatch.setattr(loop, "_step", real_step)
    result = train(tiny_config(steps=6), bpe_data, run, resume="auto", progress=False)
    assert result.stop_reason == "max_steps" and result.steps == 6
    assert [int(r["step"]) for r in read_rows(run) if r["train_loss"]] == [1, 2, 3, 4, 5, 6]
