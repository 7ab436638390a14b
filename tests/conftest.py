"""Shared fixtures: a tiny generated corpus, data directories prepared from it, and small helpers.

Everything is built locally and deterministically (nothing is downloaded); session-scoped fixtures are
treated as read-only by the tests that use them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from bigmodel.config import GPTConfig, RunConfig, resolve_config
from bigmodel.data.prepare import FORMAT, FORMAT_VERSION, prepare
from bigmodel.models.gpt import GPT
from bigmodel.train.loop import TrainResult, train

REPO = Path(__file__).resolve().parents[1]

# One intra-op thread: the models here are tiny, and with two OpenMP threads on a 2-core machine that is
# also running something else, every parallel region can stall for milliseconds (steps ~50x slower).
torch.set_num_threads(1)
SUBPROCESS_ENV = {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false"}

_SUBJECTS = [
    "the king",
    "a young queen",
    "the old fool",
    "my lord",
    "the brave soldier",
    "her father",
    "the merchant",
    "a gentle lady",
    "the ghost",
    "this honest friend",
    "the night watch",
]
_VERBS = [
    "loves",
    "fears",
    "speaks to",
    "follows",
    "betrays",
    "remembers",
    "forgives",
    "calls upon",
    "dreams of",
    "waits for",
    "rides with",
]
_OBJECTS = [
    "the crown",
    "a golden ring",
    "the stormy sea",
    "his own shadow",
    "the sleeping town",
    "a letter of love",
    "the bitter end",
    "the castle gate",
    "sweet music",
    "the morning sun",
]
_TAILS = ["", " tonight", " in silence", " with a heavy heart", " before the dawn", " once more", " again"]
_NAMES = ["HAMLET", "ROMEO", "JULIET", "KING LEAR", "OPHELIA", "MACBETH", "PORTIA"]


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}{rng.choice(_TAILS)}"
    return s[0].upper() + s[1:] + rng.choice([".", ".", "!", "?"])


def make_document(rng: random.Random, lines: int) -> str:
    """Play-like English text: speaker lines followed by a few sentences each."""
    out = []
    for _ in range(lines):
        out.append(f"{rng.choice(_NAMES)}:")
        out.append(" ".join(_sentence(rng) for _ in range(rng.randint(1, 3))))
        out.append("")
    return "\n".join(out) + "\n"


def write_corpus(folder: Path, n_docs: int = 8, lines: int = 40, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n_docs):
        text = make_document(rng, lines)
        if i == 2:  # some non-ASCII text, so byte-level handling is exercised
            text += "Café crème, naïve “quotes” — señor Ünsal says 日本語 ok ✓\n"
        p = folder / f"doc{i:02d}.txt"
        p.write_text(text, encoding="utf-8")
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of 8 small English-like .txt files (~40 KB in all). Read-only."""
    folder = tmp_path_factory.mktemp("corpus")
    write_corpus(folder)
    return folder


@pytest.fixture(scope="session")
def bpe_data(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus prepared with a 300-token byte-level BPE. Read-only."""
    out = tmp_path_factory.mktemp("bpe-data") / "data"
    prepare([str(corpus_dir)], out, tokenizer="bpe", vocab_size=300, val_fraction=0.25, progress=False)
    return out


@pytest.fixture(scope="session")
def char_data(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus prepared with the byte ("char") tokenizer. Read-only."""
    out = tmp_path_factory.mktemp("char-data") / "data"
    prepare([str(corpus_dir)], out, tokenizer="char", val_fraction=0.25, progress=False)
    return out


TINY_RUN_STEPS = 30
TINY_RUN_OVERRIDES = [
    "model.block_size=32",
    "train.eval_every=10",
    "train.checkpoint_every=10",
    "train.keep_checkpoints=2",
    "train.eval_tokens=2048",
]


@pytest.fixture(scope="session")
def tiny_run(bpe_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[TrainResult, RunConfig]:
    """One 30-step training run of the tiny preset (block 32) on the BPE data. Read-only."""
    config = resolve_config("tiny", None, [*TINY_RUN_OVERRIDES, f"train.max_steps={TINY_RUN_STEPS}"])
    result = train(config, bpe_data, tmp_path_factory.mktemp("runs") / "run", progress=False)
    return result, config


def write_token_shards(folder: Path, shards: dict[str, list[np.ndarray]], vocab_size: int = 65535) -> Path:
    """A hand-made data directory whose shards hold the given token arrays (for exact loader checks)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries, splits = [], {}
    for split, arrays in shards.items():
        total = 0
        for i, arr in enumerate(arrays):
            name = f"{split}-{i:05d}.bin"
            arr.astype("<u2").tofile(folder / name)
            entries.append({"file": name, "split": split, "tokens": len(arr), "sha256": "0" * 64})
            total += len(arr)
        splits[split] = {"tokens": total, "bytes": 2 * total, "documents": len(arrays)}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "dtype": "uint16",
        "splits": splits,
        "shards": entries,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def tiny_gpt(
    vocab_size: int = 64,
    block_size: int = 32,
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 32,
    bias: bool = True,
    seed: int = 0,
    scale: float = 1.0,
    pos_scale: float = 1.0,
) -> GPT:
    """A small randomly initialised GPT in eval mode.

    `scale` > 1 spreads the weights so logits have clear margins (greedy decoding then does not hinge on
    last-bit float differences between implementations), and `pos_scale` > 1 makes the output depend on
    the position so greedy continuations vary instead of repeating one token; biases and LayerNorm
    parameters are randomised too, so a mapping that drops or transposes them shows up.
    """
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(
            vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head, n_embd=n_embd, bias=bias
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(scale)
            else:
                p.add_(0.1 * torch.randn_like(p))
        model.transformer.wpe.weight.mul_(pos_scale)
    return model.eval()


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m bigmodel ARGS` in a fresh process (the real exit status, streams and signals)."""
    full_env = {**os.environ, **SUBPROCESS_ENV, **(env or {})}
    full_env.pop("BIGMODEL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "bigmodel", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=REPO,
    )


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    """All token ids of one split of a data directory, shards concatenated in manifest order."""
    manifest = json.loads((data_dir / "manifest.json").read_text())
    parts = [
        np.fromfile(data_dir / s["file"], dtype=np.dtype(manifest["dtype"]).newbyteorder("<"))
        for s in manifest["shards"]
        if s["split"] == split
    ]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def split_documents(ids: np.ndarray, eot_id: int) -> list[list[int]]:
    """Token ids split on the end-of-text token (every document, including the last, ends with one)."""
    docs: list[list[int]] = []
    cur: list[int] = []
    for t in ids.tolist():
        if t == eot_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur, "the split does not end with an end-of-text token"
    return docs


def load_benchmark(filename: str) -> ModuleType:
    """A script of benchmarks/ imported as a module (they are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / filename
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module
