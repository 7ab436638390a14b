"""The example-counted tasks (classify, seq2seq, mlm, autoencode), exercised with a few manual optimizer steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

from bigmodel.config import resolve_config
from bigmodel.errors import UserError
from bigmodel.metrics import activation_sparsity
from bigmodel.models.encoder import IGNORE
from bigmodel.tasks import TASKS, AutoencodeTask, ClassifyTask, MLMTask, Seq2SeqTask
from bigmodel.tasks.examples import ExampleStream, bootstrap_sample
from bigmodel.tasks.lm import LMTask


def _collate(idx: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"i": idx, "noise": torch.rand(len(idx), generator=g)}


def test_example_stream_covers_each_epoch_and_resumes_exactly() -> None:
    stream = ExampleStream(10, 4, seed=3, collate=_collate)
    first = [stream.next_batch() for _ in range(5)]  # 20 examples: two whole epochs
    seen = torch.cat([b["i"] for b in first])
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])  # a new order each epoch
    again = ExampleStream(10, 4, seed=3, collate=_collate)
    for _ in range(2):
        again.next_batch()
    resumed = ExampleStream(10, 4, seed=3, collate=_collate)
    resumed.load_state_dict(again.state_dict())
    for expected in first[2:]:
        got = resumed.next_batch()
        assert torch.equal(got["i"], expected["i"]) and torch.equal(got["noise"], expected["noise"])


def test_example_stream_ranks_read_disjoint_examples() -> None:
    ranks = [ExampleStream(10, 5, seed=0, collate=_collate, rank=r, world_size=2) for r in range(2)]
    a, b = (s.next_batch()["i"] for s in ranks)
    assert not set(a.tolist()) & set(b.tolist())
    with pytest.raises(UserError, match="cannot be shared"):
        ExampleStream(1, 1, 0, _collate, world_size=2)


def test_bootstrap_stream_reads_a_fixed_resample_each_epoch_and_resumes() -> None:
    n = 40
    sample = bootstrap_sample(n, seed=5)
    assert sample.shape == (n,) and int(sample.min()) >= 0 and int(sample.max()) < n
    assert 15 < len(set(sample.tolist())) < n  # with replacement: about 63% distinct (25.3 of 40 expected)
    assert torch.equal(sample, bootstrap_sample(n, seed=5)) and not torch.equal(sample, bootstrap_sample(n, seed=6))
    stream = ExampleStream(n, 8, seed=5, collate=_collate, bootstrap=True)
    drawn = torch.cat([stream.next_batch()["i"] for _ in range(10)])  # two epochs of the resample
    for epoch in (drawn[:n], drawn[n:]):  # each epoch: the resample's multiset, repeats included
        assert torch.equal(epoch.sort().values, sample.sort().values)
    assert not torch.equal(drawn[:n], drawn[n:])
    resumed = ExampleStream(n, 8, seed=5, collate=_collate, bootstrap=True)
    resumed.load_state_dict({"epoch": 1, "cursor": 0})
    assert torch.equal(torch.cat([resumed.next_batch()["i"] for _ in range(5)]), drawn[n:])
    # ranks split one resample (the same on every rank): together they read it once per epoch
    ranks = [ExampleStream(n, n // 2, seed=5, collate=_collate, rank=r, world_size=2, bootstrap=True) for r in (0, 1)]
    both = torch.cat([r.next_batch()["i"] for r in ranks])
    assert torch.equal(both.sort().values, sample.sort().values)


def test_train_bootstrap_resamples_the_classify_examples_and_is_refused_by_lm(char_data: Path) -> None:
    config = resolve_config("mlp", None, ["train.bootstrap=true", "train.micro_batch=64"])
    task = ClassifyTask(config, "breast-cancer")
    n = len(task.y_train)
    stream = task.batches(64, seed=3)
    idx = torch.cat([stream.next_indices() for _ in range(-(-n // 64))])[:n]
    assert torch.equal(idx.sort().values, bootstrap_sample(n, 3).sort().values)  # the resample, not 0..n-1
    assert len(set(idx.tolist())) < n
    plain = ClassifyTask(resolve_config("mlp"), "breast-cancer").batches(64, seed=3)
    every = torch.cat([plain.next_indices() for _ in range(-(-n // 64))])[:n]
    assert sorted(every.tolist()) == list(range(n))  # off by default: each example once per epoch
    with pytest.raises(UserError, match="train.bootstrap"):
        LMTask(resolve_config("tiny", None, ["train.bootstrap=true"]), char_data)


def _train(task, steps: int, lr: float = 3e-3) -> tuple[torch.nn.Module, list[float]]:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = task.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    stream = task.batches(task.config.train.micro_batch, seed=0)
    losses = []
    for _ in range(steps):
        loss = task.loss(model, stream.next_batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


def test_classify_digits_learns_and_reports_accuracy() -> None:
    config = resolve_config("mlp", None, ["train.micro_batch=128", "model.hidden=32"])
    task = TASKS[config.task](config, "digits")
    assert isinstance(task, ClassifyTask)
    assert config.model.in_features == 64 and config.model.n_classes == 10  # type: ignore[union-attr]
    model, losses = _train(task, 40)
    assert losses[-1] < 0.5 * losses[0]
    metrics = task.evaluate(model)
    with torch.no_grad():
        expected = (model(task.x_val)[0].argmax(-1) == task.y_val).float().mean()
    assert metrics["accuracy"] == pytest.approx(float(expected)) and metrics["accuracy"] > 0.8
    assert metrics["examples"] == len(task.y_val) == 359
    assert task.evaluate(model, limit=50)["examples"] == 50


def test_classify_multi_input_splits_columns_and_checks_them() -> None:
    config = resolve_config("multi-input", None, ["model.n_inputs=3"])
    task = ClassifyTask(config, "breast-cancer")
    assert config.model.in_features == 10  # type: ignore[union-attr]
    model, losses = _train(task, 20)
    assert losses[-1] < losses[0]
    with pytest.raises(UserError, match="set model.n_inputs"):
        ClassifyTask(resolve_config("multi-input", None, ["model.n_inputs=4"]), "breast-cancer")


def test_classify_text_with_the_encoder(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text(
        "".join(f"{w} {w}\t{'a' if i % 2 else 'b'}\n" for i, w in enumerate("xyzuvw" * 5))
    )
    (tmp_path / "val.tsv").write_text("x x\tb\ny y\ta\n")
    config = resolve_config("encoder", None, ["model.n_layer=1", "model.n_embd=16", "model.d_ff=32"], task="classify")
    task = ClassifyTask(config, tmp_path)
    assert task.labels == ["a", "b"] and config.model.vocab_size == 259  # type: ignore[union-attr]
    batch = task.batches(4, 0).next_batch()
    assert batch["input_ids"].shape == (4, 3) and batch["labels"].shape == (4,)
    model, _ = _train(task, 3)
    assert set(task.evaluate(model)) == {"loss", "accuracy", "examples"}


def test_seq2seq_encoding_and_metrics(tmp_path: Path) -> None:
    (tmp_path / "train.tsv").write_text("ab\tba\nabc\tcba\n")
    (tmp_path / "val.tsv").write_text("ca\tac\n")
    config = resolve_config("rnn-seq2seq", None, ["model.hidden=16", "model.n_embd=8", "train.micro_batch=2"])
    task = Seq2SeqTask(config, tmp_path)
    source, target = task.train[1]
    assert source.tolist() == [97, 98, 99, 256] and target.tolist() == [257, 99, 98, 97, 256]  # bytes, end; start
    batch = task.batches(2, 0).next_batch()
    assert (batch["source"] == task.pad).sum() == 1 and (batch["target"] == task.pad).sum() == 1
    model, _ = _train(task, 2)
    metrics = task.evaluate(model)
    out = task.translate(model, ["ca"])
    assert metrics["exact_match"] == float(out == ["ac"])
    assert set(metrics) == {"loss", "exact_match", "cer", "bleu", "examples"}
    too_long = resolve_config("seq2seq", None, ["model.max_source_len=2"])
    with pytest.raises(UserError, match=r"pair 2 has a source of 3 bytes.*model.max_source_len=3"):
        Seq2SeqTask(too_long, tmp_path)
    with pytest.raises(UserError, match="seq2seq or rnn-seq2seq"):
        Seq2SeqTask(resolve_config("mlp"), tmp_path)


def test_mlm_masks_like_bert(char_data: Path) -> None:
    config = resolve_config("encoder", None, ["model.block_size=64", "model.n_layer=1", "model.n_embd=16"])
    task = MLMTask(config, char_data)
    assert config.model.vocab_size == 259  # type: ignore[union-attr]
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(min(40, len(task.train_windows)))
    batch = task._collate(task.shards, task.train_windows, idx, g)
    ids, labels = batch["input_ids"], batch["labels"]
    chosen = labels != IGNORE
    assert 0.12 < chosen.float().mean() < 0.19  # mask_prob 0.15 (+ one forced per window)
    original = labels[chosen]
    masked = ids[chosen] == task.mask_id
    kept = ids[chosen] == original
    assert 0.7 < masked.float().mean() < 0.9 and 0.04 < (kept & ~masked).float().mean() < 0.2
    assert torch.equal(ids[~chosen] == task.mask_id, torch.zeros_like(ids[~chosen], dtype=torch.bool))
    again = task._collate(task.shards, task.train_windows, idx, torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], ids)  # the stream position decides the mask: resumable
    model, losses = _train(task, 3, lr=1e-3)
    metrics = task.evaluate(model, limit=8)
    assert set(metrics) == {"loss", "accuracy", "masked_tokens"} and metrics["loss"] > 0


def test_autoencode_reports_reconstruction_and_sparsity() -> None:
    config = resolve_config("autoencoder", None, ["model.hidden=32", "train.micro_batch=128"])
    task = AutoencodeTask(config, "digits")
    model, losses = _train(task, 30)
    assert losses[-1] < losses[0]
    metrics = task.evaluate(model)
    with torch.no_grad():
        codes = model.encode(task.x_val)  # type: ignore[operator]
        err = ((model.decode(codes) - model.scale(task.x_val)) ** 2).mean()  # type: ignore[operator]
    assert metrics["reconstruction_error"] == pytest.approx(float(err), rel=1e-5)
    assert metrics["sparsity"] == pytest.approx(activation_sparsity(codes))
    assert_close(torch.tensor(metrics["active_units"]), (codes >= 0.01).float().sum(1).mean())


def test_tasks_refuse_other_families() -> None:
    with pytest.raises(UserError, match="autoencoder models"):
        AutoencodeTask(resolve_config("mlp"), "digits")
    with pytest.raises(UserError, match="mlp, multi-input or encoder"):
        ClassifyTask(resolve_config("autoencoder", None, [], task="autoencode"), "digits")
