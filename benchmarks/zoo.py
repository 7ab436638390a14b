"""The model zoo on CPU: every family trained by the one loop (`bigmodel train`) for a fixed step budget, beside a
standard reference trained on the same split, in one run.

| data          | ours (families, connection patterns)             | reference                                     |
| ------------- | ------------------------------------------------ | --------------------------------------------- |
| digits        | mlp: dense, second-order, sparse, interactive;   | scikit-learn MLPClassifier, LogisticRegression |
|               | multi-input (8 rows of 8 pixels, shared extractor)| (both on standardised features)              |
| breast-cancer | mlp: dense, second-order, sparse; multi-input    | the same                                      |
|               | (mean / error / worst: 3 inputs of 10)           |                                               |
| numbers       | seq2seq (Transformer), rnn-seq2seq (GRU+Bahdanau)| torch.nn.Transformer, same size and steps     |
| digits        | autoencoder (sparse, L1)                         | PCA keeping as many components as the         |
|               |                                                  | autoencoder's mean active units               |
| genre         | encoder (classifier, from scratch, on a BPE      | TF-IDF + LogisticRegression                   |
|               | trained on the training plays: genre-train)      |                                               |

Prints one table: parameters, seconds, the metric, and the reference's metric; the mlp / multi-input rows,
scikit-learn's MLPClassifier, both numbers Transformers and the genre encoder are means over 3 seeds
(± half the spread). Timings are wall-clock on whatever else the machine runs; the metrics do not depend on
it. Run: `python benchmarks/zoo.py` (about 20 minutes on 2 quiet cores, one thread), `--seeds 1` for a quicker
look, or `--only digits numbers`.

Measured on the shared 2-core development machine (1 thread, other jobs running), docs/zoo.md has the
whole table: numbers exact match, ours 0.9733 (±0.004) against torch.nn.Transformer 0.9740 (±0.0075);
genre accuracy, encoder 0.5301 (±0.008) against TF-IDF + LogisticRegression 0.5001 (majority class 0.452).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bigmodel.config import resolve_config
from bigmodel.data.arrays import load_arrays
from bigmodel.metrics import exact_match
from bigmodel.models import load_model
from bigmodel.models.seq2seq import sinusoids
from bigmodel.nn.losses import classification_loss
from bigmodel.tasks.seq2seq import Seq2SeqTask
from bigmodel.train.loop import train
from bigmodel.train.optim import lr_at

SEEDS: tuple[int, ...] = (1, 2, 3)


@dataclass
class Row:
    data: str
    model: str
    params: int
    seconds: float
    metric: str
    value: float
    spread: float = 0.0  # max - min over seeds


def run_ours(preset: str, data: str, sets: list[str], task: str | None = None) -> tuple[dict[str, float], int, float]:
    """Train through the one loop into a temporary run directory; (final metrics, parameters, seconds)."""
    config = resolve_config(preset, None, ["train.eval_every=0", "train.checkpoint_every=0", *sets], task=task)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        result = train(config, data, Path(tmp) / "run", progress=False)
        seconds = time.time() - t
        params = sum(p.numel() for p in load_model(Path(tmp) / "run" / "final").parameters())
    assert result.val is not None
    return result.val, params, seconds


def ours_over_seeds(
    data: str, name: str, preset: str, sets: list[str], metric: str = "accuracy", task: str | None = None
) -> Row:
    values, times = [], []
    params = 0
    for seed in SEEDS:
        val, params, seconds = run_ours(preset, data, [*sets, f"train.seed={seed}"], task)
        values.append(val[metric])
        times.append(seconds)
    return Row(data, name, params, statistics.mean(times), metric, statistics.mean(values), max(values) - min(values))


# ----- references -------------------------------------------------------------------------------------


def sklearn_classifiers(data: str) -> list[Row]:
    """LogisticRegression, and MLPClassifier over the same seeds as ours (its init and batches are random)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = load_arrays(data)
    x, xv = d.x_train.reshape(len(d.x_train), -1), d.x_val.reshape(len(d.x_val), -1)
    t = time.time()
    lr = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000)).fit(x, d.y_train)
    lr_est = lr[-1]
    rows = [
        Row(
            data,
            "ref: LogisticRegression",
            lr_est.coef_.size + lr_est.intercept_.size,
            time.time() - t,
            "accuracy",
            float(lr.score(xv, d.y_val)),
        )
    ]
    scores, times, params = [], [], 0
    for seed in SEEDS:
        t = time.time()
        mlp = make_pipeline(StandardScaler(), MLPClassifier(random_state=seed, max_iter=1000)).fit(x, d.y_train)
        times.append(time.time() - t)
        scores.append(float(mlp.score(xv, d.y_val)))
        params = sum(a.size for a in [*mlp[-1].coefs_, *mlp[-1].intercepts_])
    rows.append(
        Row(
            data,
            "ref: MLPClassifier (100 hidden)",
            params,
            statistics.mean(times),
            "accuracy",
            statistics.mean(scores),
            max(scores) - min(scores),
        )
    )
    return rows


class ReferenceTransformer(nn.Module):
    """torch.nn.Transformer (post-norm, ReLU, its own init) with the same embeddings and output as ours."""

    def __init__(self, vocab: int, d: int, heads: int, layers: int, d_ff: int, pad: int) -> None:
        super().__init__()
        self.pad, self.d = pad, d
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.core = nn.Transformer(d, heads, layers, layers, d_ff, dropout=0.0, batch_first=True)
        self.register_buffer("positions", sinusoids(256, d), persistent=False)

    def _emb(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) * math.sqrt(self.d) + self.positions[: ids.shape[1]]

    def logits(self, source: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        T = inputs.shape[1]
        out = self.core(
            self._emb(source),
            self._emb(inputs),
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(T),
            src_key_padding_mask=source == self.pad,
            memory_key_padding_mask=source == self.pad,
            tgt_is_causal=True,
        )
        return out @ self.embed.weight.t()  # (B, T, V): output tied to the embeddings

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.logits(source, target[:, :-1])
        return classification_loss(logits, target[:, 1:], ignore_index=self.pad)


def torch_transformer_reference(data: str, sets: list[str]) -> Row:
    """nn.Transformer of our preset's size, trained on the same batches, steps and schedule; greedy decoding."""
    config = resolve_config("seq2seq", None, sets)
    c, cfg = config.model, config.train
    task = Seq2SeqTask(config, data)
    torch.manual_seed(cfg.seed)
    assert c.vocab_size is not None
    model = ReferenceTransformer(c.vocab_size, c.n_embd, c.n_head, c.n_encoder_layer, c.d_ff, task.pad)  # type: ignore[union-attr]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    stream = task.batches(cfg.micro_batch, cfg.seed)
    t = time.time()
    for step in range(cfg.max_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss = model(**stream.next_batch())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.time() - t
    model.eval()
    outputs, refs = [], []
    with torch.no_grad():
        for start in range(0, len(task.val), 200):
            idx = torch.arange(start, min(start + 200, len(task.val)))
            batch = task._collate(task.val, idx)
            seq = torch.full((len(idx), 1), task.bos)
            for _ in range(c.max_target_len + 1):  # type: ignore[union-attr]
                nxt = model.logits(batch["source"], seq)[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
            for row in seq[:, 1:].tolist():
                outputs.append(task.decode_text(row[: row.index(task.eos)] if task.eos in row else row))
            refs += [task.pairs.val[i][1] for i in idx.tolist()]
    params = sum(p.numel() for p in model.parameters())
    return Row(data, "ref: torch.nn.Transformer", params, seconds, "exact_match", exact_match(outputs, refs))


def pca_reference(data: str, components: int) -> Row:
    from sklearn.decomposition import PCA

    d = load_arrays(data, need_labels=False)
    x, v = d.x_train.reshape(len(d.x_train), -1), d.x_val.reshape(len(d.x_val), -1)
    mean, std = x.mean(0), x.std(0, ddof=1)
    std[std <= 1e-6] = 1.0
    z, zv = (x - mean) / std, (v - mean) / std  # the autoencoder's standardisation
    t = time.time()
    pca = PCA(components).fit(z)
    err = float(((pca.inverse_transform(pca.transform(zv)) - zv) ** 2).mean())
    return Row(data, f"ref: PCA, {components} components", pca.components_.size, time.time() - t, "recon_error", err)


def tfidf_reference() -> Row:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    from bigmodel.data.genre import load_genre

    g = load_genre()
    t = time.time()
    vec = TfidfVectorizer(sublinear_tf=True)
    x = vec.fit_transform([s for s, _ in g.train])
    clf = LogisticRegression(max_iter=2000).fit(x, [y for _, y in g.train])
    acc = float((clf.predict(vec.transform([s for s, _ in g.val])) == np.array([y for _, y in g.val])).mean())
    return Row("genre", "ref: TF-IDF + LogisticRegression", clf.coef_.size, time.time() - t, "accuracy", acc)


# ----- the benchmark ----------------------------------------------------------------------------------

MLP_VARIANTS = {
    "digits": [
        ("mlp dense, 64 hidden", ["model.hidden=64"]),
        ("mlp second-order r=1, 24 hidden", ["model.connection=second-order", "model.hidden=24", "model.rank=1"]),
        ("mlp sparse 25%, 128 hidden", ["model.connection=sparse", "model.density=0.25", "model.hidden=128"]),
        ("mlp interactive 4 groups, 64 hidden", ["model.connection=interactive", "model.groups=4"]),
    ],
    "breast-cancer": [
        ("mlp dense, 64 hidden", ["model.hidden=64"]),
        ("mlp second-order r=1, 8 hidden", ["model.connection=second-order", "model.hidden=8", "model.rank=1"]),
        ("mlp sparse 25%, 64 hidden", ["model.connection=sparse", "model.density=0.25"]),
    ],
}
MULTI_INPUT = {  # digits: 8 rows of 8 pixels; breast cancer: mean / standard error / worst of 10 measurements
    "digits": (
        "multi-input, 8 row inputs, shared",
        ["model.n_inputs=8", "model.features=32", "model.extractor_hidden=64", "model.hidden=64"],
    ),
    "breast-cancer": ("multi-input, 3 inputs, shared", ["model.n_inputs=3"]),
}


def bench_arrays(data: str) -> list[Row]:
    rows = [ours_over_seeds(data, name, "mlp", sets) for name, sets in MLP_VARIANTS[data]]
    name, sets = MULTI_INPUT[data]
    rows.append(ours_over_seeds(data, name, "multi-input", sets))
    return rows + sklearn_classifiers(data)


def bench_numbers() -> list[Row]:
    """Both Transformers over the same seeds (each seed: the same initialisation seed and the same batches)."""
    rows = [ours_over_seeds("numbers", "seq2seq (Transformer), 600 steps", "seq2seq", [], "exact_match")]
    refs = [torch_transformer_reference("numbers", [f"train.seed={seed}"]) for seed in SEEDS]
    values = [r.value for r in refs]
    mean_s = statistics.mean(r.seconds for r in refs)
    name = "ref: torch.nn.Transformer, same size, batches and steps"
    rows.append(
        Row("numbers", name, refs[0].params, mean_s, "exact_match", statistics.mean(values), max(values) - min(values))
    )
    val, params, seconds = run_ours("rnn-seq2seq", "numbers", [])
    rows.append(
        Row(
            "numbers",
            "rnn-seq2seq (GRU + Bahdanau), 600 steps, 1 seed",
            params,
            seconds,
            "exact_match",
            val["exact_match"],
        )
    )
    return rows


def bench_autoencoder() -> list[Row]:
    val, params, seconds = run_ours("autoencoder", "digits", [])
    active = val["active_units"]
    name = f"autoencoder L1, 64 units ({active:.0f} active, sparsity {val['sparsity']:.0%})"
    return [
        Row("digits", name, params, seconds, "recon_error", val["reconstruction_error"]),
        pca_reference("digits", max(1, round(active))),
    ]


GENRE_VOCAB = 2048  # byte-level BPE trained on the training plays: a ~270-character passage is ~100 tokens
GENRE_STEPS = 400  # one epoch of the 13,137 training passages at 32 a step


def bench_genre() -> list[Row]:
    """`bigmodel prepare genre-train --tokenizer bpe` (the training plays' text only: no held-out play is seen),
    then the encoder classifier trained from scratch on those tokens; its seconds include the tokenizer's."""
    from bigmodel.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        t = time.time()
        bpe = Path(tmp) / "genre-bpe"
        prepare(["genre-train"], bpe, tokenizer="bpe", vocab_size=GENRE_VOCAB, progress=False)
        prepare_s = time.time() - t
        sets = [f"model.tokenizer={bpe}", f"train.max_steps={GENRE_STEPS}"]
        name = f"encoder classifier (BPE {GENRE_VOCAB} of the training plays, from scratch, {GENRE_STEPS} steps)"
        row = ours_over_seeds("genre", name, "encoder", sets, task="classify")
    row.seconds += prepare_s
    return [row, tfidf_reference()]


BENCHES = {
    "digits": lambda: bench_arrays("digits"),
    "breast-cancer": lambda: bench_arrays("breast-cancer"),
    "numbers": bench_numbers,
    "autoencoder": bench_autoencoder,
    "genre": bench_genre,
}


def main() -> None:
    global SEEDS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run these groups only")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the models are small)")
    p.add_argument("--seeds", type=int, default=len(SEEDS), help="seeds of the averaged rows (default 3)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    SEEDS = tuple(range(1, args.seeds + 1))
    rows: list[Row] = []
    for name in args.only or BENCHES:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows += BENCHES[name]()
    print("| data | model | parameters | seconds | metric | value |\n| --- | --- | ---: | ---: | --- | ---: |")
    for r in rows:
        spread = f" (±{r.spread / 2:.3f})" if r.spread else ""
        print(f"| {r.data} | {r.model} | {r.params:,} | {r.seconds:.1f} | {r.metric} | {r.value:.4f}{spread} |")


if __name__ == "__main__":
    main()
