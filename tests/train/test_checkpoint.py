"""Checkpoints: atomic complete folders, keep-K, exact save/load, and a SIGKILLed run that resumes exactly."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigmodel import hardware
from bigmodel.config import resolve_config
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.errors import UserError
from bigmodel.models.gpt import GPT
from bigmodel.train import checkpoint
from bigmodel.train.loop import train
from bigmodel.train.optim import make_optimizer
from conftest import REPO, SUBPROCESS_ENV, tiny_gpt


def _setup(seed: int = 0) -> tuple[GPT, torch.optim.Optimizer, Tokenizer]:
    tok = Tokenizer.char()
    model = tiny_gpt(tok.vocab_size, seed=seed).train()
    opt = make_optimizer(model, resolve_config("tiny").train)
    return model, opt, tok


def _step(model: GPT, opt: torch.optim.Optimizer, seed: int) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 257, (4, 16), generator=g)
    _, loss = model(x, torch.roll(x, -1, dims=1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def _save(folder: Path, step: int, model: GPT, opt: torch.optim.Optimizer, tok: Tokenizer, keep: int = 2) -> Path:
    config = resolve_config(
        "tiny", None, [f"model.vocab_size={tok.vocab_size}", "model.block_size=32", "model.n_embd=32"]
    )
    state = {"step": step, "tokens": 64 * step, "elapsed_s": 1.5, "loader": {"epoch": 0, "cursor": step}, "data": "abc"}
    return checkpoint.save_checkpoint(
        folder,
        step,
        model=model,
        optimizer=opt,
        save_model=lambda d: model.save_pretrained(d, tok),
        config=config,
        state=state,
        keep=keep,
    )


def test_save_and_load_restore_everything(tmp_path: Path) -> None:
    model, opt, tok = _setup()
    for s in range(3):
        _step(model, opt, s)
    path = _save(tmp_path, 3, model, opt, tok)
    assert path == tmp_path / "step-0000003" and (path / "COMPLETE").is_file()
    random.seed(42)
    torch.manual_seed(43)
    path = _save(tmp_path, 3, model, opt, tok)  # saving the same step again replaces it
    expected_rand = (torch.rand(3), random.random())
    continued = [_step(model, opt, s) for s in range(3, 6)]

    model2, opt2, _ = _setup(seed=1)  # different weights, fresh optimizer
    torch.manual_seed(0)
    random.seed(0)
    state = checkpoint.load_checkpoint(path, model2, opt2)
    assert state["step"] == 3 and state["tokens"] == 192 and state["loader"] == {"epoch": 0, "cursor": 3}
    assert state["data"] == "abc" and "python_rng" not in state and state["world_size"] == 1
    got_rand = (torch.rand(3), random.random())
    assert torch.equal(got_rand[0], expected_rand[0]) and got_rand[1] == expected_rand[1]  # RNG states restored
    # weights and optimizer moments restored: the next steps are bit-identical
    assert [_step(model2, opt2, s) for s in range(3, 6)] == continued
    for k, v in model.state_dict().items():
        assert torch.equal(v, model2.state_dict()[k]), k


def test_checkpoint_is_a_model_directory(tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    model, opt, tok = _setup()
    _step(model, opt, 0)
    path = _save(tmp_path, 1, model, opt, tok)
    assert json.loads((path / "trainer_state" / "state.json").read_text())["format_version"] == 2
    hf = GPT2LMHeadModel.from_pretrained(path).eval()
    x = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[0], hf(x).logits, rtol=1e-4, atol=1e-4)
    assert not list(path.rglob("*.pt")) and not list(path.rglob("*.bin")) and not list(path.rglob("*.pkl"))


def test_keep_only_the_newest_k(tmp_path: Path) -> None:
    model, opt, tok = _setup()
    _step(model, opt, 0)
    for step in (4, 8, 12, 16):
        _save(tmp_path, step, model, opt, tok, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000012", "step-0000016"]
    _save(tmp_path, 20, model, opt, tok, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000012", "step-0000016", "step-0000020"]


def test_incomplete_checkpoint_is_skipped_with_a_warning(tmp_path: Path) -> None:
    model, opt, tok = _setup()
    _step(model, opt, 0)
    _save(tmp_path, 9, model, opt, tok)
    _save(tmp_path, 10, model, opt, tok)  # numeric order, not string order of the names
    broken = tmp_path / "step-0000012"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".step-0000013.tmp").mkdir()  # an interrupted write in progress: ignored silently
    (tmp_path / "notes").mkdir()
    with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*step-0000012 \(no COMPLETE marker\)"):
        latest = checkpoint.latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step-0000010"
    with pytest.warns(UserWarning):
        assert checkpoint.complete_checkpoints(tmp_path) == [tmp_path / "step-0000009", tmp_path / "step-0000010"]
    with pytest.raises(UserError, match="is not a complete checkpoint"):
        checkpoint.load_checkpoint(broken, model, opt)
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None


def test_check_compatible(tmp_path: Path) -> None:
    model, opt, tok = _setup()
    _step(model, opt, 0)
    path = _save(tmp_path, 1, model, opt, tok)
    base = ["model.vocab_size=257", "model.block_size=32", "model.n_embd=32"]
    assert checkpoint.check_compatible(path, resolve_config("tiny", None, base)) == []
    changed = checkpoint.check_compatible(path, resolve_config("tiny", None, [*base, "train.lr=0.01"]))
    assert changed == ["train.lr: 0.003 -> 0.01"]
    with pytest.raises(UserError, match=r"model.n_layer: 2 -> 3.*resume with the same --preset"):
        checkpoint.check_compatible(path, resolve_config("tiny", None, [*base, "model.n_layer=3"]))


def test_format_version_mismatch_is_refused(tmp_path: Path) -> None:
    model, opt, tok = _setup()
    _step(model, opt, 0)
    path = _save(tmp_path, 1, model, opt, tok)
    state_file = path / "trainer_state" / "state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "format_version": 7}))
    with pytest.raises(UserError, match="checkpoint format version 7"):
        checkpoint.load_checkpoint(path, model, opt)


# ----- kill and resume -------------------------------------------------------------------------------------
TRAIN_ARGS = [
    "--preset",
    "tiny",
    "--set",
    "model.block_size=32",
    "--set",
    "train.deterministic=true",
    "--set",
    "train.max_steps=12",
    "--set",
    "train.checkpoint_every=4",
    "--set",
    "train.log_every=1",
]


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bigmodel", "train", "--data", str(data), "--out", str(out), *TRAIN_ARGS, *extra]


def _popen(cmd: list[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, **SUBPROCESS_ENV, **env},
    )


def _loss_by_step(run: Path) -> tuple[dict[int, str], list[str]]:
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    train_rows = [r for r in rows if r["train_loss"]]
    steps = [int(r["step"]) for r in train_rows]
    assert len(steps) == len(set(steps)), f"duplicate metrics rows: {steps}"
    return {int(r["step"]): r["train_loss"] for r in train_rows}, [r["val_loss"] for r in rows if r["val_loss"]]


def test_killed_run_resumes_exactly(bpe_data: Path, tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra: list[str] = []
    # the uninterrupted run and the run that SIGKILLs itself after step 6 (checkpoint 4 written, 8 not yet)
    p_full = _popen(_train_cmd(bpe_data, full, *extra))
    p_killed = _popen(_train_cmd(bpe_data, killed, *extra), BIGMODEL_KILL_AT_STEP="6")
    _, err = p_killed.communicate(timeout=120)
    assert p_killed.returncode == -9, err
    out_full, err_full = p_full.communicate(timeout=120)
    assert p_full.returncode == 0, err_full

    assert (killed / "checkpoints" / "step-0000004" / "COMPLETE").is_file()
    assert not (killed / "checkpoints" / "step-0000008").exists()
    assert not (killed / "final").exists()
    assert sorted(_loss_by_step(killed)[0]) == [1, 2, 3, 4, 5, 6]

    resumed = subprocess.run(
        _train_cmd(bpe_data, killed, *extra, "--resume", "auto"),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **SUBPROCESS_ENV},
        timeout=120,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "step-0000004 at step 4" in resumed.stderr

    want, want_val = _loss_by_step(full)
    got, got_val = _loss_by_step(killed)
    assert sorted(want) == sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        assert got[step] == want[step], f"step {step}: resumed {got[step]} != uninterrupted {want[step]}"
    assert got_val == want_val and len(want_val) == 1  # the final evaluation
    a, b = GPT.from_pretrained(full / "final"), GPT.from_pretrained(killed / "final")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-0000008", "step-0000012"]


def test_resume_with_dropout_is_exact(bpe_data: Path, tmp_path: Path) -> None:
    """In-process variant of the kill test with dropout (which consumes the torch RNG every step)."""
    config = [
        "model.block_size=32",
        "model.dropout=0.1",
        "train.max_steps=8",
        "train.checkpoint_every=4",
        "train.eval_every=0",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    hardware.matmul_peak_flops.cache_clear()  # as in a fresh process
    train(resolve_config("tiny", None, config), bpe_data, full, progress=False)
    shutil.copytree(full, cut)  # then lose everything after checkpoint 4, as a crash at step 6 would
    shutil.rmtree(cut / "checkpoints" / "step-0000008")
    shutil.rmtree(cut / "final")
    hardware.matmul_peak_flops.cache_clear()
    train(resolve_config("tiny", None, config), bpe_data, cut, resume="auto", progress=False)
    want, got = _loss_by_step(full)[0], _loss_by_step(cut)[0]
    assert sorted(got) == list(range(1, 9))
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]
