"""Guards: non-finite steps (skip / stop / rollback), loss spikes, SIGTERM, failed checkpoint writes, and
checkpoint files that try to execute code."""

from __future__ import annotations

import csv
import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bigmodel import atomic
from bigmodel.config import ConfigError, resolve_config
from bigmodel.errors import UserError
from bigmodel.tasks.lm import LMTask
from bigmodel.train import checkpoint
from bigmodel.train.guards import NonFiniteError, NonFiniteGuard, SpikeDetector
from bigmodel.train.loop import train
from conftest import REPO, SUBPROCESS_ENV

BASE = ["model.block_size=32", "train.eval_every=0", "train.log_every=1", "train.checkpoint_every=2"]


def config(*overrides: str, steps: int = 6):
    return resolve_config("tiny", None, [*BASE, f"train.max_steps={steps}", *overrides])


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["train_loss"]]


@pytest.fixture
def poison(monkeypatch: pytest.MonkeyPatch):
    """Make the loss of chosen micro-batch calls (1-based) NaN, as an overflow would."""
    real = LMTask.loss
    calls = {"n": 0}

    def install(bad: set[int] | None = None, from_call: int | None = None, scale: float | None = None) -> None:
        def loss(self: LMTask, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            calls["n"] += 1
            value = real(self, model, batch)
            hit = calls["n"] in (bad or set()) or (from_call is not None and calls["n"] >= from_call)
            if hit:
                return value * (scale if scale is not None else float("nan"))
            return value

        monkeypatch.setattr(LMTask, "loss", loss)

    return install


@pytest.fixture
def optimizer_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    count: list[int] = []
    real = torch.optim.AdamW.step

    def step(self: torch.optim.AdamW, *args: object, **kwargs: object) -> object:
        count.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return count


# the tiny preset accumulates 4 micro-batches of 8 x 32 tokens per optimizer step (1024 tokens)
def test_skip_leaves_weights_untouched_and_counts(
    bpe_data: Path, tmp_path: Path, poison, optimizer_steps: list[int]
) -> None:
    poison(bad={10})  # a micro-batch of step 3
    result = train(config(), bpe_data, tmp_path / "run", progress=False)
    assert result.steps == 6 and result.stop_reason == "max_steps"
    assert len(optimizer_steps) == 5  # step 3's update was dropped
    r = rows(tmp_path / "run")
    assert r[2]["train_loss"] == "nan" and [x["skipped_steps"] for x in r] == ["0", "0", "1", "1", "1", "1"]
    from bigmodel.models.gpt import GPT

    model = GPT.from_pretrained(tmp_path / "run" / "final")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_stop_exits_before_the_update(bpe_data: Path, tmp_path: Path, poison, optimizer_steps: list[int]) -> None:
    poison(bad={10})
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3 .*train.on_nonfinite=stop"):
        train(config("train.on_nonfinite=stop"), bpe_data, tmp_path / "run", progress=False)
    assert len(optimizer_steps) == 2
    assert checkpoint.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step-0000002"  # type: ignore[union-attr]


def test_rollback_reloads_the_last_checkpoint_and_skips_the_bad_batch(
    bpe_data: Path, tmp_path: Path, poison, optimizer_steps: list[int]
) -> None:
    poison(bad={18})  # a micro-batch of step 5; the newest checkpoint then is step 4
    result = train(config("train.on_nonfinite=rollback"), bpe_data, tmp_path / "run", progress=False)
    assert result.steps == 6
    r = rows(tmp_path / "run")
    assert [int(x["step"]) for x in r] == [1, 2, 3, 4, 5, 6]  # no rows left from the rolled-back attempt
    assert all(x["train_loss"] != "nan" for x in r) and r[-1]["skipped_steps"] == "1"
    assert len(optimizer_steps) == 6


def test_too_many_in_a_row_stop_whatever_the_policy(bpe_data: Path, tmp_path: Path, poison) -> None:
    poison(from_call=9)  # every step from step 3 on
    with pytest.raises(NonFiniteError, match=r"3 non-finite steps in a row \(train.max_nonfinite_in_row=2\)"):
        train(config("train.max_nonfinite_in_row=2"), bpe_data, tmp_path / "run", progress=False)


def test_nonfinite_guard_unit() -> None:
    guard = NonFiniteGuard("skip", 2)
    assert guard.check(1, 1.0, 2.0) == "ok"
    assert guard.check(2, 1.0, float("inf")) == "skip"
    assert guard.check(3, 1.0, 1.0) == "ok" and guard.in_row == 0 and guard.total == 1
    with pytest.raises(UserError, match="train.on_nonfinite='maybe' is invalid"):
        NonFiniteGuard("maybe", 2)
    with pytest.raises(ConfigError, match="train.on_nonfinite='maybe' is invalid: expected skip | stop | rollback"):
        resolve_config("tiny", None, ["train.on_nonfinite=maybe"])


def test_spike_detector() -> None:
    spikes = SpikeDetector(3.0, window=20)
    assert not any(spikes.update(x) for x in [2.0, 9.0, 2.1, 1.9, 2.0, 2.05, 2.0, 2.0, 1.9, 2.0])  # history first
    assert spikes.update(6.5) and not spikes.update(2.0)
    assert not SpikeDetector(0.0, window=2).update(1e9)  # 0 turns it off
    state = spikes.state_dict()
    fresh = SpikeDetector(3.0, window=20)
    fresh.load_state_dict(state)
    assert fresh.update(100.0)


def test_loss_spikes_are_logged(bpe_data: Path, tmp_path: Path, poison) -> None:
    poison(bad={4 * 12 + k for k in range(1, 5)}, scale=10.0)  # every micro-batch of step 13
    train(config("train.spike_factor=3", steps=14), bpe_data, tmp_path / "run", progress=False)
    flagged = [int(x["step"]) for x in rows(tmp_path / "run") if x["loss_spike"] == "1"]
    assert flagged == [13]


def test_sigterm_saves_a_checkpoint_and_exits_0(bpe_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    sets = [a for s in [*BASE, "train.max_steps=100000", "train.checkpoint_every=0"] for a in ("--set", s)]
    cmd = [sys.executable, "-m", "bigmodel", "train", "--data", str(bpe_data), "--out", str(run), "--preset", "tiny"]
    env = {**os.environ, **SUBPROCESS_ENV}
    p = subprocess.Popen([*cmd, *sets], stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    deadline = time.time() + 60
    while time.time() < deadline and (not (run / "metrics.csv").exists() or len(rows(run)) < 3):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "preempted at step" in err and "continue with --resume auto" in err
    last = checkpoint.latest_checkpoint(run / "checkpoints")
    assert last is not None and int(last.name.split("-")[1]) >= 3


def test_failed_checkpoint_write_keeps_the_previous_one(
    bpe_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = atomic.write_safetensors

    def full_disk(path: str | Path, *args: object, **kwargs: object) -> None:
        if "step-0000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(atomic, "write_safetensors", full_disk)
    run = tmp_path / "run"
    with pytest.raises(
        UserError,
        match=r"could not write checkpoint .*step-0000004: No space left on device; "
        r"the previous checkpoint step-0000002 is intact",
    ):
        train(config(), bpe_data, run, progress=False)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000002"]  # no temporary folder left
    monkeypatch.setattr(atomic, "write_safetensors", real)
    result = train(config(), bpe_data, run, resume="auto", progress=False)
    assert result.steps == 6


def test_checkpoint_metadata_cannot_execute_code(tiny_run, tmp_path: Path) -> None:
    import shutil

    from bigmodel.models.gpt import GPT
    from bigmodel.train.optim import make_optimizer

    ckpt = tmp_path / "step-0000030"
    shutil.copytree(tiny_run[0].run_dir / "checkpoints" / "step-0000030", ckpt)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    (ckpt / "trainer_state" / "dcp" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    model = GPT.from_pretrained(ckpt)
    with pytest.raises(UserError, match=r"refusing to unpickle (posix|os)\.system"):
        checkpoint.load_checkpoint(ckpt, model, make_optimizer(model, tiny_run[1].train))
    assert not marker.exists()


def test_one_process_killed_while_writing_a_checkpoint_resumes_exactly(bpe_data: Path, tmp_path: Path) -> None:
    sets = [a for s in [*BASE, "train.max_steps=6", "train.deterministic=true"] for a in ("--set", s)]

    def cmd(out: Path, *extra: str) -> list[str]:
        base = [sys.executable, "-m", "bigmodel", "train", "--data", str(bpe_data), "--out", str(out)]
        return [*base, "--preset", "tiny", *sets, *extra]

    env = {**os.environ, **SUBPROCESS_ENV}
    full = subprocess.Popen(cmd(tmp_path / "full"), stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    killed = subprocess.run(
        cmd(tmp_path / "killed"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, checkpoint.KILL_IN_CHECKPOINT_ENV: "4"},
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL
    ckpts = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-0000004.tmp", "step-0000002"]
    resumed = subprocess.run(
        cmd(tmp_path / "killed", "--resume", "auto"), capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "step-0000002 at step 2" in resumed.stderr
    assert full.wait(timeout=120) == 0
    want = [x["train_loss"] for x in rows(tmp_path / "full")]
    assert [x["train_loss"] for x in rows(tmp_path / "killed")] == want and len(want) == 6
