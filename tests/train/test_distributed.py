"""2-process training on CPU with gloo, through the real `torchrun`: DDP and FSDP2 match one process,
their DCP checkpoints resume at another world size, and a 2-rank run SIGKILLed in the middle of writing a
checkpoint resumes bit-exactly."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigmodel.config import resolve_config
from bigmodel.models.gpt import GPT
from bigmodel.train.loop import train
from conftest import REPO, SUBPROCESS_ENV

ARGS = [
    "model.block_size=32",
    "train.max_steps=8",
    "train.checkpoint_every=4",
    "train.log_every=1",
    "train.eval_every=0",
    "train.deterministic=true",
    "train.precision=fp32",  # bf16 autocast (the default on CPUs with native bf16) rounds per batch shape
]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _cmd(data: Path, out: Path, *sets: str, resume: bool = False) -> list[str]:
    options = [a for s in [*ARGS, *sets] for a in ("--set", s)] + (["--resume", "auto"] if resume else [])
    return [*TORCHRUN, "-m", "bigmodel", "train", "--data", str(data), "--out", str(out), "--preset", "tiny", *options]


def _start(cmd: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, **SUBPROCESS_ENV, **env},
    )


def _finish(p: subprocess.Popen[str], ok: bool = True) -> str:
    _, err = p.communicate(timeout=240)
    if ok:
        assert p.returncode == 0, err[-3000:]
    return err


def losses(run: Path) -> dict[int, float]:
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["train_loss"]]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"duplicate rows: {steps}"
    return {int(r["step"]): float(r["train_loss"]) for r in rows}


@pytest.fixture(scope="module")
def runs(bpe_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One process, 2-rank DDP, and 2-rank FSDP with activation checkpointing: the same config, 8 steps."""
    root = tmp_path_factory.mktemp("dist")
    ddp = _start(_cmd(bpe_data, root / "ddp", "train.parallel=ddp"))
    fsdp = _start(_cmd(bpe_data, root / "fsdp", "train.parallel=fsdp", "train.activation_checkpointing=true"))
    train(resolve_config("tiny", None, ARGS), bpe_data, root / "one", progress=False)
    _finish(ddp)
    _finish(fsdp)
    return {"one": root / "one", "ddp": root / "ddp", "fsdp": root / "fsdp"}


def test_ddp_and_fsdp_match_one_process(runs: dict[str, Path]) -> None:
    one = losses(runs["one"])
    assert sorted(one) == list(range(1, 9)) and one[8] < one[1] - 0.5
    for name in ("ddp", "fsdp"):
        got = losses(runs[name])
        assert sorted(got) == sorted(one)
        for step in one:  # same global batch (the same windows), summed in another order: float noise only
            assert got[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), f"{name} step {step}"
    # rank 0 alone exported the model, and it matches the one-process model
    a, b = GPT.from_pretrained(runs["one"] / "final"), GPT.from_pretrained(runs["fsdp"] / "final")
    for k, v in a.state_dict().items():
        torch.testing.assert_close(b.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    shards = sorted(p.name for p in (runs["fsdp"] / "checkpoints" / "step-0000008" / "trainer_state" / "dcp").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # every rank wrote its own shard
    assert sorted(p.name for p in (runs["fsdp"] / "checkpoints" / "step-0000008" / "trainer_state").glob("rank-*")) == [
        "rank-00000.safetensors",
        "rank-00001.safetensors",
    ]


def _cut_after(run: Path, step: int, to: Path) -> Path:
    """A copy of `run` as a crash right after checkpoint `step` would have left it."""
    import shutil

    shutil.copytree(run, to)
    shutil.rmtree(to / "final")
    for ckpt in (to / "checkpoints").iterdir():
        if int(ckpt.name.split("-")[1]) > step:
            shutil.rmtree(ckpt)
    return to


def test_fsdp_checkpoint_resumes_on_one_rank_and_on_ddp(runs: dict[str, Path], bpe_data: Path, tmp_path: Path) -> None:
    want = losses(runs["fsdp"])
    on_ddp = _cut_after(runs["fsdp"], 4, tmp_path / "on-ddp")
    p = _start(_cmd(bpe_data, on_ddp, "train.parallel=ddp", "train.activation_checkpointing=true", resume=True))
    on_one = _cut_after(runs["fsdp"], 4, tmp_path / "on-one")
    config = resolve_config("tiny", None, [*ARGS, "train.parallel=fsdp", "train.activation_checkpointing=true"])
    train(config, bpe_data, on_one, resume="auto", progress=False)
    err = _finish(p)
    assert "resumed from" in err and "step-0000004" in err
    for run in (on_one, on_ddp):
        got = losses(run)
        assert sorted(got) == list(range(1, 9))
        for step in range(5, 9):
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), f"{run.name} step {step}"


def test_two_ranks_killed_while_writing_a_checkpoint_resume_exactly(
    runs: dict[str, Path], bpe_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "killed"
    # rank 0 SIGKILLs itself inside the save of checkpoint 8: shards written, COMPLETE marker not yet
    p = _start(_cmd(bpe_data, run, "train.parallel=ddp"), BIGMODEL_KILL_IN_CHECKPOINT="8")
    _finish(p, ok=False)
    assert p.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / "step-0000004" / "COMPLETE").is_file() and not (ckpts / "step-0000008").exists()
    assert (ckpts / ".step-0000008.tmp" / "trainer_state" / "dcp").is_dir()  # the half-written one
    assert not (run / "final").exists()
    err = _finish(_start(_cmd(bpe_data, run, "train.parallel=ddp", resume=True)))
    assert "step-0000004 at step 4" in err
    want, got = losses(runs["ddp"]), losses(run)
    assert sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(1, 9)] == [want[s] for s in range(1, 9)]  # bit-equal, as printed
    a, b = GPT.from_pretrained(runs["ddp"] / "final"), GPT.from_pretrained(run / "final")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not (ckpts / ".step-0000008.tmp").exists()  # rewritten and renamed when step 8 came again
