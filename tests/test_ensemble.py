"""Ensembles: voting rules, the scikit-learn-style estimator against VotingClassifier, LM mixtures through
evaluate() and generate(), checkpoint averaging, and `bigmodel ensemble`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.ensemble import VotingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.naive_bayes import GaussianNB
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.tree import DecisionTreeClassifier
from threadpoolctl import threadpool_limits
from torch import nn

from bigmodel import hardware
from bigmodel.calibration import expected_calibration_error
from bigmodel.cli import main
from bigmodel.data.loader import TokenShards
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.ensemble import (
    ClassifierEnsemble,
    EnsembleClassifier,
    LMEnsemble,
    average_checkpoints,
    hard_vote,
    run_checkpoints,
    save_average,
    soft_vote,
)
from bigmodel.evaluation import evaluate
from bigmodel.features import PCA, NotFittedError
from bigmodel.generation import generate
from bigmodel.models.gpt import GPT
from conftest import tiny_gpt


@pytest.fixture(autouse=True, scope="module")
def one_blas_thread() -> Iterator[None]:
    """scikit-learn's BLAS calls spin for seconds on 2 busy shared cores with 2 threads; 1 is faster here."""
    with threadpool_limits(1):
        yield


# ----- voting rules -----------------------------------------------------------------------------------------
def test_soft_and_hard_vote_by_hand() -> None:
    probs = torch.tensor([[[0.6, 0.4]], [[0.1, 0.9]], [[0.7, 0.3]]], dtype=torch.float64)  # (M=3, N=1, C=2)
    torch.testing.assert_close(soft_vote(probs), torch.tensor([[1.4 / 3, 1.6 / 3]], dtype=torch.float64))
    torch.testing.assert_close(soft_vote(probs, [1, 0, 1]), torch.tensor([[0.65, 0.35]], dtype=torch.float64))
    labels = torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2], [0, 2, 1, 2]])  # (M=3, N=4)
    assert hard_vote(labels, 3, tie_break="lowest").tolist() == [0, 1, 0, 2]
    with pytest.raises(ValueError, match=r"hard voting tied on 1 of 4 rows \(e\.g\. row 2: classes \[0, 1, 2\]"):
        hard_vote(labels, 3)
    assert hard_vote(labels, 3, weights=[1, 1, 3]).tolist() == [0, 2, 1, 2]  # weights decide
    with pytest.raises(ValueError, match="weights has 2 values for 3 members"):
        hard_vote(labels, 3, weights=[1, 2])
    with pytest.raises(ValueError, match="must be finite, >= 0 and not all 0"):
        soft_vote(probs, [0, 0, 0])


# ----- in-memory torch classifiers --------------------------------------------------------------------------
def test_classifier_ensemble_of_torch_modules() -> None:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)) for _ in range(3)]
    x = torch.randn(10, 4)
    ens = ClassifierEnsemble(members, weights=[2, 1, 1])
    ens.train()  # predict runs the members in eval mode (no dropout) and restores the mode
    with torch.no_grad():
        manual = sum(w * m.eval()(x).softmax(-1) for w, m in zip([0.5, 0.25, 0.25], members, strict=True))
    ens.train()
    torch.testing.assert_close(ens.predict_proba(x), manual)
    assert torch.equal(ens.predict(x), manual.argmax(-1))
    assert all(m.training for m in members)
    ens.eval()
    torch.testing.assert_close(ens(x), manual.log())  # forward: log-probabilities, usable as logits
    assert ens(x).requires_grad  # forward keeps the graph (train through it, e.g. for distillation)

    as_probs = ClassifierEnsemble([lambda t, m=m: m(t).softmax(-1) for m in members], outputs="probs")
    as_logp = ClassifierEnsemble(members, outputs="log_probs")  # wrong on purpose: logits read as log-probs
    torch.testing.assert_close(as_probs.predict_proba(x), ClassifierEnsemble(members).predict_proba(x))
    assert not torch.allclose(as_logp.predict_proba(x), ClassifierEnsemble(members).predict_proba(x))

    hard = ClassifierEnsemble(members, voting="hard", tie_break="lowest")
    with torch.no_grad():
        votes = torch.stack([m(x).argmax(-1) for m in members])
    assert torch.equal(hard.predict(x), hard_vote(votes, 3, tie_break="lowest"))
    with pytest.raises(ValueError, match="predict_proba is not available with voting='hard'"):
        hard.predict_proba(x)
    with pytest.raises(ValueError, match="members disagree on the output shape"):
        ClassifierEnsemble([members[0], nn.Linear(4, 5)]).predict(x)


def test_soft_voting_of_five_small_networks_on_digits() -> None:
    """The sanity experiment: 5 MLPs from different seeds; the soft vote is at least as good as the average
    member in accuracy, and (Jensen) its log-loss is at most their mean log-loss."""
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16, dtype=torch.float32), torch.tensor(y)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, te = perm[:1200], perm[1200:]
    members = []
    for seed in range(5):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(net.parameters(), lr=0.01)
        boot = tr[torch.randint(0, len(tr), (len(tr),), generator=torch.Generator().manual_seed(seed))]
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(net(X[boot]), y[boot]).backward()
            opt.step()
        members.append(net.eval())
    ens = ClassifierEnsemble(members)
    member_acc = [float((m(X[te]).argmax(-1) == y[te]).float().mean()) for m in members]
    with torch.no_grad():
        member_nll = [float(nn.functional.cross_entropy(m(X[te]), y[te])) for m in members]
    ens_acc = float((ens.predict(X[te]) == y[te]).float().mean())
    with torch.no_grad():
        ens_nll = float(nn.functional.nll_loss(ens(X[te]), y[te]))
    assert ens_acc >= np.mean(member_acc), (ens_acc, member_acc)
    assert ens_nll <= np.mean(member_nll) + 1e-6
    assert 0.0 <= expected_calibration_error(ens.predict_proba(X[te]), y[te]) < 0.2


# ----- scikit-learn-style estimator -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    X = X / 16
    return X[:1300], y[:1300], X[1300:], y[1300:]


def _members() -> list[tuple[str, object]]:
    return [
        ("lda", LinearDiscriminantAnalysis()),
        ("nb", GaussianNB()),
        ("knn", KNeighborsClassifier(n_neighbors=3)),
        ("tree", DecisionTreeClassifier(max_depth=6, random_state=0)),
        ("pca_lr", Pipeline([("pca", PCA(20)), ("lr", LogisticRegression(max_iter=300))])),  # our PCA inside
    ]


def test_soft_voting_equals_scikit_learn(digits: tuple[np.ndarray, ...]) -> None:
    Xtr, ytr, Xte, _ = digits
    weights = [1, 1, 2, 1, 3]
    ref = VotingClassifier(_members(), voting="soft", weights=weights).fit(Xtr, ytr)
    ours = EnsembleClassifier(_members(), voting="soft", weights=weights).fit(Xtr, ytr)
    torch.testing.assert_close(ours.predict_proba(Xte), ref.predict_proba(Xte))
    np.testing.assert_array_equal(ours.predict(Xte), ref.predict(Xte))
    np.testing.assert_array_equal(ours.classes_, ref.classes_)
    assert list(ours.named_estimators_) == ["lda", "nb", "knn", "tree", "pca_lr"]


def test_hard_voting_equals_scikit_learn_and_refuses_ties(digits: tuple[np.ndarray, ...]) -> None:
    Xtr, ytr, Xte, _ = digits
    ref = VotingClassifier(_members()[:4], voting="hard").fit(Xtr, ytr)
    ours = EnsembleClassifier(_members()[:4], voting="hard", tie_break="lowest").fit(Xtr, ytr)
    np.testing.assert_array_equal(ours.predict(Xte), ref.predict(Xte))
    with pytest.raises(ValueError, match=r"hard voting tied on \d+ of 497 rows.*voting='soft'"):
        EnsembleClassifier(_members()[:4], voting="hard").fit(Xtr, ytr).predict(Xte)  # 4 voters tie 2-2
    assert 0.9 < ours.score(Xte, digits[3]) <= 1.0
    names = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])
    ref = VotingClassifier(_members()[:3], voting="hard").fit(Xtr, names[ytr])  # string labels
    ours = EnsembleClassifier(_members()[:3], voting="hard", tie_break="lowest").fit(Xtr, names[ytr])
    np.testing.assert_array_equal(ours.predict(Xte), ref.predict(Xte))
    with pytest.raises(ValueError, match="predict_proba is not available with voting='hard'"):
        ours.predict_proba(Xte)


def test_prefit_members_estimator_contract_and_errors(digits: tuple[np.ndarray, ...]) -> None:
    Xtr, ytr, Xte, _ = digits
    members = _members()[:3]
    originals = [est for _, est in members]
    ours = EnsembleClassifier(members).fit(Xtr, ytr)
    assert all(not hasattr(e, "classes_") for e in originals)  # fit fits clones, the parameters stay unfitted
    prefit = EnsembleClassifier(ours.estimators_, prefit=True).fit()  # already fitted: used as they are
    torch.testing.assert_close(prefit.predict_proba(Xte), ours.predict_proba(Xte))
    assert prefit.estimators_[0] is ours.estimators_[0]

    params = ours.get_params()
    assert params["voting"] == "soft" and params["prefit"] is False
    copy = clone(ours)  # scikit-learn's clone uses get_params
    assert isinstance(copy, EnsembleClassifier) and not hasattr(copy, "estimators_")
    with pytest.raises(NotFittedError):
        copy.predict(Xte)

    partial = GaussianNB().fit(Xtr[ytr < 9], ytr[ytr < 9])  # never saw class 9
    with pytest.raises(ValueError, match=r"members disagree on the label set: 'lineardiscriminantanalysis' has"):
        EnsembleClassifier([ours.estimators_[0], partial], prefit=True).fit()
    with pytest.raises(NotFittedError, match="member 'gaussiannb' is not fitted"):
        EnsembleClassifier([GaussianNB()], prefit=True).fit()
    with pytest.raises(ValueError, match="soft voting needs predict_proba"):
        EnsembleClassifier([("svm", _NoProba())]).fit(Xtr, ytr)


class _NoProba:
    def get_params(self, deep: bool = True) -> dict[str, object]:
        return {}

    def fit(self, X: np.ndarray, y: np.ndarray) -> _NoProba:
        self.classes_ = np.unique(y)
        return self


# ----- language models --------------------------------------------------------------------------------------
V = 48


@pytest.fixture(scope="module")
def lms() -> list[GPT]:
    return [tiny_gpt(V, block_size=40, seed=s, scale=3.0, pos_scale=10.0) for s in range(3)]


def _manual_mixture(models: list[GPT], idx: torch.Tensor, weights: list[float], mode: str) -> torch.Tensor:
    with torch.no_grad():
        logps = torch.stack([m(idx)[0].log_softmax(-1) for m in models])  # (M, B, T, V)
    w = torch.tensor(weights)[:, None, None, None] / sum(weights)
    if mode == "prob":
        return (w * logps.exp()).sum(0).log()
    return (w * logps).sum(0).log_softmax(-1)


@pytest.mark.parametrize("mode", ["prob", "logprob"])
def test_lm_ensemble_logits_are_the_log_mixture(lms: list[GPT], mode: str) -> None:
    idx = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    ens = LMEnsemble(lms, weights=[1, 2, 3], mode=mode).eval()
    with torch.no_grad():
        logits, loss = ens(idx, idx)
    torch.testing.assert_close(logits, _manual_mixture(lms, idx, [1, 2, 3], mode), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits.exp().sum(-1), torch.ones(2, 12))  # a distribution at every position
    assert loss is not None
    torch.testing.assert_close(loss, nn.functional.cross_entropy(logits.flatten(0, 1), idx.flatten()))
    with torch.no_grad():  # one member: its own distribution
        torch.testing.assert_close(LMEnsemble(lms[:1])(idx)[0], lms[0](idx)[0].log_softmax(-1))


def test_lm_ensemble_through_evaluate(lms: list[GPT], tmp_path: Path) -> None:
    from conftest import write_token_shards

    tokens = np.random.default_rng(0).integers(0, V, 700).astype(np.uint16)
    data = write_token_shards(tmp_path / "data", {"train": [tokens[:100]], "val": [tokens]}, vocab_size=V)
    val = TokenShards(data, "val")
    members = [evaluate(m, val)["loss"] for m in lms]
    ens = evaluate(LMEnsemble(lms), val)  # type: ignore[arg-type]
    assert ens["tokens"] == 699
    assert ens["loss"] <= np.mean(members) + 1e-6  # a mixture is never worse than the mean member (Jensen)
    assert ens["loss"] < min(members)  # and here (independent random models) better than the best


@torch.no_grad()
def _manual_greedy(models: list[GPT], idx: torch.Tensor, n: int, weights: list[float]) -> torch.Tensor:
    for _ in range(n):
        idx = torch.cat([idx, _manual_mixture(models, idx, weights, "prob")[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


def test_lm_ensemble_generates_like_manual_averaging(lms: list[GPT]) -> None:
    ens = LMEnsemble(lms, weights=[3, 1, 1])
    idx = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(1))
    out = ens.generate(idx, max_new_tokens=15)
    assert torch.equal(out, _manual_greedy(lms, idx, 15, [3, 1, 1]))
    assert not torch.equal(out, generate(lms[0], idx, max_new_tokens=15))  # the mixture is not member 0
    # a ragged batch (left padding, one KV cache per member) decodes each prompt as if alone
    ragged = generate(ens, [[1, 2, 3, 4, 5, 6, 7], [9, 8]], max_new_tokens=6)  # type: ignore[arg-type]
    assert ragged[1, 5:].tolist() == generate(ens, [[9, 8]], max_new_tokens=6)[0].tolist()  # type: ignore[arg-type]
    a = ens.generate(idx, max_new_tokens=10, do_sample=True, top_k=5, seed=3)
    assert torch.equal(a, ens.generate(idx, max_new_tokens=10, do_sample=True, top_k=5, seed=3))
    with pytest.raises(ValueError, match="exceeds the context window of 40"):
        ens.generate(idx, max_new_tokens=36)


def test_lm_ensemble_errors(lms: list[GPT], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"different vocabularies \(vocab_size \[48, 50\]\)"):
        LMEnsemble([lms[0], tiny_gpt(50)])
    with pytest.raises(ValueError, match="mode='mean' must be one of prob, logprob"):
        LMEnsemble(lms, mode="mean")
    with pytest.raises(ValueError, match="weights has 2 values for 3 members"):
        LMEnsemble(lms, weights=[1, 2])
    short = LMEnsemble([lms[0], tiny_gpt(V, block_size=16)])
    assert short.config.block_size == 16
    with pytest.raises(ValueError, match="longer than the ensemble's context"):
        short(torch.zeros(1, 20, dtype=torch.long))
    # same size, different tokenizers: refused when loading directories
    a, b = Tokenizer.train_bpe(["the king and the queen"] * 20, 262), Tokenizer.train_bpe(["a b c d e f g"] * 20, 262)
    assert a.vocab_size == b.vocab_size == 262
    tiny_gpt(262).save_pretrained(tmp_path / "a", a)
    tiny_gpt(262).save_pretrained(tmp_path / "b", b)
    with pytest.raises(ValueError, match="have different tokenizers; ensemble members must share one"):
        LMEnsemble.from_pretrained([tmp_path / "a", tmp_path / "b"])


# ----- checkpoint averaging ---------------------------------------------------------------------------------
def _fake_run(root: Path, tok: Tokenizer, seeds: list[int], vocab: int | None = None) -> Path:
    """A run directory with complete checkpoints step-0000010, -20, ... holding different random weights."""
    for i, seed in enumerate(seeds):
        step = root / "checkpoints" / f"step-{(i + 1) * 10:07d}"
        tiny_gpt(vocab or tok.vocab_size, seed=seed).save_pretrained(step, tok)
        (step / "COMPLETE").write_text("{}")
    return root


def test_average_checkpoints_is_the_mean_of_the_weights(tmp_path: Path) -> None:
    tok = Tokenizer.char()
    run = _fake_run(tmp_path / "run", tok, [0, 1, 2])
    dirs = run_checkpoints(run, last=2)
    assert [d.name for d in dirs] == ["step-0000020", "step-0000030"]
    avg = average_checkpoints(dirs)
    sds = [GPT.from_pretrained(d).state_dict() for d in dirs]
    for k, v in avg.state_dict().items():
        torch.testing.assert_close(v, (sds[0][k] + sds[1][k]) / 2)
    assert avg.lm_head.weight is avg.transformer.wte.weight  # still tied
    out = save_average(dirs, tmp_path / "avg")
    torch.testing.assert_close(GPT.from_pretrained(out).state_dict(), avg.state_dict())
    assert Tokenizer.from_pretrained(out).vocab_size == tok.vocab_size

    with pytest.raises(ValueError, match=r"keeps 3 complete checkpoints, fewer than --last 4.*keep_checkpoints=4"):
        run_checkpoints(run, last=4)
    tiny_gpt(tok.vocab_size, n_embd=48).save_pretrained(tmp_path / "wide", tok)
    with pytest.raises(ValueError, match=r"has another shape.*model\.n_embd: 32 -> 48"):
        average_checkpoints([dirs[0], tmp_path / "wide"])
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        save_average(dirs, out)


# ----- the command ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm_dirs(bpe_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three random model directories that share the BPE data's tokenizer."""
    tok = Tokenizer.from_pretrained(bpe_data)
    root = tmp_path_factory.mktemp("members")
    dirs = []
    for seed in range(3):
        tiny_gpt(tok.vocab_size, block_size=32 if seed else 48, seed=seed, scale=2.0).save_pretrained(
            root / f"m{seed}", tok
        )
        dirs.append(root / f"m{seed}")
    return dirs


def test_cli_ensemble_eval(lm_dirs: list[Path], bpe_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["ensemble", "eval", *map(str, lm_dirs), "--data", str(bpe_data), "--max-tokens", "1000"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    val = TokenShards(bpe_data, "val")
    ens = LMEnsemble.from_pretrained(lm_dirs)
    amp = hardware.autocast_dtype("auto", torch.device("cpu"))  # --precision auto: bf16 where it is native
    for row, member in zip(report["members"], ens.gpts, strict=True):  # scored on the ensemble's windows (32)
        expected = evaluate(member, val, max_tokens=1000, autocast_dtype=amp, block_size=32)
        assert row["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    whole = evaluate(ens, val, max_tokens=1000, autocast_dtype=amp)  # type: ignore[arg-type]
    assert report["ensemble"]["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert report["ensemble"]["loss"] <= np.mean([r["loss"] for r in report["members"]])

    assert main([*args, "--mode", "logprob", "--weights", "1", "2", "1"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.strip().splitlines()
    assert lines[0].split() == ["model", "loss", "perplexity", "bits/byte"] and len(lines) == 5
    assert lines[-1].startswith("ensemble (logprob, weights 0.25, 0.5, 0.25)")
    assert "vs best member" in captured.err


def test_cli_ensemble_average_and_user_errors(
    lm_dirs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = Tokenizer.char()
    run = _fake_run(tmp_path / "run", tok, [0, 1, 2])
    assert main(["ensemble", "average", str(run), "--last", "2", "--out", str(tmp_path / "avg")]) == 0
    assert "averaged 2 checkpoints (step-0000020, step-0000030)" in capsys.readouterr().err
    expected = average_checkpoints(run_checkpoints(run, last=2)).state_dict()
    torch.testing.assert_close(GPT.from_pretrained(tmp_path / "avg").state_dict(), expected)
    assert main(["ensemble", "average", str(lm_dirs[1]), str(lm_dirs[2]), "--out", str(tmp_path / "avg2")]) == 0
    capsys.readouterr()

    def user_error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("bigmodel ensemble: error: ")
        return err[0]

    assert "fewer than --last 5" in user_error(["ensemble", "average", str(run), "--last", "5", "--out", "x"])
    assert "--last K takes" in user_error(
        ["ensemble", "average", str(lm_dirs[1]), str(lm_dirs[2]), "--last", "2", "--out", "x"]
    )
    assert "another shape" in user_error(
        ["ensemble", "average", str(lm_dirs[0]), str(lm_dirs[1]), "--out", str(tmp_path / "bad")]
    )
    assert "at least two models" in user_error(["ensemble", "eval", str(lm_dirs[0]), "--data", str(tmp_path)])
    mixed = ["ensemble", "eval", str(lm_dirs[0]), str(run / "checkpoints" / "step-0000010"), "--data", "x"]
    assert "different" in user_error(mixed)


def test_cli_ensemble_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["ensemble", "--help"], ["ensemble", "eval", "--help"], ["ensemble", "average", "--help"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        out = capsys.readouterr().out
        assert "example" in out and "bigmodel ensemble " in out.split("example", 1)[1]
