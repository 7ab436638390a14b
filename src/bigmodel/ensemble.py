"""Ensembles: voting over classifiers, mixtures of language models, and checkpoint averaging.

Reading order:
  soft_vote / hard_vote   the two voting rules, on tensors of member outputs
  ClassifierEnsemble      in-memory torch classifiers (or callables) -> voted predictions (an nn.Module)
  EnsembleClassifier      a scikit-learn-style estimator over scikit-learn-style members (VotingClassifier's API)
  LMEnsemble              GPT members -> one language model whose logits are the log of the mixture, so
                          `evaluation.evaluate` and the generation engine use it as they use a GPT
  average_checkpoints     uniform average of K model directories' weights (the cheap alternative)
  run_ensemble            `bigmodel ensemble eval|average`

Soft voting averages the members' class probabilities (weighted), hard voting counts their predicted
labels (weighted) and refuses ties unless asked to break them. Averaging probabilities (mode "prob") is
a mixture: it is never worse, in log-loss, than the weighted mean of the members' log-losses. Averaging
log-probabilities (mode "logprob") is a renormalised geometric mean, which is sharper.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bigmodel.config import diff_configs
from bigmodel.errors import UserError
from bigmodel.features.base import Estimator, NotFittedError
from bigmodel.models.gpt import GPT, LMOutput
from bigmodel.nn.attention import KVCache
from bigmodel.nn.losses import classification_loss

VOTING = ("soft", "hard")
TIE_BREAKS = ("error", "lowest")
LM_MODES = ("prob", "logprob")
OUTPUTS = ("logits", "probs", "log_probs")


# ----- voting rules -----------------------------------------------------------------------------------------
def member_weights(weights: Sequence[float] | None, n: int) -> torch.Tensor:
    """(n,) float64 weights summing to 1: uniform when None; else finite, >= 0, not all 0, one per member."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    w = torch.as_tensor(list(weights), dtype=torch.float64)
    if w.dim() != 1 or len(w) != n:
        raise ValueError(f"weights has {w.numel()} values for {n} members; give one weight per member")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"weights {w.tolist()} must be finite, >= 0 and not all 0")
    return w / w.sum()


def soft_vote(probs: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """Members' probabilities (M, N, C) -> their weighted mean (N, C)."""
    w = member_weights(weights, probs.shape[0]).to(probs.device, probs.dtype)
    return torch.einsum("m,mnc->nc", w, probs)


def hard_vote(
    labels: torch.Tensor, n_classes: int, weights: Sequence[float] | None = None, tie_break: str = "error"
) -> torch.Tensor:
    """Members' predicted class indices (M, N) -> the (weighted) majority class per row (N,).

    A row where several classes get the top vote is a tie: ValueError (saying how many rows tied) unless
    tie_break="lowest", which takes the lowest class index, as scikit-learn's VotingClassifier does.
    """
    if tie_break not in TIE_BREAKS:
        raise ValueError(f"tie_break={tie_break!r} must be one of {', '.join(TIE_BREAKS)}")
    M, N = labels.shape
    w = member_weights(weights, M).to(labels.device)
    votes = torch.zeros(N, n_classes, dtype=torch.float64, device=labels.device)
    votes.scatter_add_(1, labels.t().long(), w[None, :].expand(N, M).contiguous())  # (N, C)
    top = votes.max(dim=1, keepdim=True).values  # (N, 1)
    tied = (votes == top).sum(dim=1) > 1  # (N,)
    if tie_break == "error" and bool(tied.any()):
        row = int(tied.nonzero()[0])
        classes = (votes[row] == top[row]).nonzero().flatten().tolist()
        raise ValueError(
            f"hard voting tied on {int(tied.sum())} of {N} rows (e.g. row {row}: classes {classes} got equal "
            "votes); use voting='soft', give the members unequal weights, use an odd number of members, or "
            "pass tie_break='lowest' to take the lowest class"
        )
    return votes.argmax(dim=1)  # the first (lowest) class among tied ones


# ----- in-memory torch classifiers --------------------------------------------------------------------------
def _to_probs(out: torch.Tensor, kind: str) -> torch.Tensor:
    out = out.float() if out.dtype in (torch.float16, torch.bfloat16) else out
    if kind == "logits":
        return out.softmax(-1)
    if kind == "log_probs":
        return out.exp()
    return out


class ClassifierEnsemble(nn.Module):
    """Voting over classifiers that map a batch x to (N, C) logits, probabilities or log-probabilities.

    Members are nn.Modules (registered, so `.to()`/`.eval()` reach them) or any callables. `outputs`
    says what members return ("logits", "probs", "log_probs"; one value for all or one per member).
    `forward(x)` returns the log of the soft-voted probabilities (N, C): a classifier's logits that
    `F.cross_entropy` and argmax use as they are. `predict` works for both voting rules; `predict_proba`
    only for soft voting.
    """

    def __init__(
        self,
        members: Sequence[nn.Module | Callable[[Any], torch.Tensor]],
        *,
        voting: str = "soft",
        weights: Sequence[float] | None = None,
        outputs: str | Sequence[str] = "logits",
        tie_break: str = "error",
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if voting not in VOTING:
            raise ValueError(f"voting={voting!r} must be one of {', '.join(VOTING)}")
        if tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break={tie_break!r} must be one of {', '.join(TIE_BREAKS)}")
        kinds = [outputs] * len(members) if isinstance(outputs, str) else list(outputs)
        if len(kinds) != len(members) or any(k not in OUTPUTS for k in kinds):
            raise ValueError(f"outputs={outputs!r}: give one of {', '.join(OUTPUTS)}, or one per member")
        self.member_fns = list(members)
        self.torch_members = nn.ModuleList([m for m in members if isinstance(m, nn.Module)])
        self.voting, self.tie_break, self.outputs = voting, tie_break, kinds
        self.weights = member_weights(weights, len(members))

    def member_probs(self, x: Any) -> torch.Tensor:
        """Every member's class probabilities, stacked: (M, N, C)."""
        probs = [_to_probs(f(x), k) for f, k in zip(self.member_fns, self.outputs, strict=True)]
        shapes = {tuple(p.shape) for p in probs}
        if len(shapes) > 1:
            raise ValueError(
                f"members disagree on the output shape ({', '.join(str(s) for s in sorted(shapes))}); every "
                "member must score the same classes, in the same order"
            )
        return torch.stack(probs)

    def forward(self, x: Any) -> torch.Tensor:
        if self.voting == "hard":
            raise ValueError("a hard-voting ensemble has no probabilities; use predict(), or voting='soft'")
        probs = soft_vote(self.member_probs(x), self.weights.tolist())  # (N, C)
        return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()

    @contextmanager
    def _inference(self) -> Iterator[None]:
        was = [m.training for m in self.torch_members]
        self.torch_members.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in zip(self.torch_members, was, strict=True):
                m.train(mode)

    def predict_proba(self, x: Any) -> torch.Tensor:
        """Soft-voted class probabilities (N, C), members in eval mode, without gradients."""
        if self.voting == "hard":
            raise ValueError("predict_proba is not available with voting='hard'; use voting='soft'")
        with self._inference():
            return soft_vote(self.member_probs(x), self.weights.tolist())

    def predict(self, x: Any) -> torch.Tensor:
        """Predicted class indices (N,)."""
        with self._inference():
            probs = self.member_probs(x)  # (M, N, C)
            if self.voting == "soft":
                return soft_vote(probs, self.weights.tolist()).argmax(-1)
            return hard_vote(probs.argmax(-1), probs.shape[-1], self.weights.tolist(), self.tie_break)


# ----- scikit-learn-style estimator -------------------------------------------------------------------------
def clone_estimator(est: Any) -> Any:
    """An unfitted copy with the same parameters (scikit-learn's `clone` contract, nested estimators too)."""
    if not hasattr(est, "get_params"):
        return copy.deepcopy(est)
    params = {k: _clone_param(v) for k, v in est.get_params(deep=False).items()}
    return type(est)(**params)


def _clone_param(value: Any) -> Any:
    if hasattr(value, "get_params") and not isinstance(value, type):
        return clone_estimator(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_param(v) for v in value)
    return copy.deepcopy(value)


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


class EnsembleClassifier(Estimator):
    """Soft or hard voting over scikit-learn-style classifiers, with scikit-learn's VotingClassifier API.

    `estimators` is a list of estimators or of (name, estimator) pairs: scikit-learn classifiers,
    pipelines (bigmodel's feature estimators included), anything with fit / predict / classes_ (and
    predict_proba for soft voting). `fit(X, y)` fits a clone of each into `estimators_`; with
    prefit=True the given, already fitted members are used as they are and `fit()` only checks them.
    Every member must have the same `classes_`; a hard-voting tie is a ValueError unless
    tie_break="lowest" (scikit-learn's behaviour).

        ens = EnsembleClassifier([LogisticRegression(), GaussianNB(), KNeighborsClassifier()]).fit(X, y)
        ens.predict(X_test), ens.predict_proba(X_test)
    """

    def __init__(
        self,
        estimators: Sequence[Any],
        voting: str = "soft",
        weights: Sequence[float] | None = None,
        tie_break: str = "error",
        prefit: bool = False,
    ) -> None:
        self.estimators = estimators
        self.voting = voting
        self.weights = weights
        self.tie_break = tie_break
        self.prefit = prefit

    def _named(self) -> list[tuple[str, Any]]:
        if not self.estimators:
            raise ValueError("estimators is empty; give at least one classifier")
        named, seen = [], set()
        for i, item in enumerate(self.estimators):
            name, est = item if isinstance(item, tuple) else (f"{type(item).__name__.lower()}", item)
            if name in seen:
                name = f"{name}_{i}"
            seen.add(name)
            named.append((name, est))
        return named

    def fit(self, X: Any = None, y: Any = None) -> EnsembleClassifier:
        if self.voting not in VOTING:
            raise ValueError(f"voting={self.voting!r} must be one of {', '.join(VOTING)}")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break={self.tie_break!r} must be one of {', '.join(TIE_BREAKS)}")
        named = self._named()
        member_weights(self.weights, len(named))  # validate early
        if self.prefit:
            fitted = named
            for name, est in fitted:
                if not hasattr(est, "classes_"):
                    raise NotFittedError(f"member {name!r} is not fitted (no classes_); fit it or use prefit=False")
        else:
            if X is None or y is None:
                raise ValueError("fit(X, y) needs data (or prefit=True for members that are already fitted)")
            fitted = [(name, clone_estimator(est).fit(X, _numpy(y))) for name, est in named]
        if self.voting == "soft":
            missing = [name for name, est in fitted if not hasattr(est, "predict_proba")]
            if missing:
                raise ValueError(f"soft voting needs predict_proba; {', '.join(missing)} has none: use voting='hard'")
        first_name, first = fitted[0]
        classes = _numpy(first.classes_)
        for name, est in fitted[1:]:
            other = _numpy(est.classes_)
            if other.shape != classes.shape or not np.array_equal(other, classes):
                raise ValueError(
                    f"members disagree on the label set: {first_name!r} has classes {classes.tolist()}, "
                    f"{name!r} has {other.tolist()}; fit every member on the same labels"
                )
        self.estimators_ = [est for _, est in fitted]
        self.named_estimators_ = dict(fitted)
        self.classes_ = classes
        return self

    def _member_probas(self, X: Any) -> torch.Tensor:
        """(M, N, C) float64."""
        return torch.stack([torch.from_numpy(_numpy(e.predict_proba(X)).astype(np.float64)) for e in self.estimators_])

    def predict_proba(self, X: Any) -> np.ndarray:
        """Weighted mean of the members' class probabilities (N, C); soft voting only."""
        self._check_fitted("estimators_")
        if self.voting == "hard":
            raise ValueError("predict_proba is not available with voting='hard'; use voting='soft'")
        return soft_vote(self._member_probas(X), self.weights).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Predicted labels (N,), as values of `classes_`."""
        self._check_fitted("estimators_")
        if self.voting == "soft":
            return self.classes_[self.predict_proba(X).argmax(axis=1)]
        position = {label: i for i, label in enumerate(self.classes_.tolist())}
        rows = []
        for name, est in self.named_estimators_.items():
            preds = _numpy(est.predict(X)).tolist()
            unknown = [p for p in preds if p not in position]
            if unknown:
                raise ValueError(f"member {name!r} predicted {unknown[0]!r}, which is not in classes_")
            rows.append([position[p] for p in preds])
        index = np.array(rows, dtype=np.int64)  # (M, N) positions in classes_
        winner = hard_vote(torch.from_numpy(index), len(self.classes_), self.weights, self.tie_break)
        return self.classes_[winner.numpy()]

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of predict(X) against y."""
        return float(np.mean(self.predict(X) == _numpy(y)))


# ----- language models --------------------------------------------------------------------------------------
@dataclass
class LMEnsembleConfig:
    """What the evaluation and generation code read from a model's config."""

    vocab_size: int
    block_size: int  # the shortest member context


class EnsembleCache:
    """One KV cache per member; LMEnsemble hands each member its own."""

    def __init__(self, caches: list[KVCache]) -> None:
        self.caches = caches

    @property
    def pos(self) -> int:
        return self.caches[0].pos


def _tokenizer_identity(model_dir: Path) -> str | None:
    """The tokenizer's vocabulary, merges and special tokens as a string to compare (None: no tokenizer)."""
    if not ((model_dir / "tokenizer.json").is_file() or (model_dir / "vocab.json").is_file()):
        return None
    from bigmodel.data.tokenizer import Tokenizer

    data = json.loads(Tokenizer.from_pretrained(model_dir).to_str())
    return json.dumps([data.get("model"), [t.get("content") for t in data.get("added_tokens", [])]])


def check_same_tokenizers(model_dirs: Sequence[Path]) -> None:
    """ValueError when two model directories carry different tokenizers (same size is not enough)."""
    ids = [(d, _tokenizer_identity(d)) for d in model_dirs]
    known = [(d, i) for d, i in ids if i is not None]
    for d, i in known[1:]:
        if i != known[0][1]:
            raise UserError(
                f"{d} and {known[0][0]} have different tokenizers; ensemble members must share one "
                "(train them on data prepared with the same --tokenizer)"
            )


class LMEnsemble(nn.Module):
    """Several GPTs as one language model: next-token distributions mixed with weights.

    mode "prob": p(x) = sum_i w_i p_i(x) (a mixture); mode "logprob": p(x) proportional to
    exp(sum_i w_i log p_i(x)) (renormalised). `forward` has GPT's signature and returns log p as the
    logits (B, T, V) (plus the unsmoothed loss when targets are given), so `bigmodel.evaluation.evaluate`
    scores it and `generate` / the engine decode from it, with one KV cache per member.
    """

    def __init__(self, members: Sequence[GPT], weights: Sequence[float] | None = None, mode: str = "prob") -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if not all(isinstance(m, GPT) for m in members):
            raise ValueError("LMEnsemble members must be bigmodel GPT models (load directories with from_pretrained)")
        if mode not in LM_MODES:
            raise ValueError(f"mode={mode!r} must be one of {', '.join(LM_MODES)}")
        vocab = [m.config.vocab_size for m in members]
        if len(set(vocab)) > 1:
            raise ValueError(
                f"members have different vocabularies (vocab_size {vocab}); an ensemble averages next-token "
                "distributions, so every member must use the same tokenizer"
            )
        self.members = nn.ModuleList(members)
        self.mode = mode
        self.weights = member_weights(weights, len(members))
        self.config = LMEnsembleConfig(
            vocab_size=int(vocab[0] or 0), block_size=min(m.config.block_size for m in members)
        )
        self.generation_config = copy.deepcopy(members[0].generation_config)  # what generate starts from
        self.model_dirs: list[Path] = []

    @classmethod
    def from_pretrained(
        cls, paths: Sequence[str | Path], weights: Sequence[float] | None = None, mode: str = "prob"
    ) -> LMEnsemble:
        """Members from model or run directories (a run's final/, else its newest checkpoint)."""
        from bigmodel.evaluation import resolve_model_dir

        dirs = [resolve_model_dir(p) for p in paths]
        check_same_tokenizers(dirs)
        ensemble = cls([GPT.from_pretrained(d) for d in dirs], weights, mode)
        ensemble.model_dirs = dirs
        return ensemble

    @property
    def gpts(self) -> list[GPT]:
        """The members, typed."""
        return [m for m in self.members if isinstance(m, GPT)]

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> EnsembleCache:
        return EnsembleCache([m.new_cache(batch, max_len or self.config.block_size, dtype) for m in self.gpts])

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: EnsembleCache | None = None,
        last_only: bool = False,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> LMOutput:
        """idx (B, T) -> log of the mixed next-token distribution (B, T, V) (or (B, 1, V)), and the loss."""
        if idx.shape[1] + (cache.pos if cache is not None else 0) > self.config.block_size:
            raise ValueError(
                f"sequence of {idx.shape[1]} tokens is longer than the ensemble's context "
                f"(block_size={self.config.block_size}, its shortest member's)"
            )
        mixed: torch.Tensor | None = None
        for i, member in enumerate(self.members):
            member_cache = cache.caches[i] if cache is not None else None
            logits, _ = member(
                idx, cache=member_cache, last_only=last_only, position_ids=position_ids, attn_mask=attn_mask
            )
            logp = logits.float().log_softmax(-1)  # (B, T, V)
            w = float(self.weights[i])
            if self.mode == "prob":  # log sum_i w_i p_i, accumulated stably in log space
                term = logp + math.log(w) if w > 0 else torch.full_like(logp, -math.inf)
                mixed = term if mixed is None else torch.logaddexp(mixed, term)
            else:  # sum_i w_i log p_i, renormalised below
                mixed = w * logp if mixed is None else mixed + w * logp
        assert mixed is not None
        if self.mode == "logprob":
            mixed = mixed - mixed.logsumexp(-1, keepdim=True)
        loss = classification_loss(mixed, targets, ignore_index=-1) if targets is not None else None
        return LMOutput(mixed, loss)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Continue `input_ids` from the mixture; keywords as `GPT.generate` (bigmodel.generation.generate)."""
        from bigmodel.generation import generate

        return generate(self, input_ids, **kwargs)  # type: ignore[arg-type]  # the engine needs GPT's interface only


# ----- checkpoint averaging ---------------------------------------------------------------------------------
def run_checkpoints(run: str | Path, last: int | None = None) -> list[Path]:
    """The newest `last` complete checkpoints of a run (all of them when None), oldest first."""
    from bigmodel.train.checkpoint import complete_checkpoints

    found = complete_checkpoints(Path(run) / "checkpoints")
    if not found:
        raise UserError(f"{run} has no complete checkpoints in {Path(run) / 'checkpoints'}")
    if last is not None and len(found) < last:
        raise UserError(
            f"{run} keeps {len(found)} complete checkpoints, fewer than --last {last}; train with "
            f"--set train.keep_checkpoints={last} (or more) to average the last {last}"
        )
    return found[-last:] if last is not None else found


def _shape_fields(model: GPT) -> dict[str, Any]:
    c = model.config
    return {
        "vocab": c.vocab_size,
        "block": c.block_size,
        "layers": c.n_layer,
        "heads": c.n_head,
        "width": c.n_embd,
        "bias": c.bias,
    }  # dropout may differ: it does not change the weights


def average_checkpoints(paths: Sequence[str | Path]) -> GPT:
    """A GPT whose weights are the uniform average of the model directories' weights (fp64 accumulation).

    Checkpoint folders (RUN/checkpoints/step-*) are model directories, so the last K of a run average
    directly (see `run_checkpoints`). Every directory must hold the same architecture.
    """
    if not paths:
        raise ValueError("average_checkpoints needs at least one model directory")
    base = GPT.from_pretrained(paths[0])
    total = {k: v.double() for k, v in base.state_dict().items()}
    for path in paths[1:]:
        model = GPT.from_pretrained(path)
        if _shape_fields(model) != _shape_fields(base):
            diff = "; ".join(diff_configs(base.config, model.config, "model"))
            raise UserError(f"{path} has another shape than {paths[0]} ({diff}); only same-shape models average")
        for k, v in model.state_dict().items():
            total[k] += v.double()
    base.load_state_dict({k: (v / len(paths)).to(base.state_dict()[k].dtype) for k, v in total.items()})
    return base


def save_average(paths: Sequence[str | Path], out: str | Path) -> Path:
    """average_checkpoints(paths) written as a model directory at `out` (with the members' tokenizer)."""
    from bigmodel.data.tokenizer import Tokenizer

    out, dirs = Path(out), [Path(p) for p in paths]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out {out} exists and is not an empty folder; choose another --out")
    check_same_tokenizers(dirs)
    model = average_checkpoints(dirs)
    with_tok = [d for d in dirs if (d / "tokenizer.json").is_file() or (d / "vocab.json").is_file()]
    model.save_pretrained(out, Tokenizer.from_pretrained(with_tok[0]) if with_tok else None)
    return out


# ----- the command ------------------------------------------------------------------------------------------
def _table(rows: list[tuple[str, dict[str, float | int]]]) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"{'model':<{width}}  {'loss':>8}  {'perplexity':>10}  {'bits/byte':>9}"]
    for name, r in rows:
        lines.append(f"{name:<{width}}  {r['loss']:>8.4f}  {r['perplexity']:>10.3f}  {r['bits_per_byte']:>9.4f}")
    return "\n".join(lines)


def run_ensemble(args: Any) -> int:
    if args.action == "average":
        return _run_average(args)
    from bigmodel import hardware
    from bigmodel.data.loader import TokenShards
    from bigmodel.evaluation import check_same_tokenizer, evaluate

    if len(args.models) < 2:
        raise UserError("ensemble eval needs at least two models (MODEL_OR_RUN MODEL_OR_RUN ...)")
    ensemble = LMEnsemble.from_pretrained(args.models, args.weights, args.mode)
    shards = TokenShards(args.data, args.split)
    for d in ensemble.model_dirs:
        check_same_tokenizer(d, Path(args.data))
    device = hardware.default_device()
    ensemble.to(device)
    amp = hardware.autocast_dtype(args.precision, device)
    block = ensemble.config.block_size
    rows: list[tuple[str, dict[str, float | int]]] = []
    for d, member in zip(ensemble.model_dirs, ensemble.gpts, strict=True):
        rows.append(
            (str(d), evaluate(member, shards, max_tokens=args.max_tokens, autocast_dtype=amp, block_size=block))
        )
    weights = ", ".join(f"{w:.3g}" for w in ensemble.weights.tolist())
    # evaluate() needs only GPT's forward and config.block_size, which LMEnsemble has
    scores = evaluate(ensemble, shards, max_tokens=args.max_tokens, autocast_dtype=amp)  # type: ignore[arg-type]
    rows.append((f"ensemble ({args.mode}, weights {weights})", scores))
    if args.json:
        print(json.dumps({"members": [{"model": n, **r} for n, r in rows[:-1]], "ensemble": rows[-1][1]}))
    else:
        print(_table(rows))
    best = min(r["loss"] for _, r in rows[:-1])
    gain = best - rows[-1][1]["loss"]
    print(
        f"ensemble loss {rows[-1][1]['loss']:.4f} vs best member {best:.4f} ({gain:+.4f} nats/token)", file=sys.stderr
    )
    return 0


def _run_average(args: Any) -> int:
    from bigmodel.evaluation import resolve_model_dir

    sources = [Path(p) for p in args.sources]
    if len(sources) == 1 and (sources[0] / "checkpoints").is_dir():
        dirs = run_checkpoints(sources[0], args.last)
    elif args.last is not None:
        raise UserError("--last K takes the last K checkpoints of one run directory; list model directories without it")
    elif len(sources) < 2:
        raise UserError(f"{sources[0]} is not a run with checkpoints/; give a run, or two or more model directories")
    else:
        dirs = [resolve_model_dir(p) for p in sources]
    save_average(dirs, args.out)
    print(f"averaged {len(dirs)} checkpoints ({', '.join(d.name for d in dirs)}) -> {args.out}", file=sys.stderr)
    return 0
