"""The zoo's tasks under the real `torchrun` (2 processes, gloo): `classify` (an mlp on digits, DDP) and
`seq2seq` (the Transformer, DDP and FSDP2, which decodes through the sharded model to evaluate) log the same
losses and evaluations as one process and export the same model. Their global batch is the same examples
(two ranks read the even and odd positions of the epoch's permutation, one process reads them as two
micro-batches of the same size)."""

from __future__ import annotations

import csv
import random
import subprocess
from pathlib import Path

import pytest
import torch
from test_distributed import TORCHRUN, _finish, _start, losses

from bigmodel.config import resolve_config
from bigmodel.models import load_model
from bigmodel.train.loop import train

COMMON = [
    "train.max_steps=6",
    "train.warmup_steps=1",
    "train.batch_size=32",
    "train.micro_batch=16",  # one process: 2 micro-batches per step; 2 ranks: one each
    "train.log_every=1",
    "train.eval_every=3",
    "train.checkpoint_every=0",
    "train.deterministic=true",
    "model.dropout=0",  # ranks draw dropout masks from their own streams: only dropout-free runs can match
    "train.precision=fp32",  # bf16 autocast (the default on CPUs with native bf16) rounds per batch shape
]
CASES = {  # name: (preset, data, settings, strategies); each torchrun costs ~10 s of start-up on 2 CPU cores
    "classify": ("mlp", "digits", ["model.hidden=16", "train.lr=0.01"], ("ddp",)),
    "seq2seq": (
        "seq2seq",
        None,  # a generated TSV (below)
        ["model.n_embd=32", "model.d_ff=64", "model.n_encoder_layer=1", "model.n_decoder_layer=1", "train.lr=0.01"],
        ("ddp", "fsdp"),
    ),
}


def _reversal_pairs(folder: Path) -> Path:
    """6 letters -> the same letters reversed. Every target has the same length, so a micro-batch's mean over
    its target tokens is the same whichever examples share it: the per-rank means average to one process's."""
    rng = random.Random(0)
    folder.mkdir()
    for split, n in (("train", 256), ("val", 16)):
        words = ["".join(rng.choice("abcdefgh") for _ in range(6)) for _ in range(n)]
        (folder / f"{split}.tsv").write_text("".join(f"{w}\t{w[::-1]}\n" for w in words))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist-tasks")
    pairs = _reversal_pairs(root / "pairs")
    procs: list[subprocess.Popen[str]] = []
    for name, (preset, data, sets, strategies) in CASES.items():
        for parallel in strategies:
            options = [a for s in [*COMMON, *sets, f"train.parallel={parallel}"] for a in ("--set", s)]
            out = root / f"{name}-{parallel}"
            cmd = [*TORCHRUN, "-m", "bigmodel", "train", "--preset", preset, "--data", str(data or pairs)]
            procs.append(_start([*cmd, "--out", str(out), *options]))
    for name, (preset, data, sets, _) in CASES.items():
        train(resolve_config(preset, None, [*COMMON, *sets]), data or pairs, root / f"{name}-one", progress=False)
    for p in procs:
        _finish(p)
    return {p.name: p for p in root.iterdir()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_ddp_and_fsdp_match_one_process(runs: dict[str, Path], name: str) -> None:
    one = losses(runs[f"{name}-one"])
    assert sorted(one) == list(range(1, 7)) and one[6] < one[1] * 0.9  # it learns
    for parallel in CASES[name][3]:
        run = runs[f"{name}-{parallel}"]
        got = losses(run)
        assert sorted(got) == sorted(one)
        for step in one:  # the same examples per step, reduced in another order: float noise only
            assert got[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), f"{parallel} step {step}"
        a, b = load_model(runs[f"{name}-one"] / "final"), load_model(run / "final")  # exported by rank 0
        for k, v in a.state_dict().items():
            w = b.state_dict()[k]
            if k.endswith("attn.kv.bias"):  # keys' bias: no gradient (softmax ignores a shift), Adam moves it by noise
                v, w = v[len(v) // 2 :], w[len(w) // 2 :]  # compare the values' bias only
            torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-5, msg=f"{parallel} {k}")
        # the periodic and final evaluations (seq2seq: greedy decoding through the sharded model) agree too
        want, have = evaluations(runs[f"{name}-one"]), evaluations(run)
        assert sorted(have) == sorted(want) == [3, 6]
        for step in want:
            assert have[step] == pytest.approx(want[step], rel=1e-4, abs=1e-6), f"{parallel} eval at {step}"


def evaluations(run: Path) -> dict[int, list[float]]:
    """step -> [val_loss, val_metric] of the rows of metrics.csv that hold an evaluation."""
    with open(run / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["val_metric"]]
    return {int(r["step"]): [float(r["val_loss"]), float(r["val_metric"])] for r in rows}
