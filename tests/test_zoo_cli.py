"""End to end through the one training loop: `bigmodel train --task classify|seq2seq|mlm|autoencode` and `eval`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bigmodel.cli import main
from bigmodel.models import MLP, Encoder, RNNSeq2Seq, load_model
from conftest import run_cli

FAST = ["train.eval_every=10", "train.log_every=5", "train.checkpoint_every=10"]


def _train(capsys: pytest.CaptureFixture[str], *args: str) -> None:
    assert main(["train", *args]) == 0, capsys.readouterr().err


def _eval(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, float]:
    capsys.readouterr()
    assert main(["eval", *args]) == 0
    return dict(json.loads(capsys.readouterr().out))


def _train_losses(run: Path) -> dict[int, float]:
    with (run / "metrics.csv").open() as f:
        return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(f) if r["train_loss"]}


def test_classify_digits_trains_exports_and_evaluates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    sets = ["model.hidden=16", "train.max_steps=30", "train.warmup_steps=5", *FAST]
    _train(capsys, "--preset", "mlp", "--data", "digits", "--out", str(run), *sum([["--set", s] for s in sets], []))
    assert (run / "final" / "config.json").is_file() and (run / "loss.png").is_file()
    model = load_model(run / "final")
    assert isinstance(model, MLP) and model.labels == [str(i) for i in range(10)]
    metrics = _eval(capsys, str(run), "--data", "digits")
    assert set(metrics) == {"loss", "accuracy", "examples"} and metrics["accuracy"] > 0.5  # chance: 0.1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["units"] == 30 * 64  # counted in examples
    with open(run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["val_metric"]]
    assert [int(r["step"]) for r in rows] == [10, 20, 30]  # periodic accuracy in the log


def test_classify_resume_is_exact_after_a_kill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sets = ["model.connection=sparse", "train.max_steps=20", "train.deterministic=true", *FAST]
    flags = sum([["--set", s] for s in sets], [])
    whole = tmp_path / "whole"
    _train(capsys, "--preset", "mlp", "--data", "digits", "--out", str(whole), *flags)
    killed = tmp_path / "killed"
    proc = run_cli(
        "train",
        "--preset",
        "mlp",
        "--data",
        "digits",
        "--out",
        str(killed),
        *flags,
        env={"BIGMODEL_KILL_AT_STEP": "15"},
    )
    assert proc.returncode == -9, proc.stderr
    _train(capsys, "--preset", "mlp", "--data", "digits", "--out", str(killed), "--resume", "auto", *flags)
    assert _train_losses(killed) == _train_losses(whole)  # bit-equal after the resume from step 10


def test_seq2seq_rnn_on_a_tsv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bigmodel.data.seq2seq import number_words

    (tmp_path / "train.tsv").write_text("".join(f"{number_words(n)}\t{n}\n" for n in range(0, 600, 3)))
    (tmp_path / "val.tsv").write_text("".join(f"{number_words(n)}\t{n}\n" for n in range(1, 60, 3)))
    run = tmp_path / "run"
    sets = ["model.arch=rnn-seq2seq", "model.hidden=32", "model.n_embd=16", "train.max_steps=20", *FAST]
    _train(
        capsys, "--task", "seq2seq", "--data", str(tmp_path), "--out", str(run), *sum([["--set", s] for s in sets], [])
    )
    model = load_model(run / "final")
    assert isinstance(model, RNNSeq2Seq)
    assert (run / "final" / "tokenizer.json").is_file()
    metrics = _eval(capsys, str(run), "--data", str(tmp_path), "--max-tokens", "15")
    assert set(metrics) == {"loss", "exact_match", "cer", "bleu", "examples"} and metrics["examples"] == 15
    assert 0 <= metrics["exact_match"] <= 1 and metrics["cer"] > 0


def test_mlm_pretraining_then_genre_style_fine_tuning(
    char_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shape = ["model.block_size=32", "model.n_layer=1", "model.n_embd=16", "model.d_ff=32", "model.n_head=2"]
    pre = tmp_path / "mlm"
    sets = [*shape, "train.max_steps=10", "train.batch_size=16", "train.micro_batch=16", "train.eval_tokens=8", *FAST]
    _train(capsys, "--task", "mlm", "--data", str(char_data), "--out", str(pre), *sum([["--set", s] for s in sets], []))
    metrics = _eval(capsys, str(pre), "--data", str(char_data), "--max-tokens", "4")
    assert set(metrics) == {"loss", "accuracy", "masked_tokens"}
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "train.tsv").write_text("".join(f"line {i} {'up' if i % 2 else 'down'}\t{i % 2}\n" for i in range(40)))
    (pairs / "val.tsv").write_text("line x up\t1\nline y down\t0\n")
    fine = tmp_path / "fine"
    sets = [f"model.init_from={pre / 'final'}", "train.max_steps=5", "train.batch_size=8", "train.micro_batch=8"]
    _train(
        capsys,
        "--task",
        "classify",
        "--data",
        str(pairs),
        "--out",
        str(fine),
        "--set",
        "model.arch=encoder",
        *sum([["--set", s] for s in sets], []),
    )
    model = load_model(fine / "final")
    pretrained = load_model(pre / "final")
    assert isinstance(model, Encoder) and model.classifier is not None and model.labels == ["0", "1"]
    assert isinstance(pretrained, Encoder)
    # the trunk started from the pretrained one (same shape), the head is new
    assert model.wte.weight.shape == pretrained.wte.weight.shape and model.mlm is None
    metrics = _eval(capsys, str(fine), "--data", str(pairs))
    assert metrics["examples"] == 2


def test_autoencode_npy_and_eval_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    x = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = tmp_path / "run"
    sets = ["model.hidden=24", "train.max_steps=20", *FAST]
    _train(
        capsys,
        "--task",
        "autoencode",
        "--data",
        str(tmp_path / "x.npy"),
        "--out",
        str(run),
        *sum([["--set", s] for s in sets], []),
    )
    metrics = _eval(capsys, str(run), "--data", str(tmp_path / "x.npy"))
    assert {"reconstruction_error", "sparsity", "active_units"} <= set(metrics)
    assert 0 <= metrics["sparsity"] <= 1
    np.save(tmp_path / "y.npy", x[:, :5])
    assert main(["eval", str(run), "--data", str(tmp_path / "y.npy")]) == 2
    assert "does not match" in capsys.readouterr().err
    assert main(["eval", str(run), "--data", str(tmp_path / "x.npy"), "--dtype", "int8"]) == 2
    assert main(["train", "--task", "classify", "--data", "digitz", "--out", str(tmp_path / "r2")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    torch.manual_seed(0)


def test_encoder_classifier_from_scratch_with_a_bpe_tokenizer(
    bpe_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from bigmodel.data.tokenizer import Tokenizer

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "train.tsv").write_text(
        "".join(f"the king {'loves' if i % 2 else 'fears'} me\t{i % 2}\n" for i in range(32))
    )
    (pairs / "val.tsv").write_text("the king loves me\t1\nthe king fears me\t0\n")
    shape = ["model.block_size=16", "model.n_layer=1", "model.n_embd=16", "model.d_ff=32", "model.n_head=2"]
    sets = [*shape, "model.arch=encoder", f"model.tokenizer={bpe_data}", "train.max_steps=3", "train.batch_size=8"]
    run = tmp_path / "run"
    flags = sum([["--set", s] for s in [*sets, "train.micro_batch=8"]], [])
    _train(capsys, "--task", "classify", "--data", str(pairs), "--out", str(run), *flags)
    bpe = Tokenizer.from_pretrained(bpe_data)
    model = load_model(run / "final")
    assert isinstance(model, Encoder) and model.wte.num_embeddings == bpe.vocab_size + 2  # + [MASK], [PAD]
    assert Tokenizer.from_pretrained(run / "final").encode("the king") == bpe.encode("the king")
    assert _eval(capsys, str(run), "--data", str(pairs))["examples"] == 2  # with its saved tokenizer
    both = [*flags, "--set", f"model.init_from={run / 'final'}"]
    assert main(["train", "--task", "classify", "--data", str(pairs), "--out", str(tmp_path / "x"), *both]) == 2
    assert "drop model.tokenizer" in capsys.readouterr().err
