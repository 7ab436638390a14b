"""Generalisation tools, measured: each technique against the plain baseline, trained by the one loop.

| task          | model (plain baseline)                       | test split (never seen in training or selection) |
| ------------- | -------------------------------------------- | ------------------------------------------------- |
| digits        | mlp, 64 hidden, 600 steps                    | the built-in stratified 20% hold-out (359)        |
| breast-cancer | mlp, 64 hidden, 600 steps                    | the built-in stratified 20% hold-out (113)        |
| genre         | encoder classifier, 1 layer x 64, 128 chars  | the 8 held-out plays (3,865 passages)             |
| lm            | GPT, 2 layers x 64, char vocabulary          | the prepared val split of Shakespeare             |
| digits-wide   | mlp, 512 hidden, 2000 steps (label smoothing only) | as digits                                   |
| genre-long    | the genre encoder, 1500 steps (label smoothing only) | as genre                                  |

Techniques on the classifiers: decoupled weight decay, explicit L2 and L1 penalties, max-norm, dropout,
label smoothing (0.05 and 0.1), early stopping (the model of the best validation loss, RUN/best/), and
soft-voting ensembles of 5 members beside their best member (the one with the best validation accuracy),
built three ways: "seeds" (the baseline with 5 seeds), "bagged" (the baseline, each member trained on a
bootstrap resample of the training split: `train.bootstrap=true`; digits and breast cancer) and "varied"
(5 different architectures: VARIED_MEMBERS). On the language model: label smoothing and the uniform average
of the run's last 5 checkpoints. digits-wide and genre-long compare label smoothing with baselines that are
over-confident: a wide MLP trained far past fitting its data, and the genre encoder trained 5 x longer.
The baseline has no regularisation at all (no weight decay, no dropout). Every setting is one `--set`-style
override of the baseline, at a common default value, not tuned here; max-norm's limit sits near the median
row norm of the baseline's trained matrices (mlp 1, encoder 0.25), since a limit above the weights' norms
does nothing.

The loop's validation split ("val") is a part carved out of the training data (classifiers: a stratified
20% of the arrays' training part; genre: the first training play of each genre, in file-name order). Only
early stopping and the choice of an ensemble's best member look at it. The test metric and the expected
calibration error (ECE, 15 bins) are computed here, from the saved model directory's probabilities on the
test split. Every cell is the mean ± sample standard deviation over `n` training seeds (ensembles: over `n`
disjoint sets of 5 seeds).

Run: `python benchmarks/generalization.py` (about 20 minutes on 2 cores, 2 runs at a time: 31 minutes of runs),
`--quick` for a smoke run (a few minutes), `--tasks digits lm` to choose, `--jobs 1` for one run at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import torch

from bigmodel.calibration import expected_calibration_error
from bigmodel.config import resolve_config
from bigmodel.data.arrays import holdout_split, load_arrays
from bigmodel.data.loader import TokenShards, eval_batches
from bigmodel.data.tokenizer import Tokenizer
from bigmodel.ensemble import average_checkpoints, run_checkpoints, soft_vote
from bigmodel.evaluation import evaluate
from bigmodel.models import load_model
from bigmodel.models.gpt import GPT
from bigmodel.train.loop import TrainResult, train

ENSEMBLE_SIZE = 5
ECE_BINS = 15
QUIET = ["train.spike_factor=0", "train.log_every=50"]  # no loss-spike warnings on tiny, noisy data sets

# ----- what is compared -------------------------------------------------------------------------------------


@dataclass
class TaskSpec:
    """A classification task: its preset, the plain baseline's overrides, and how many runs it gets."""

    name: str
    preset: str
    base: list[str]  # the plain baseline: no weight decay, no dropout
    steps: int
    quick_steps: int
    eval_every: int  # early stopping's periodic validation
    ensembles: int  # disjoint 5-member ensembles per recipe in a full run
    max_norm: float  # near the median row norm of the baseline's trained matrices, so that the limit binds
    task: str | None = None
    data: str = ""  # the data set ("" = the task's name)
    techniques: tuple[str, ...] = ()  # the technique rows to run ("" = all of classifier_techniques)
    recipes: tuple[str, ...] = ("seeds", "varied")  # the ensembles to build (ENSEMBLE_RECIPES)

    @property
    def dataset(self) -> str:
        return self.data or self.name


MLP_BASE = ["model.hidden=64", "train.weight_decay=0"]
ENCODER_BASE = [
    *("model.n_layer=1", "model.n_embd=64", "model.n_head=2", "model.d_ff=128", "model.block_size=128"),
    *("model.dropout=0", "train.weight_decay=0", "train.lr=3e-3"),
]
SMOOTHING = ("label smoothing 0.05", "label smoothing 0.1")


def mlp_task(name: str) -> TaskSpec:
    """digits and breast cancer: the same MLP baseline, budget and ensembles."""
    return TaskSpec(
        name=name,
        preset="mlp",
        base=MLP_BASE,
        steps=600,
        quick_steps=300,
        eval_every=20,
        ensembles=5,
        max_norm=1.0,
        recipes=("seeds", "bagged", "varied"),
    )


CLASSIFIERS: dict[str, TaskSpec] = {
    "digits": mlp_task("digits"),
    "breast-cancer": mlp_task("breast-cancer"),
    "genre": TaskSpec(
        name="genre",
        preset="encoder",
        base=ENCODER_BASE,
        steps=300,
        quick_steps=100,
        eval_every=25,
        ensembles=2,  # a genre run costs ~10 x a digits run: two ensembles per recipe keep within 20 minutes
        max_norm=0.25,
        task="classify",
    ),
    # Label smoothing where the baseline is over-confident: a wide MLP (512 hidden units) trained far past
    # fitting its training set (2000 steps of 64: about 110 epochs of the 1,149 training digits).
    "digits-wide": TaskSpec(
        name="digits-wide",
        preset="mlp",
        base=["model.hidden=512", "train.weight_decay=0"],
        steps=2000,
        quick_steps=600,
        eval_every=0,
        ensembles=0,
        max_norm=0.0,
        data="digits",
        techniques=("baseline", *SMOOTHING),
        recipes=(),
    ),
    # ... and the genre encoder trained 5 x longer (1500 steps of 32: about 4 epochs of the 11,619 training
    # passages), which grows more confident on the unseen plays without growing more accurate
    "genre-long": TaskSpec(
        name="genre-long",
        preset="encoder",
        base=ENCODER_BASE,
        steps=1500,
        quick_steps=300,
        eval_every=0,
        ensembles=0,
        max_norm=0.0,
        task="classify",
        data="genre",
        techniques=("baseline", *SMOOTHING),
        recipes=(),
    ),
}


# Technique name -> overrides on top of the baseline. "early stopping" evaluates RUN/best/, the rest RUN/final/.
def classifier_techniques(spec: TaskSpec) -> dict[str, list[str]]:
    every = {
        "baseline": [],
        "weight decay 0.1": ["train.weight_decay=0.1"],
        "L2 1e-3": ["train.l2=1e-3"],
        "L1 1e-4": ["train.l1=1e-4"],
        f"max-norm {spec.max_norm:g}": [f"train.max_norm={spec.max_norm}"],
        "dropout 0.2": ["model.dropout=0.2"],
        "label smoothing 0.05": ["train.label_smoothing=0.05"],
        "label smoothing 0.1": ["train.label_smoothing=0.1"],
        "early stopping": ["train.early_stopping_patience=5", f"train.eval_every={spec.eval_every}"],
    }
    return {k: v for k, v in every.items() if not spec.techniques or k in spec.techniques}


# Ensembles of ENSEMBLE_SIZE members, each recipe a list of the members' overrides on top of the baseline.
# Member i of the k-th ensemble trains with seed member_seeds(k)[i]; "seeds" members are the baseline runs.
VARIED_MEMBERS: dict[str, list[list[str]]] = {
    # the mlp's connection patterns (nn/connections.py) and widths, each with dropout
    "mlp": [
        ["model.hidden=256", "model.dropout=0.3"],
        ["model.hidden=256", "model.n_hidden=2", "model.dropout=0.3"],
        ["model.connection=second-order", "model.rank=4", "model.hidden=128", "model.dropout=0.3"],
        ["model.connection=sparse", "model.hidden=512", "model.dropout=0.3"],
        ["model.connection=interactive", "model.hidden=256", "model.dropout=0.3"],
    ],
    # the encoder's width, depth and context, regularised in different ways
    "encoder": [
        [],
        ["model.dropout=0.1", "train.weight_decay=0.1"],
        ["model.n_embd=96", "model.n_head=3", "model.d_ff=192"],
        ["model.n_layer=2"],
        ["train.l1=1e-4", "model.block_size=96"],
    ],
}
RECIPE_NOTES = {
    "seeds": "the baseline with 5 seeds",
    "bagged": "the baseline on 5 bootstrap resamples of train (train.bootstrap=true)",
    "varied mlp": "dense 256, 2 x 256, second-order r4 128, sparse 512, interactive 256, dropout 0.3",
    "varied encoder": "baseline, dropout + decay, 96 wide, 2 layers, L1 + 96 chars",
}


def recipe_members(recipe: str, preset: str) -> list[tuple[str, list[str]]]:
    """(run label, overrides) of a recipe's ENSEMBLE_SIZE members; equal labels share runs (seeds = baseline)."""
    if recipe == "seeds":
        return [("baseline", [])] * ENSEMBLE_SIZE
    if recipe == "bagged":
        return [("bagged member", ["train.bootstrap=true"])] * ENSEMBLE_SIZE
    if recipe == "varied":
        return [(f"varied member {i + 1}", sets) for i, sets in enumerate(VARIED_MEMBERS[preset])]
    raise ValueError(f"unknown ensemble recipe {recipe!r}")


def ensemble_name(recipe: str) -> str:
    return f"ensemble of {ENSEMBLE_SIZE} {recipe} (soft vote)"


def best_name(recipe: str) -> str:
    return f"best of the {ENSEMBLE_SIZE} {recipe}"


# The language model: a tiny GPT on the char-level Shakespeare; label smoothing, and the average of the
# baseline's last LM_AVERAGE checkpoints.
LM_STEPS, LM_QUICK_STEPS, LM_AVERAGE = 300, 100, 5
LM_AVERAGED = f"average of last {LM_AVERAGE} checkpoints"
LM_TRAINED = ("baseline", *SMOOTHING)  # the runs; the baseline's also gives the checkpoint average
LM_TECHNIQUES = (*LM_TRAINED, LM_AVERAGED)
LM_BASE = [
    "model.block_size=64",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=64",
    "model.dropout=0",
    "train.weight_decay=0",
    "train.lr=3e-3",
    "train.warmup_steps=20",
    "train.batch_tokens=1024",
    "train.micro_batch=16",
    "train.eval_every=0",
    "train.keep_checkpoints=5",
]
LM_EVAL_TOKENS = 32_768  # the same val windows for every LM variant (loss, bits per byte and token ECE)


# ----- statistics and the table (pure functions, checked by tests/test_benchmark_generalization.py) ---------


@dataclass
class Row:
    """One line of the table: a technique's test metric, negative log-likelihood and ECE over repeats."""

    task: str
    technique: str
    metric: str
    higher_is_better: bool
    values: list[float]
    eces: list[float] = field(default_factory=list)
    nlls: list[float] = field(default_factory=list)  # mean -log p(true label) (lm: nats per token)
    note: str = ""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def clearly_different(a: Sequence[float], b: Sequence[float]) -> bool:
    """Whether the means of a and b differ by more than 2 standard errors of the difference (Welch's se).

    With one value on either side there is no spread to judge by: False.
    """
    if len(a) < 2 or len(b) < 2:
        return False
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b))
    if se > 0:
        return abs(ma - mb) > 2 * se
    return not math.isclose(ma, mb, rel_tol=1e-9, abs_tol=1e-12)  # no spread: only a real gap (not rounding)


def _pm(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "–"
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def format_table(rows: Sequence[Row]) -> str:
    """Markdown table: task, technique, metric, mean ± std, change against the task's baseline, NLL, ECE, n."""
    baseline = {r.task: r for r in rows if r.technique == "baseline"}
    lines = [
        "| task | technique | test metric | mean ± std | vs baseline | NLL mean ± std | ECE mean ± std | n | note |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        base = baseline.get(r.task)
        delta = ""
        if base is not None and r is not base:
            d = mean_std(r.values)[0] - mean_std(base.values)[0]
            better = d > 0 if r.higher_is_better else d < 0
            mark = (" (better)" if better else " (worse)") if clearly_different(r.values, base.values) else ""
            delta = f"{d:+.4f}{mark}"
        lines.append(
            f"| {r.task} | {r.technique} | {r.metric} | {_pm(r.values)} | {delta} | {_pm(r.nlls)} | {_pm(r.eces)} | "
            f"{len(r.values)} | {r.note} |"
        )
    return "\n".join(lines)


def _find(rows: Sequence[Row], task: str, technique: str) -> Row | None:
    return next((r for r in rows if r.task == task and r.technique == technique), None)


def compare(
    rows: Sequence[Row], technique: str, reference: str, column: str, higher_is_better: bool
) -> tuple[list[str], list[str]]:
    """Per task, `technique` against `reference` on the mean of a column ("values", "nlls" or "eces").

    Returns (tasks where it is better, tasks where it is not), each item "task (reference -> technique,
    clear | within noise | n = 1)"; "clear" means the means differ by more than 2 standard errors.
    """
    better: list[str] = []
    not_better: list[str] = []
    for task in dict.fromkeys(r.task for r in rows):
        tech, ref = _find(rows, task, technique), _find(rows, task, reference)
        if tech is None or ref is None or not getattr(tech, column) or not getattr(ref, column):
            continue
        t, r = getattr(tech, column), getattr(ref, column)
        mt, mr = mean_std(t)[0], mean_std(r)[0]
        if min(len(t), len(r)) < 2:
            how = "n = 1"
        else:
            how = "clear" if clearly_different(t, r) else "within noise"
        (better if (mt > mr if higher_is_better else mt < mr) else not_better).append(
            f"{task} ({mr:.4f} -> {mt:.4f}, {how})"
        )
    return better, not_better


def ensemble_verdict(rows: Sequence[Row], recipe: str, need: int = 2) -> str:
    """The goal: a soft-voting ensemble beats its best member (mean test accuracy) on at least `need` tasks."""
    won, lost = compare(rows, ensemble_name(recipe), best_name(recipe), "values", True)
    state = "met" if len(won) >= need else "NOT met"
    return (
        f"{recipe} ensemble vs its best member, test accuracy: higher on {', '.join(won) or 'no task'}; "
        f"not higher on {', '.join(lost) or 'no task'} -> goal (at least {need} tasks): {state}"
    )


def ensemble_nll_line(rows: Sequence[Row], recipe: str) -> str:
    """The same comparison on the test negative log-likelihood (no goal attached: information only)."""
    won, lost = compare(rows, ensemble_name(recipe), best_name(recipe), "nlls", False)
    return (
        f"{recipe} ensemble vs its best member, test NLL: lower on {', '.join(won) or 'no task'}; "
        f"not lower on {', '.join(lost) or 'no task'}"
    )


def smoothing_verdict(rows: Sequence[Row], technique: str = "label smoothing 0.1", need: int = 1) -> str:
    """The goal: label smoothing lowers the mean ECE against the baseline on at least `need` tasks."""
    lower, higher = compare(rows, technique, "baseline", "eces", False)
    state = "met" if len(lower) >= need else "NOT met"
    return (
        f"{technique} vs baseline, ECE: lower on {', '.join(lower) or 'no task'}; "
        f"not lower on {', '.join(higher) or 'no task'} -> goal (at least {need} task): {state}"
    )


def effects_summary(rows: Sequence[Row]) -> list[str]:
    """Per task: the techniques clearly better / worse than the baseline on the test metric, NLL and ECE."""
    out = []
    for task in dict.fromkeys(r.task for r in rows):
        base = _find(rows, task, "baseline")
        if base is None:
            continue
        parts = []
        for column, name, higher_is_better in (
            ("values", base.metric, base.higher_is_better),
            ("nlls", "NLL", False),
            ("eces", "ECE", False),
        ):
            better: list[str] = []
            worse: list[str] = []
            for r in rows:
                if r.task != task or r is base or r.technique.startswith("best of"):
                    continue
                mine, theirs = getattr(r, column), getattr(base, column)
                if clearly_different(mine, theirs):
                    d = mean_std(mine)[0] - mean_std(theirs)[0]
                    (better if (d > 0) == higher_is_better else worse).append(r.technique)
            parts.append(f"{name} clearly better: {', '.join(better) or 'none'}; worse: {', '.join(worse) or 'none'}")
        out.append(f"{task} against the baseline: " + " | ".join(parts))
    return out


# ----- data: the loop's train + val folders, and the test split ---------------------------------------------


@dataclass
class Split:
    """A classification task's data: the folder the loop trains on (train + carved val), and the test split."""

    data: Path
    test_inputs: np.ndarray | list[str]  # feature rows (N, ...) or passages
    test_labels: list[str]  # class names, matched against the saved model's `labels`


def array_split(name: str, root: Path) -> Split:
    """Built-in arrays: train = the arrays' training part minus a stratified 20% (the loop's val); test = the
    built-in hold-out. Written as a folder of .npy files, which the classify task reads as it is."""
    d = load_arrays(name)
    assert d.y_train is not None and d.y_val is not None
    fit, val = holdout_split(len(d.x_train), d.y_train)
    folder = root / "data" / name
    folder.mkdir(parents=True)
    for split, idx in (("train", fit), ("val", val)):
        np.save(folder / f"{split}.npy", d.x_train[idx])
        np.save(folder / f"{split}_labels.npy", d.y_train[idx])
    return Split(folder, d.x_val, [str(int(y)) for y in d.y_val])


def one_line(text: str) -> str:
    """A passage as one .tsv field: its lines joined by ' / ' (as verse is quoted inline), blank lines dropped."""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip())


def genre_split(root: Path) -> Split:
    """genre: test = the 8 held-out plays (as `genre` holds them out); the loop's val = the first remaining
    play of each genre in file-name order; train = the other 25 plays.

    The classify task reads text as `text<TAB>label` .tsv files, one passage per line, so line breaks are
    written as ' / ' in every split alike."""
    from bigmodel.corpora import iter_documents
    from bigmodel.data.genre import FOLIO, GENRES, held_out_plays, passages

    held = set(held_out_plays())
    val_plays = {sorted(p for p, g in FOLIO.items() if g == genre and p not in held)[0] for genre in GENRES}
    folder = root / "data" / "genre"
    folder.mkdir(parents=True)
    test_inputs, test_labels = [], []
    with open(folder / "train.tsv", "w", encoding="utf-8") as tr, open(folder / "val.tsv", "w", encoding="utf-8") as va:
        for name, raw in iter_documents("shakespeare"):
            play = name.rsplit("/", 1)[-1].removesuffix(".txt")
            if play not in FOLIO:
                continue
            texts = [one_line(t) for t in passages(raw.decode("utf-8", errors="replace"))]
            if play in held:
                test_inputs += texts
                test_labels += [FOLIO[play]] * len(texts)
            else:
                (va if play in val_plays else tr).writelines(f"{t}\t{FOLIO[play]}\n" for t in texts)
    return Split(folder, test_inputs, test_labels)


# ----- one run through the loop, scored on the test split ---------------------------------------------------


def run_loop(preset: str, data: str | Path, out: Path, sets: list[str], task: str | None = None) -> TrainResult:
    """One run of `bigmodel train` (the real loop) into `out`, its log lines kept off the benchmark's output."""
    config = resolve_config(preset, None, sets, task=task)
    with contextlib.redirect_stderr(io.StringIO()):
        return train(config, data, out, progress=False)


@torch.no_grad()
def probabilities_on_test(model_dir: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """A saved classifier's probabilities (N, C) on the test split, and the test labels as its class ids (N,)."""
    model = load_model(model_dir)
    model.eval()
    names: list[str] = list(model.labels)  # type: ignore[arg-type]
    y = np.array([names.index(label) for label in split.test_labels])
    if isinstance(split.test_inputs, np.ndarray):
        x = torch.from_numpy(split.test_inputs).flatten(1)  # (N, m) raw features: the model standardises them
        logits = model(features=x)[0]  # (N, C)
    else:  # passages: the model's tokenizer, cut to its context, padded with its pad id (as the task does)
        tok = Tokenizer.from_pretrained(model_dir)
        block, pad = int(model.config.block_size), int(model.pad_id)  # type: ignore[union-attr, arg-type]
        chunks = []
        for start in range(0, len(split.test_inputs), 256):
            ids = [torch.tensor(t[:block]) for t in tok.encode_batch(split.test_inputs[start : start + 256])]
            batch = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad)  # (B, T)
            chunks.append(model(input_ids=batch)[0])  # (B, C)
        logits = torch.cat(chunks)
    return logits.double().softmax(-1).numpy(), y


@dataclass
class Outcome:
    """A classifier run: test probabilities, accuracy and ECE; how long it trained; its validation scores."""

    probs: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,)
    accuracy: float
    ece: float
    nll: float
    steps: int = 0
    val_accuracy: float = math.nan  # the loop's final evaluation on the carved validation split
    val_loss: float = math.nan


def score(probs: np.ndarray, labels: np.ndarray) -> Outcome:
    """Accuracy, ECE and negative log-likelihood of test probabilities (N, C) against labels (N,)."""
    accuracy = float((probs.argmax(1) == labels).mean())
    nll = float(-np.log(np.maximum(probs[np.arange(len(labels)), labels], np.finfo(np.float64).tiny)).mean())
    return Outcome(probs, labels, accuracy, expected_calibration_error(probs, labels, ECE_BINS), nll)


@dataclass(frozen=True)
class ClassifierJob:
    spec: TaskSpec
    split: Split
    technique: str  # a technique of classifier_techniques, or an ensemble member's label (recipe_members)
    seed: int
    steps: int
    sets: tuple[str, ...]  # the technique's (or member's) overrides of the baseline


def run_classifier(job: ClassifierJob, root: Path) -> Outcome:
    spec = job.spec
    sets = [*spec.base, *QUIET, f"train.max_steps={job.steps}", f"train.seed={job.seed}"]
    sets += ["train.checkpoint_every=0", "train.eval_every=0", *job.sets]
    out = root / "runs" / spec.name / f"{job.technique.replace(' ', '-')}-{job.seed}"
    t = time.time()
    result = run_loop(spec.preset, job.split.data, out, sets, spec.task)
    selected = out / ("best" if job.technique == "early stopping" else "final")
    outcome = score(*probabilities_on_test(selected, job.split))
    assert result.val is not None
    outcome.steps, outcome.val_accuracy, outcome.val_loss = result.steps, result.val["accuracy"], result.val["loss"]
    _progress(
        f"{spec.name}: {job.technique}, seed {job.seed}: test accuracy {outcome.accuracy:.4f}, ECE {outcome.ece:.4f}, "
        f"{result.steps} steps ({result.stop_reason}), {time.time() - t:.0f} s"
    )
    return outcome


# ----- the language model: label smoothing and checkpoint averaging -----------------------------------------


@dataclass
class LMScore:
    loss: float  # nats per token
    bits_per_byte: float
    ece: float  # top-1 next-token calibration


@torch.no_grad()
def lm_score(model: GPT, shards: TokenShards) -> LMScore:
    """Loss and bits per byte (`bigmodel eval`'s numbers) and the next-token ECE, on the same val windows."""
    scores = evaluate(model, shards, max_tokens=LM_EVAL_TOKENS)
    model.eval()
    probs, labels = [], []
    for x, y in eval_batches(shards, model.config.block_size, 16, LM_EVAL_TOKENS):
        logits, _ = model(x)  # (B, T, V)
        probs.append(logits.float().softmax(-1).flatten(0, 1))  # (B*T, V)
        labels.append(y.flatten())
    ece = expected_calibration_error(torch.cat(probs), torch.cat(labels), ECE_BINS)
    return LMScore(float(scores["loss"]), float(scores["bits_per_byte"]), ece)


@dataclass(frozen=True)
class LMJob:
    data: Path
    technique: str  # "baseline" (also scores the average of its last checkpoints) | "label smoothing X"
    seed: int
    steps: int


def run_lm(job: LMJob, root: Path) -> dict[str, LMScore]:
    every = max(1, job.steps // 15)  # the last LM_AVERAGE checkpoints span the last third of the schedule
    sets = [*LM_BASE, *QUIET, f"train.max_steps={job.steps}", f"train.seed={job.seed}"]
    if job.technique == "baseline":
        sets.append(f"train.checkpoint_every={every}")
    else:
        sets += ["train.checkpoint_every=0", f"train.label_smoothing={job.technique.split()[-1]}"]
    out = root / "runs" / "lm" / f"{job.technique.replace(' ', '-')}-{job.seed}"
    t = time.time()
    run_loop("tiny", job.data, out, sets)
    shards = TokenShards(job.data, "val")
    scores = {job.technique: lm_score(GPT.from_pretrained(out / "final"), shards)}
    if job.technique == "baseline":
        last = run_checkpoints(out, LM_AVERAGE)
        scores[LM_AVERAGED] = lm_score(average_checkpoints(last), shards)
    _progress(
        f"lm: {job.technique}, seed {job.seed}: "
        + ", ".join(f"{k} {v.bits_per_byte:.4f} bits/byte, ECE {v.ece:.4f}" for k, v in scores.items())
        + f", {time.time() - t:.0f} s"
    )
    return scores


def prepare_lm_data(root: Path) -> Path:
    from bigmodel.data.prepare import prepare

    out = root / "data" / "lm"
    with contextlib.redirect_stderr(io.StringIO()):
        prepare(["shakespeare"], out, tokenizer="char", val_fraction=0.1, progress=False, workers=1)
    return out


# ----- plan, run (in this process or a pool), aggregate ------------------------------------------------------

Job = ClassifierJob | LMJob


def _progress(message: str) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def execute(job: Job, root: Path, threads: int) -> Outcome | dict[str, LMScore]:
    torch.set_num_threads(threads)
    return run_classifier(job, root) if isinstance(job, ClassifierJob) else run_lm(job, root)


def member_seeds(k: int) -> list[int]:
    """Seeds of the k-th ensemble (0-based): disjoint groups of ENSEMBLE_SIZE, the first one starting at 1."""
    return list(range(1 + ENSEMBLE_SIZE * k, 1 + ENSEMBLE_SIZE * (k + 1)))


# seconds per run, roughly
RELATIVE_COST = {"genre-long": 50, "genre": 10, "lm": 6, "digits-wide": 2, "digits": 2, "breast-cancer": 1}


def plan(tasks: list[str], splits: dict[str, Split], lm_data: Path | None, repeats: int, quick: bool) -> list[Job]:
    """Every run the table needs, each once (the baseline runs double as ensemble members), longest first."""
    jobs: list[Job] = []
    for name in tasks:
        if name == "lm":
            assert lm_data is not None
            steps = LM_QUICK_STEPS if quick else LM_STEPS
            jobs += [LMJob(lm_data, t, s, steps) for s in range(1, repeats + 1) for t in LM_TRAINED]
            continue
        spec = CLASSIFIERS[name]
        steps = spec.quick_steps if quick else spec.steps
        runs = {(t, s): tuple(sets) for t, sets in classifier_techniques(spec).items() for s in range(1, repeats + 1)}
        for recipe in spec.recipes:
            for k in range(1 if quick else spec.ensembles):
                for (label, sets), s in zip(recipe_members(recipe, spec.preset), member_seeds(k), strict=True):
                    runs[(label, s)] = tuple(sets)
        split = splits[spec.dataset]
        for t, s in sorted(runs, key=lambda r: (r[1], r[0])):
            jobs.append(ClassifierJob(spec, split, t, s, steps, runs[(t, s)]))
    # the slow runs first, so that a pool does not end with one long run on an otherwise idle machine
    return sorted(jobs, key=lambda j: RELATIVE_COST["lm" if isinstance(j, LMJob) else j.spec.name], reverse=True)


def run_all(jobs: list[Job], root: Path, threads: int, workers: int) -> list[Outcome | dict[str, LMScore]]:
    if workers <= 1:
        return [execute(job, root, threads) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(execute, jobs, [root] * len(jobs), [threads] * len(jobs)))


def outcome_row(task: str, technique: str, outcomes: Sequence[Outcome], note: str = "") -> Row:
    accuracy, ece, nll = [o.accuracy for o in outcomes], [o.ece for o in outcomes], [o.nll for o in outcomes]
    return Row(task, technique, "accuracy", True, accuracy, ece, nll, note)


def classifier_rows(spec: TaskSpec, results: dict[tuple[str, int], Outcome], repeats: int, ensembles: int) -> list[Row]:
    """The task's table rows from its runs: each technique over seeds 1..repeats, then each recipe's ensembles
    beside their best members."""
    rows = []
    for technique in classifier_techniques(spec):
        outs = [results[(technique, s)] for s in range(1, repeats + 1)]
        note = ""
        if technique == "early stopping":
            note = f"best/ of runs that stopped after {statistics.fmean(o.steps for o in outs):.0f} steps (mean)"
        rows.append(outcome_row(spec.name, technique, outs, note))
    for recipe in spec.recipes:
        voted, best, member_acc, oracle = [], [], [], []
        for k in range(ensembles):
            labels = [label for label, _ in recipe_members(recipe, spec.preset)]
            members = [results[(label, s)] for label, s in zip(labels, member_seeds(k), strict=True)]
            probs = soft_vote(torch.from_numpy(np.stack([m.probs for m in members]))).numpy()  # (M, N, C) -> (N, C)
            voted.append(score(probs, members[0].labels))
            best.append(best_member(members))
            member_acc += [m.accuracy for m in members]
            oracle.append(max(m.accuracy for m in members))
        what = RECIPE_NOTES.get(recipe) or RECIPE_NOTES[f"{recipe} {spec.preset}"]
        note = f"{ensembles} x ({what}); members' mean accuracy {statistics.fmean(member_acc):.4f}"
        rows.append(outcome_row(spec.name, ensemble_name(recipe), voted, note))
        note = f"chosen on validation; the best on test (an oracle) has {statistics.fmean(oracle):.4f}"
        rows.append(outcome_row(spec.name, best_name(recipe), best, note))
    return rows


def best_member(members: Sequence[Outcome]) -> Outcome:
    """The member one would ship alone: the best validation accuracy, then the lowest validation loss.

    Choosing by test accuracy instead would use the test split for selection: the max of M noisy test
    scores is biased upwards, and the ensemble would be compared against a number no one could deploy."""
    return max(members, key=lambda m: (m.val_accuracy, -m.val_loss))


def lm_rows(results: dict[tuple[str, int], dict[str, LMScore]], repeats: int) -> list[Row]:
    scores: dict[str, list[LMScore]] = {t: [] for t in LM_TECHNIQUES}
    for s in range(1, repeats + 1):
        for technique in LM_TRAINED:
            for name, value in results[(technique, s)].items():
                scores[name].append(value)
    rows = []
    for technique, values in scores.items():
        bpb, ece, loss = [v.bits_per_byte for v in values], [v.ece for v in values], [v.loss for v in values]
        rows.append(Row("lm", technique, "val bits/byte", False, bpb, ece, loss, "NLL: val loss in nats/token"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = [*CLASSIFIERS, "lm"]
    p.add_argument("--tasks", nargs="+", choices=choices, default=choices, help="tasks to run (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 seeds, 1 ensemble, fewer steps")
    p.add_argument("--repeats", type=int, help="training seeds per technique (default 3, --quick 2)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once, in separate processes (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1: the models are small)")
    args = p.parse_args()
    repeats = args.repeats or (2 if args.quick else 3)
    if repeats < 1 or args.jobs < 1 or args.threads < 1:
        p.error("--repeats, --jobs and --threads must be >= 1")
    tasks = list(dict.fromkeys(args.tasks))
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bigmodel-generalization-") as tmp:
        root = Path(tmp)
        datasets = dict.fromkeys(CLASSIFIERS[n].dataset for n in tasks if n in CLASSIFIERS)
        splits = {d: genre_split(root) if d == "genre" else array_split(d, root) for d in datasets}
        lm_data = prepare_lm_data(root) if "lm" in tasks else None
        jobs = plan(tasks, splits, lm_data, repeats, args.quick)
        print(f"{len(jobs)} training runs, {args.jobs} at a time ...", file=sys.stderr, flush=True)
        results = run_all(jobs, root, args.threads, args.jobs)
    rows: list[Row] = []
    for name in tasks:
        if name == "lm":
            lm = {(j.technique, j.seed): r for j, r in zip(jobs, results, strict=True) if isinstance(j, LMJob)}
            rows += lm_rows(lm, repeats)  # type: ignore[arg-type]
            continue
        mine = {
            (j.technique, j.seed): r
            for j, r in zip(jobs, results, strict=True)
            if isinstance(j, ClassifierJob) and j.spec.name == name
        }
        spec = CLASSIFIERS[name]
        rows += classifier_rows(spec, mine, repeats, 1 if args.quick else spec.ensembles)  # type: ignore[arg-type]
    minutes = (time.time() - t0) / 60
    print(
        f"# benchmarks/generalization.py{' --quick' if args.quick else ''} ({date.today()}, {minutes:.1f} min, "
        f"{len(jobs)} runs, {args.jobs} at a time, {args.threads} torch thread(s) each, torch {torch.__version__})\n"
    )
    print(
        "Test metric on the test split (classifiers: the built-in hold-out, genre's 8 held-out plays; lm: the val\n"
        "split, which no run selects on). Early stopping selects on the loop's val split, carved out of the\n"
        "training data. NLL: mean -log p(true class) (lm: nats per token). ECE: 15 bins, on the test\n"
        "probabilities (lm: top-1 next-token). mean ± sample std over n seeds; 'vs baseline' is marked\n"
        "better/worse only where the means differ by more than 2 standard errors (clear, below).\n"
    )
    print(format_table(rows))
    print()
    recipes = dict.fromkeys(r for n in tasks if n in CLASSIFIERS for r in CLASSIFIERS[n].recipes)
    lines = [*effects_summary(rows)]
    lines += [line for r in recipes for line in (ensemble_verdict(rows, r), ensemble_nll_line(rows, r))]
    lines += [smoothing_verdict(rows, technique) for technique in SMOOTHING]
    for line in lines:
        print(f"- {line}")


if __name__ == "__main__":
    main()
