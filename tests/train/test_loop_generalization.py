"""Generalisation tools wired through the loop by config: label smoothing, L1/L2 penalties (logged apart
from the data loss), max-norm after each step, and early stopping with RUN/best/ and RUN/summary.json."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from bigmodel import hardware
from bigmodel.config import resolve_config
from bigmodel.models.gpt import GPT
from bigmodel.tasks.lm import LMTask
from bigmodel.train.loop import train

BASE = ["model.block_size=32", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=0"]


def run(bpe_data: Path, out: Path, *overrides: str, steps: int = 3):
    config = resolve_config("tiny", None, [*BASE, f"train.max_steps={steps}", *overrides])
    return train(config, bpe_data, out, progress=False)


def rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_label_smoothing_changes_the_training_loss_only(bpe_data: Path, tmp_path: Path) -> None:
    plain = run(bpe_data, tmp_path / "plain", steps=1)
    smooth = run(bpe_data, tmp_path / "smooth", "train.label_smoothing=0.2", steps=1)
    # step 1 scores the same batch with the same initial weights: only the objective differs
    assert float(rows(tmp_path / "smooth")[0]["train_loss"]) > float(rows(tmp_path / "plain")[0]["train_loss"])
    # evaluation is never smoothed: the reported val loss is the plain cross-entropy of the saved model
    from bigmodel.data.loader import TokenShards
    from bigmodel.evaluation import evaluate

    model = GPT.from_pretrained(tmp_path / "smooth" / "final")
    assert smooth.val is not None and plain.val is not None
    amp = hardware.autocast_dtype("auto", torch.device("cpu"))  # the run's precision: bf16 where it is native
    val = evaluate(model, TokenShards(bpe_data, "val"), autocast_dtype=amp)
    assert val["loss"] == pytest.approx(smooth.val["loss"], rel=1e-6)


def test_penalties_are_logged_apart_and_max_norm_holds(bpe_data: Path, tmp_path: Path) -> None:
    run(bpe_data, tmp_path / "reg", "train.l1=1e-5", "train.l2=1e-3", "train.max_norm=0.3")
    r = rows(tmp_path / "reg")
    train_rows = [x for x in r if x["train_loss"]]
    assert all(float(x["penalty_l1"]) > 0 and float(x["penalty_l2"]) > 0 for x in train_rows)
    model = GPT.from_pretrained(tmp_path / "reg" / "final")
    for name, p in model.named_parameters():
        if p.dim() == 2 and "wte" not in name and "wpe" not in name:  # matrices only by default
            assert p.norm(dim=1).max() <= 0.3 + 1e-5, name
    plain = run(bpe_data, tmp_path / "plain")
    assert not [x for x in rows(tmp_path / "plain") if x["penalty_l1"]]
    assert plain.steps == 3


def test_early_stopping_keeps_the_best_and_says_why(
    bpe_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scripted = iter([3.0, 2.0, 2.5, 2.4, 2.6, 1.0, 1.0])

    def evaluate(self: LMTask, model: torch.nn.Module, *, limit: int | None = None) -> dict[str, float]:
        return {"loss": next(scripted) if limit is not None else 9.0}

    monkeypatch.setattr(LMTask, "evaluate", evaluate)
    out = tmp_path / "run"
    result = run(bpe_data, out, "train.eval_every=1", "train.early_stopping_patience=3", steps=20)
    assert result.stop_reason == "early_stopping" and result.steps == 5
    assert "3 evaluations" in result.detail and "2" in result.detail
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stop_reason"] == "early_stopping" and summary["best"] == {
        "metric": "val_loss",
        "value": 2.0,
        "step": 2,
    }
    assert json.loads((out / "best" / "selection.json").read_text())["step"] == 2
    assert (out / "best" / "model.safetensors").is_file() and (out / "final" / "model.safetensors").is_file()
    best, final = GPT.from_pretrained(out / "best"), GPT.from_pretrained(out / "final")
    assert not torch.equal(best.transformer.wte.weight, final.transformer.wte.weight)  # step 2 vs step 5


def test_early_stopping_metric_must_exist(bpe_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"early_stopping_metric='val_accuracy' is not reported.*val_loss"):
        run(
            bpe_data,
            tmp_path / "run",
            "train.eval_every=1",
            "train.early_stopping_patience=2",
            "train.early_stopping_metric=val_accuracy",
        )
